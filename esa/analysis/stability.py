"""Overlap of weight sets: the one Jaccard of the project (seed stability, plots, run comparison).

A weight's identity is (parameter name, flat index).  A set of weights is given per tensor: a
mapping ``{parameter name: flat indices}`` (numpy or CPU torch int arrays, or anything with such an
``indices`` mapping, e.g. a Selection).  Intersections are computed tensor by tensor with sorted
numpy arrays, so no Python object is built per weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

IndexSets = Mapping[str, object]  # parameter name -> 1-D int array of distinct flat indices


def _sets(x) -> IndexSets:
    return getattr(x, "indices", x)


def index_sets(weights: Iterable[tuple[str, int]]) -> dict[str, np.ndarray]:
    """``{name: sorted unique flat indices}`` from ``(name, flat index)`` pairs."""
    out: dict[str, list[int]] = {}
    for name, idx in weights:
        out.setdefault(name, []).append(int(idx))
    return {n: np.unique(np.asarray(v, dtype=np.int64)) for n, v in out.items()}


def set_size(a) -> int:
    return sum(len(np.asarray(v)) for v in _sets(a).values())


def intersection_size(a, b) -> int:
    a, b = _sets(a), _sets(b)
    return sum(len(np.intersect1d(np.asarray(a[n]), np.asarray(b[n]), assume_unique=True))
               for n in a.keys() & b.keys())


def jaccard(a, b) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    inter = intersection_size(a, b)
    union = set_size(a) + set_size(b) - inter
    return inter / union if union else 1.0


def jaccard_matrix(sets: list) -> list[list[float]]:
    """Jaccard of every pair (symmetric, 1 on the diagonal)."""
    n = len(sets)
    matrix = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i][j] = matrix[j][i] = jaccard(sets[i], sets[j])
    return matrix


def stability_summary(tops: list, seeds: list[int], k: int, metric: str, mode: str) -> dict:
    """``stability_summary.json`` for >= 2 seeds (in the given order).

    ``jaccard_all`` = Jaccard of consecutive seed pairs (s0,s1), (s1,s2), ...; ``jaccard_mean`` its
    mean and ``jaccard_std`` its population standard deviation; ``jaccard_matrix`` all pairs.
    """
    if len(tops) < 2:
        raise ValueError("stability needs at least two seeds")
    n = len(tops)
    matrix = jaccard_matrix(tops)
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
        "set_sizes": {str(s): set_size(t) for s, t in zip(seeds, tops)},
        "identity": "(parameter name, flat index)",
    }
