#!/usr/bin/env python
"""ESA runner: Extreme Sensitivity Analysis of LLM weights (command-line front end).

The parser, config and exit codes live in :mod:`esa.cli.runner`; ``main(argv)`` returns the exit
code (0 success, 2 bad input, 1 crash, 130 interrupted).  ``python esa_runner.py --help`` lists
every flag.  ``set_random_seed(seed)`` seeds Python, NumPy, torch and CUDA globally for analysis
scripts that import it from here; the tool's own draws use named streams and never depend on it.
"""

import sys

from esa.cli.runner import build_parser, main
from esa.seeding import set_random_seed

__all__ = ["build_parser", "main", "set_random_seed"]

if __name__ == "__main__":
    sys.exit(main())
