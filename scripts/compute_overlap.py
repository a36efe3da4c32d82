#!/usr/bin/env python
"""Compare the Top-K of two or more ESA runs: see :mod:`esa.cli.overlap` (``--help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.cli.overlap import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
