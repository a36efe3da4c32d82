"""``python -m esa.report OUT_DIR``: redraw every plot and rewrite report.md from an out-dir's files.

Reads the out-dir only: neither torch nor transformers is imported (a test runs it with both
made unimportable).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Redraw every plot and rewrite report.md of ``OUT_DIR``; the exit code (2: not a folder)."""
    from esa.outdir.readers import read_json
    from esa.reporting import (  # matplotlib only when re-plotting
        metrics_report,
        plots,
        report_md,
    )

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m esa.report OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    config = read_json(out_dir, "config.json")
    parts = list(metrics_report.metric_dirs(out_dir, config).values()) if metrics_report.is_multi(config) else []
    for part in parts:  # a multi-metric run: each metric's folder is a single-metric out-dir
        for path in plots.make_plots(part):
            print(path)
        print(report_md.write_report(part))
    for path in [metrics_report.agreement_heatmap(out_dir)] if parts else plots.make_plots(out_dir):
        print(path)
    print(report_md.write_report(out_dir))
    return 0
