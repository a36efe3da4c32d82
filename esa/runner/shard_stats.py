"""``sensitivity_stats.json``'s per-tensor summaries when each rank holds only some rows of every score
tensor (``--shard fsdp``), with the definitions of :func:`esa.analysis.stats.tensor_stats` and without
gathering a tensor's scores.

Sums, counts, minimum and maximum are reduced over the ranks (sums in float64, so they may differ
from one process's in the last bits).  Order statistics are exact: the k-th smallest score is found
by bisection on the bit pattern of the fp32 scores (scores are >= 0, where the bit order is the value
order), each step counting over every rank how many scores lie at or below the midpoint (each rank
sorts its rows of one tensor once; 31 all-reduces per tensor).  The top shares follow from the m-th
largest value: the scores above it, plus as many copies of it as the top m still need.
"""

from __future__ import annotations

import math

import torch

from esa.analysis.stats import QUANTILES, TOP_SHARES
from esa.model import distributed

INF_BITS = 0x7F800000  # +inf as int32: above every finite non-negative fp32 value


def _sum(values: list[float]) -> list[float]:
    return distributed.all_reduce_floats(values)


def order_stats(bits: torch.Tensor, n: int, ks: list[int]) -> list[float]:
    """The ``ks``-th smallest (0-based) of the ``n`` scores all ranks hold together; ``bits``: this rank's
    scores as sorted int32 bit patterns."""
    lo = [0] * len(ks)
    hi = [INF_BITS] * len(ks)
    while any(a < b for a, b in zip(lo, hi)):
        mid = [(a + b) // 2 for a, b in zip(lo, hi)]
        here = torch.searchsorted(bits, torch.tensor(mid, dtype=torch.int32), right=True).tolist()
        counts = _sum([float(c) for c in here])
        for i, k in enumerate(ks):
            if lo[i] < hi[i]:
                if counts[i] >= k + 1:
                    hi[i] = mid[i]
                else:
                    lo[i] = mid[i] + 1
    return [float(torch.tensor(v, dtype=torch.int32).view(torch.float32)) for v in lo]


def tensor_stats(local: torch.Tensor) -> dict:
    """:func:`esa.analysis.stats.tensor_stats` of the tensor whose rows the ranks hold (``local``: this
    rank's, fp32, >= 0)."""
    a = local.detach().reshape(-1).float().cpu().contiguous()
    n_local = a.numel()
    count, total = _sum([float(n_local), float(a.double().sum())])
    n = int(count)
    mean = total / n
    (sq,) = _sum([float((a.double() - mean).square().sum())])
    extremes = distributed.all_gather_object((float(a.min()), float(a.max())) if n_local else None)
    out = {"count": n, "mean": mean, "std": math.sqrt(sq / n), "min": min(e[0] for e in extremes if e),
           "max": max(e[1] for e in extremes if e)}
    bits = torch.sort(a.view(torch.int32)).values
    positions = {name: q * (n - 1) for name, q in QUANTILES.items()}
    m = {name: max(1, math.ceil(q * n)) for name, q in TOP_SHARES.items()}
    ks = sorted({k for p in positions.values() for k in (math.floor(p), min(math.floor(p) + 1, n - 1))}
                | {n - v for v in m.values()})
    value = dict(zip(ks, order_stats(bits, n, ks)))
    for name, p in positions.items():
        lo = math.floor(p)
        out[name] = value[lo] + (value[min(lo + 1, n - 1)] - value[lo]) * (p - lo)
    shares = {}
    for name, top in m.items():
        v = value[n - top]
        above = a[a > v]
        count, mass = _sum([float(above.numel()), float(above.double().sum())])
        shares[name] = (mass + (top - count) * v) / total if total > 0 else None
    out["top_share"] = shares
    return out


def all_stats(scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict:
    return {name: {"shape": list(shapes[name]), **tensor_stats(s)} for name, s in scores.items()}
