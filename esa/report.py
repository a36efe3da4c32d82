"""``python -m esa.report OUT_DIR``: redraw the plots and rewrite report.md of an out-dir (kept at this
path for old commands; the code lives in :mod:`esa.cli.report`).

May import: esa.cli.
"""

import sys

from esa.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
