#!/usr/bin/env python
"""Compare two ESA out-dirs file by file, ignoring timestamps and timings (:mod:`esa.outdir.compare`).

    python scripts/compare_outdirs.py OUT_A OUT_B

Prints one line per file; exit 0 when every file matches, 1 when any differs or is missing, 2 on
bad input.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.outdir.compare import compare  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(Path(a).is_dir() for a in argv):
        print("error: usage: compare_outdirs.py OUT_A OUT_B (two out-dirs)", file=sys.stderr)
        return 2
    result = compare(Path(argv[0]), Path(argv[1]))
    for name, verdict in result.items():
        print(f"{verdict:<10} {name}")
    return 0 if set(result.values()) <= {"identical"} else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
