"""``python -m esa.compare RUN_DIR... --out DIR`` (:mod:`esa.compare.cli`)."""

import sys

from esa.compare.cli import main

sys.exit(main())
