"""``scripts/compute_overlap.py``: compare the Top-K of two or more ESA runs.

For every pair of runs: Jaccard of the Top-K sets, the overlap count, and the Spearman rank
correlation of the two runs' scores over the weights both Top-Ks hold (``spearman_on_shared``,
:mod:`esa.analysis.overlap`; not the Spearman on the union of a multi-metric run's
metric_agreement.json).  A multi-metric out-dir counts as one run per metric.  Each run
contributes its primary seed (the first seed in its top_weights.csv) unless --seed is given.  Runs
that chose their Top-K differently (mode or k) are compared with a warning.  Prints a table;
--json PATH writes the same as JSON.

    python scripts/compute_overlap.py RUN_A RUN_B [RUN_C ...] [--seed S] [--json overlap.json]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from esa.analysis.overlap import compare, load_top, mismatch, runs_in, selection_of
from esa.cli.common import Parser, guarded
from esa.errors import UsageError
from esa.outdir.atomic import write_json

SHARED_NOTE = ("spearman_on_shared: rank correlation of the two runs' scores over the weights both Top-Ks hold "
               "(n/a with fewer than 3); a multi-metric run's metric_agreement.json ranks the union of the Top-Ks "
               "instead (spearman_on_union), a different statistic")


def build_parser() -> Parser:
    p = Parser(prog="compute_overlap.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="ESA out-dirs (each with top_weights.csv; a multi-metric "
                   "out-dir counts as one run per metric)")
    p.add_argument("--seed", type=int, default=None, help="seed to compare (default: each run's primary seed)")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return guarded(lambda: _run(build_parser().parse_args(argv)), argv, "interrupted")


def _run(args) -> int:
    found = [run for r in args.runs for run in runs_in(r)]  # a multi-metric out-dir: each of its metrics
    if len(found) < 2:
        raise UsageError("give at least two runs to compare (or one multi-metric out-dir)")
    tops = {label: load_top(folder, args.seed) for label, folder in found}
    if (warning := mismatch({label: selection_of(folder) for label, folder in found})) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    pairs = []
    print(f"{'run A':<40} {'run B':<40} {'|A|':>7} {'|B|':>7} {'overlap':>8} {'jaccard':>8} "
          f"{'spearman_on_shared':>18}")
    for (ra, (ta, sa)), (rb, (tb, sb)) in itertools.combinations(tops.items(), 2):
        c = {"run_a": ra, "seed_a": sa, "run_b": rb, "seed_b": sb, **compare(ta, tb)}
        pairs.append(c)
        rho = "n/a" if c["spearman_on_shared"] is None else f"{c['spearman_on_shared']:+.3f}"
        print(f"{ra[-40:]:<40} {rb[-40:]:<40} {c['size_a']:>7} {c['size_b']:>7} {c['overlap']:>8} "
              f"{c['jaccard']:>8.3f} {rho:>18}")
    print(SHARED_NOTE)
    if args.json:
        write_json(args.json, {"identity": "(parameter name, flat index)", "spearman_on_shared": SHARED_NOTE,
                               "pairs": pairs})
    return 0
