"""Ranking score tensors with deterministic ties: the k extremes of one tensor, and of many at once.

Order is (score, target order, flat index): among equal scores the weight that comes first in
``model.named_parameters()`` order, then the lower flat (row-major) index, wins.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def extreme_k(flat: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Flat indices of the k largest (or smallest) values, ordered by value then index.

    Deterministic: ties at the threshold go to the lowest indices.  Fast path: one ``topk`` of
    k+1 values; when the (k+1)-th value is strictly beyond the k-th, no tie crosses the cut and the
    top-k set is exact without touching the tensor again.  Only a tie across the cut (rare for
    continuous scores) costs a full pass with boolean masks the size of ``flat``.
    """
    n = flat.numel()
    k = min(k, n)
    vals = flat if largest else flat.neg()
    top = torch.topk(vals, min(k + 1, n), sorted=True)
    thr = top.values[k - 1]
    if k == n or bool(top.values[k] < thr):
        idx = top.indices[:k].sort().values
    else:
        above = torch.nonzero(vals > thr).squeeze(1)
        ties = torch.nonzero(vals == thr).squeeze(1)[: k - len(above)]
        idx = torch.cat([above, ties]).sort().values
    order = torch.sort(vals[idx], descending=True, stable=True).indices
    return idx[order]


def merge_global(scores: dict[str, torch.Tensor], names: list[str], k: int, largest: bool,
                 view: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The global extreme k over all tensors, from each tensor's own extreme k (``view``: an optional
    per-tensor transform of the flat scores applied first, e.g. to rule weights out)."""
    cand_idx, cand_val, cand_tid = [], [], []
    for t, name in enumerate(names):
        flat = scores[name].reshape(-1) if view is None else view(name, scores[name].reshape(-1))
        idx = extreme_k(flat, k, largest)
        cand_idx.append(idx.cpu())
        cand_val.append(flat[idx].cpu())
        cand_tid.append(torch.full((len(idx),), t))
    val, tid, idx = torch.cat(cand_val), torch.cat(cand_tid), torch.cat(cand_idx)
    # candidates are already in (tensor, value, index) order; a stable sort on value finishes it
    order = torch.sort(val if largest else val.neg(), descending=True, stable=True).indices[:k]
    return {name: idx[order][tid[order] == t] for t, name in enumerate(names)}
