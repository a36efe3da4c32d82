#!/usr/bin/env python
"""Baseline runner (reference perplexity of the unmodified model); the code is esa.cli.baseline.

    python scripts/baseline_runner.py --help      (or, after pip install -e ., esa-baseline --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.cli.baseline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
