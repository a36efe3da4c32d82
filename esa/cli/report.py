"""``python -m esa.report OUT_DIR``: redraw every plot and rewrite report.md from an out-dir's files.

Reads the out-dir only: neither torch nor transformers is imported (a test runs it with both
made unimportable).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Redraw every plot and rewrite report.md of ``OUT_DIR``; the exit code (2: not a folder)."""
    from esa.reporting import (
        plots,
        report_md,  # matplotlib only when re-plotting
    )

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m esa.report OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    for path in plots.make_plots(out_dir):
        print(path)
    print(report_md.write_report(out_dir))
    return 0
