"""Per-tensor summaries of a score tensor (``sensitivity_stats.json``).

Quantiles use linear interpolation between order statistics (numpy's default).  ``std`` is the
population standard deviation.  ``top_share`` is the share of the tensor's total score held by its
highest ``ceil(q * count)`` scores (at least one weight), for q = 0.01 %, 0.1 % and 1 %.  Sums are
taken in float64.  Cost: O(n) per tensor (numpy partition for the order statistics, a partial sort
only for the top 1 %), one cpu copy of one tensor at a time.
"""

from __future__ import annotations

import math

import numpy as np
import torch

QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99, "p99.9": 0.999}
TOP_SHARES = {"0.01%": 1e-4, "0.1%": 1e-3, "1%": 1e-2}


def tensor_stats(scores: torch.Tensor) -> dict:
    """Summary of one score tensor (any shape, fp32)."""
    a = scores.detach().reshape(-1).float().cpu().numpy()
    n = a.size
    total = float(a.sum(dtype=np.float64))
    mean = total / n
    out = {"count": n, "mean": mean, "std": float(np.sqrt(np.mean(np.square(a - mean, dtype=np.float64)))),
           "min": float(a.min()), "max": float(a.max())}
    positions = {name: q * (n - 1) for name, q in QUANTILES.items()}
    kth = sorted({k for p in positions.values() for k in (math.floor(p), min(math.floor(p) + 1, n - 1))})
    part = np.partition(a, kth)
    for name, p in positions.items():
        lo = math.floor(p)
        lo_v, hi_v = float(part[lo]), float(part[min(lo + 1, n - 1)])
        out[name] = lo_v + (hi_v - lo_v) * (p - lo)
    m = max(1, math.ceil(max(TOP_SHARES.values()) * n))
    top = -np.sort(-np.partition(a, n - m)[n - m:])  # the m largest, descending
    cum = np.cumsum(top, dtype=np.float64)
    out["top_share"] = {name: (float(cum[max(1, math.ceil(q * n)) - 1]) / total if total > 0 else None)
                        for name, q in TOP_SHARES.items()}
    return out


def all_stats(scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict:
    return {name: {"shape": list(shapes[name]), **tensor_stats(s)} for name, s in scores.items()}
