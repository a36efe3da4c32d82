#!/usr/bin/env python
"""Find and validate super weights (Yu et al. 2024); the code is esa.cli.superweights.

    python scripts/find_super_weights.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.cli.superweights import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
