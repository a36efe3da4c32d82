"""``esa-compare RUN_DIR... --out DIR`` (also ``python -m esa.compare``): ``runs.csv``, ``summary.md`` and
the figures across ESA runs, from their out-dirs alone.  Bad input (a run given twice, a folder that is
not a run, a failed or unfinished run, an unwritable --out) is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esa-compare", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("runs", metavar="RUN_DIR", nargs="+", type=Path, help="the out-dir of an ESA run (--perturb)")
    p.add_argument("--out", required=True, type=Path, help="folder for runs.csv, summary.md and the figures")
    p.add_argument("--include-unfinished", action="store_true",
                   help="also compare runs that have not finished (killed or still running): what they hold so far")
    return p


def main(argv: list[str] | None = None) -> int:
    """Compare the runs, printing each file written; the exit code (2: bad input, one line on stderr)."""
    from esa.errors import light_main

    def body(ns: argparse.Namespace) -> None:
        from esa.compare import figures, summary, table  # matplotlib and scipy only past --help
        from esa.outdir.atomic import write_csv
        from esa.outdir.layout import prepare_out_dir

        runs = table.load_runs(ns.runs, ns.include_unfinished)
        prepare_out_dir(ns.out)
        rows = table.rows(runs)
        cols = table.columns(rows)
        made = [write_csv(ns.out / "runs.csv", cols, [[r.get(c, "") for c in cols] for r in rows]),
                summary.write_summary(runs, rows, ns.out), *figures.write_figures(rows, ns.out)]
        for path in made:
            print(path)
    return light_main(build_parser().parse_args, body, sys.argv[1:] if argv is None else list(argv))
