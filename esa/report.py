"""``python -m esa.report OUT_DIR``: rebuild the figures and report.md of an out-dir (kept at this
path for old commands; the code lives in :mod:`esa.cli.report`).

May import: esa.cli.
"""

import sys

from esa.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
