#!/usr/bin/env python
"""Compare the Top-K of two or more ESA runs (e.g. grad_x_weight vs act_mag on the same model).

For every pair of runs: Jaccard of the Top-K sets (identity = parameter name + flat index), the
overlap count, and the Spearman rank correlation of the shared weights' scores (undefined with
fewer than 3 shared weights).  Each run contributes its primary seed (the first seed in its
top_weights.csv) unless --seed is given.  Prints a table; --json PATH writes the same as JSON.

    python scripts/compute_overlap.py RUN_A RUN_B [RUN_C ...] [--seed S] [--json overlap.json]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.config import UsageError  # noqa: E402
from esa.outputs import write_json  # noqa: E402


def load_top(run: Path, seed: int | None) -> tuple[dict[tuple[str, int], float], int]:
    """{(parameter, index): score} of one seed of a run, and that seed."""
    path = run / "top_weights.csv"
    if not path.is_file():
        raise UsageError(f"{run} has no top_weights.csv (is it an ESA out-dir?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsageError(f"{path} lists no weights")
    chosen = int(rows[0]["seed"]) if seed is None else seed
    top = {(r["parameter"], int(r["index"])): float(r["score"]) for r in rows if int(r["seed"]) == chosen}
    if not top:
        raise UsageError(f"{path} has no rows for seed {chosen}")
    return top, chosen


def compare(a: dict, b: dict) -> dict:
    shared = sorted(a.keys() & b.keys())
    union = len(a.keys() | b.keys())
    out = {"size_a": len(a), "size_b": len(b), "overlap": len(shared),
           "jaccard": len(shared) / union if union else 1.0, "spearman": None, "spearman_p": None}
    if len(shared) >= 3:
        res = stats.spearmanr([a[k] for k in shared], [b[k] for k in shared])
        if res.statistic == res.statistic:  # nan when one side is constant
            out["spearman"], out["spearman_p"] = float(res.statistic), float(res.pvalue)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="ESA out-dirs (each with top_weights.csv)")
    p.add_argument("--seed", type=int, default=None, help="seed to compare (default: each run's primary seed)")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison as JSON here")
    p.error = lambda msg: (_ for _ in ()).throw(UsageError(msg))  # one line, exit 2
    try:
        args = p.parse_args(argv)
        if len(args.runs) < 2:
            raise UsageError("give at least two runs to compare")
        tops = {str(r): load_top(r, args.seed) for r in args.runs}
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pairs = []
    print(f"{'run A':<40} {'run B':<40} {'|A|':>7} {'|B|':>7} {'overlap':>8} {'jaccard':>8} {'spearman':>9}")
    for (ra, (ta, sa)), (rb, (tb, sb)) in itertools.combinations(tops.items(), 2):
        c = {"run_a": ra, "seed_a": sa, "run_b": rb, "seed_b": sb, **compare(ta, tb)}
        pairs.append(c)
        rho = "n/a" if c["spearman"] is None else f"{c['spearman']:.3f}"
        print(f"{ra[-40:]:<40} {rb[-40:]:<40} {c['size_a']:>7} {c['size_b']:>7} {c['overlap']:>8} "
              f"{c['jaccard']:>8.3f} {rho:>9}")
    if args.json:
        write_json(args.json, {"identity": "(parameter name, flat index)", "pairs": pairs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
