"""``python -m esa.report OUT_DIR [--save-plots]``: rebuild every figure and report an ESA tool wrote
into OUT_DIR, from the out-dir's files alone (:mod:`esa.reporting.rebuild`).

Works on the out-dir of an ESA run (single- or multi-metric) and of scripts/find_super_weights.py;
anything else (a baseline_runner out-dir, which has no figure, or a folder of no tool) is one line on
stderr and exit 2.  Neither torch nor transformers is imported, not even through
:mod:`esa.cli.common` (a test runs it with both made unimportable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esa.report", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                   help="the out-dir of an ESA run or of find_super_weights.py")
    p.add_argument("--save-plots", action="store_true",
                   help="also draw the score plots (plots/*.png) of a run made without --save-plots")
    return p


def main(argv: list[str] | None = None) -> int:
    """Rebuild the out-dir's figures and reports, printing each path; the exit code (2: bad input or
    nothing to rebuild, one line on stderr)."""
    from esa.errors import UsageError, light_main

    def body(ns: argparse.Namespace) -> None:
        if not ns.out_dir.is_dir():
            raise UsageError(f"{ns.out_dir} is not a folder (usage: python -m esa.report OUT_DIR)")
        from esa.reporting.rebuild import rebuild  # matplotlib only when there is something to draw

        for path in rebuild(ns.out_dir, ns.save_plots):
            print(path)
    return light_main(build_parser().parse_args, body, sys.argv[1:] if argv is None else list(argv))
