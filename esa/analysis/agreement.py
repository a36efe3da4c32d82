"""Cross-metric agreement (``metric_agreement.json``): do two metrics pick the same weights, and do
they rank them alike?

For every pair of metrics (a, b) and every seed, on that seed's calibration windows:

* ``jaccard``: |Top-K(a) ∩ Top-K(b)| / |Top-K(a) ∪ Top-K(b)| over weight identities (parameter
  name, flat index), as :func:`esa.analysis.stability.jaccard`;
* ``spearman``: Spearman's rank correlation of a's and b's scores on the union of the two Top-Ks
  (ties get average ranks), pooled over tensors; None when it is undefined (a constant side);
* ``union``: that union's size.

Across seeds, ``jaccard_mean`` / ``spearman_mean`` are plain means (seeds with an undefined Spearman
left out), and the ``*_matrix`` fields hold the means as symmetric metric × metric matrices (1 on the
diagonal) for the heatmap.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


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
    """``metric_agreement.json`` from ``per_seed[str(seed)][pair_key(a, b)] = {"jaccard", "spearman",
    "union"}`` for every pair a before b in ``metrics`` order."""
    pairs = []
    n = len(metrics)
    jac = [[1.0] * n for _ in range(n)]
    rho: list[list[float | None]] = [[1.0] * n for _ in range(n)]
    for (i, a), (j, b) in itertools.combinations(enumerate(metrics), 2):
        rows = [per_seed[str(s)][pair_key(a, b)] for s in seeds]
        rhos = [r["spearman"] for r in rows if r["spearman"] is not None]
        entry = {"a": a, "b": b, "jaccard_mean": float(np.mean([r["jaccard"] for r in rows])),
                 "spearman_mean": float(np.mean(rhos)) if rhos else None,
                 "per_seed": {str(s): r for s, r in zip(seeds, rows)}}
        pairs.append(entry)
        jac[i][j] = jac[j][i] = entry["jaccard_mean"]
        rho[i][j] = rho[j][i] = entry["spearman_mean"]
    return {"metrics": list(metrics), "seeds": list(seeds), "k": k, "mode": mode, "pairs": pairs,
            "jaccard_matrix": jac, "spearman_matrix": rho,
            "definition": {"jaccard": "|A ∩ B| / |A ∪ B| of the two Top-K sets, weight = (parameter, flat index)",
                           "spearman": "rank correlation of the two metrics' scores on the union of their Top-Ks "
                                       "(pooled over tensors; average ranks for ties)",
                           "aggregation": "mean over seeds"}}
