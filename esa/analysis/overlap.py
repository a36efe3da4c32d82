"""Comparing the Top-K of separate runs (e.g. grad_x_weight vs act_mag on the same model).

For a pair of runs: Jaccard of the Top-K sets (identity = parameter name + flat index, through
:func:`esa.analysis.stability.jaccard`), the overlap count, and ``spearman_on_shared``: the Spearman
rank correlation of the two runs' scores over the weights both Top-Ks hold (undefined with fewer
than 3 shared weights).  It is not ``metric_agreement.json``'s ``spearman_on_union``
(:mod:`esa.analysis.agreement`), which ranks every weight of either Top-K and is negative when the
Top-Ks barely overlap.
"""

from __future__ import annotations

import csv
from pathlib import Path

from scipy import stats

from esa.analysis.stability import index_sets, intersection_size, jaccard
from esa.errors import UsageError


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
    """Sizes, overlap, Jaccard and Spearman on the shared weights of two ``{(parameter, index): score}`` Top-Ks."""
    sa, sb = index_sets(a), index_sets(b)
    shared = sorted(a.keys() & b.keys())
    out = {"size_a": len(a), "size_b": len(b), "overlap": intersection_size(sa, sb), "jaccard": jaccard(sa, sb),
           "spearman_on_shared": None, "spearman_on_shared_p": None}
    if len(shared) >= 3:
        res = stats.spearmanr([a[k] for k in shared], [b[k] for k in shared])
        if res.statistic == res.statistic:  # nan when one side is constant
            out["spearman_on_shared"], out["spearman_on_shared_p"] = float(res.statistic), float(res.pvalue)
    return out
