"""Cross-metric agreement (``metric_agreement.json``): do two metrics pick the same weights, and do
they rank them alike?

For every pair of metrics (a, b) and every seed, on that seed's calibration windows:

* ``jaccard``: |Top-K(a) ∩ Top-K(b)| / |Top-K(a) ∪ Top-K(b)| over weight identities (parameter
  name, flat index), as :func:`esa.analysis.stability.jaccard`;
* ``spearman_on_union``: Spearman's rank correlation of a's and b's scores on the union of the two
  Top-Ks (ties get average ranks), pooled over tensors; None when it is undefined (a constant side).
  Each Top-K is chosen by its own metric, so when the two barely overlap the union holds a's top
  weights, which b scores low, and b's, which a scores low: the value is then negative.  It says the
  metrics disagree about which weights are extreme, not that their scores are anti-correlated over
  all weights.  (``scripts/compute_overlap.py`` reports another statistic: the correlation over the
  weights *both* Top-Ks hold, :mod:`esa.analysis.overlap`);
* ``union``: that union's size.

Across seeds, ``jaccard_mean`` / ``spearman_on_union_mean`` are plain means (seeds with an undefined
Spearman left out), and the ``*_matrix`` fields hold the means as symmetric metric × metric matrices (1 on the
diagonal) for the heatmap.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

NEGATIVE = ("each Top-K is chosen by its own metric, so when they barely overlap the union holds each metric's "
            "top weights, which the other metric scores low: the metrics disagree about which weights are extreme "
            "(not: their scores are anti-correlated over all weights)")


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho of two equal-length samples (average ranks for ties); None if undefined."""
    from scipy.stats import spearmanr  # scipy is heavy: imported when a comparison is made

    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    rho = float(spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def agreement_summary(metrics: list[str], seeds: list[int], k: int, mode: str,
                      per_seed: dict[str, dict[str, dict]]) -> dict:
    """``metric_agreement.json`` from ``per_seed[str(seed)][pair_key(a, b)] = {"jaccard",
    "spearman_on_union", "union"}`` for every pair a before b in ``metrics`` order."""
    pairs = []
    n = len(metrics)
    jac = [[1.0] * n for _ in range(n)]
    rho: list[list[float | None]] = [[1.0] * n for _ in range(n)]
    for (i, a), (j, b) in itertools.combinations(enumerate(metrics), 2):
        rows = [per_seed[str(s)][pair_key(a, b)] for s in seeds]
        rhos = [r["spearman_on_union"] for r in rows if r["spearman_on_union"] is not None]
        entry = {"a": a, "b": b, "jaccard_mean": float(np.mean([r["jaccard"] for r in rows])),
                 "spearman_on_union_mean": float(np.mean(rhos)) if rhos else None,
                 "per_seed": {str(s): r for s, r in zip(seeds, rows)}}
        pairs.append(entry)
        jac[i][j] = jac[j][i] = entry["jaccard_mean"]
        rho[i][j] = rho[j][i] = entry["spearman_on_union_mean"]
    return {"metrics": list(metrics), "seeds": list(seeds), "k": k, "mode": mode, "pairs": pairs,
            "jaccard_matrix": jac, "spearman_on_union_matrix": rho,
            "definition": {"jaccard": "|A ∩ B| / |A ∪ B| of the two Top-K sets, weight = (parameter, flat index)",
                           "spearman_on_union": "rank correlation of the two metrics' scores on the union of "
                                                "their Top-Ks (pooled over tensors; average ranks for ties)",
                           "negative_spearman_on_union": NEGATIVE,
                           "aggregation": "mean over seeds"}}
