"""``python -m esa.report OUT_DIR``: redraw every plot and rewrite report.md from an out-dir's files.

Reads the out-dir only: neither torch nor transformers is imported (a test runs it with both
made unimportable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Redraw every plot and rewrite report.md of ``OUT_DIR``; the exit code (2: not a folder)."""
    from esa.outdir.readers import read_json
    from esa.reporting import (  # matplotlib only when re-plotting
        metrics_report,
        parts,
        plots,
        report_md,
    )

    args = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m esa.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the out-dir of an ESA run")
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    out_dir = Path(ns.out_dir)
    if not out_dir.is_dir():
        print(f"error: {out_dir} is not a folder (usage: python -m esa.report OUT_DIR)", file=sys.stderr)
        return 2
    config = read_json(out_dir, "config.json")
    folders = list(metrics_report.metric_dirs(out_dir, config).values()) if metrics_report.is_multi(config) else []
    for folder in folders:  # a multi-metric run: each metric's folder is a single-metric out-dir
        for path in [*plots.make_plots(folder), *parts.figures(folder)]:
            print(path)
        print(report_md.write_report(folder))
    redrawn = [metrics_report.agreement_heatmap(out_dir)] if folders else [*plots.make_plots(out_dir),
                                                                            *parts.figures(out_dir)]
    for path in redrawn:
        print(path)
    print(report_md.write_report(out_dir))
    return 0
