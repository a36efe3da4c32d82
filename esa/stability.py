"""Top-K stability across seeds: Jaccard overlap of the selected sets.

A weight's identity is (parameter name, flat index).  Intersections are computed tensor by tensor
with sorted numpy arrays, so no Python object is built per weight.
"""

from __future__ import annotations

import numpy as np

from esa.selection import Selection


def intersection_size(a: Selection, b: Selection) -> int:
    return sum(len(np.intersect1d(a.indices[n].numpy(), b.indices[n].numpy(), assume_unique=True))
               for n in a.indices.keys() & b.indices.keys())


def jaccard(a: Selection, b: Selection) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    inter = intersection_size(a, b)
    union = a.size + b.size - inter
    return inter / union if union else 1.0


def stability_summary(tops: list[Selection], seeds: list[int], k: int, metric: str, mode: str) -> dict:
    """``stability_summary.json`` for >= 2 seeds (in the given order).

    ``jaccard_all`` = Jaccard of consecutive seed pairs (s0,s1), (s1,s2), ...; ``jaccard_mean`` its
    mean and ``jaccard_std`` its population standard deviation; ``jaccard_matrix`` all pairs.
    """
    if len(tops) < 2:
        raise ValueError("stability needs at least two seeds")
    n = len(tops)
    matrix = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i][j] = matrix[j][i] = jaccard(tops[i], tops[j])
    consecutive = [matrix[i][i + 1] for i in range(n - 1)]
    return {
        "jaccard_mean": float(np.mean(consecutive)),
        "jaccard_all": consecutive,
        "jaccard_std": float(np.std(consecutive)),  # population std (ddof=0)
        "num_seeds": n,
        "topk_overlap_size": k,
        "seeds": list(seeds),
        "metric": metric,
        "mode": mode,
        "jaccard_matrix": matrix,
        "set_sizes": {str(s): t.size for s, t in zip(seeds, tops)},
        "identity": "(parameter name, flat index)",
    }
