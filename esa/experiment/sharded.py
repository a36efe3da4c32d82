"""Top-K and bottom-k when each rank holds only some rows of every score tensor (``--shard fsdp``).

FSDP2 splits every weight on dim 0, so a rank holds rows ``[start, start + n)`` of each score tensor:
one contiguous range of flat (row-major) indices.  Each rank *proposes* its own extreme candidates
in global indices, the ranks *exchange* them (O(W·k) numbers, never a tensor's scores), and every rank
*merges* them the same way, so every rank selects exactly what one process holding whole tensors
selects, under the same total order (score, target order, flat index; see :mod:`esa.experiment.selection`):

* ``per_layer``: a tensor's k extremes are among the union of each rank's k extremes of its rows;
* ``global``: likewise over every tensor (each rank's global k extremes of its rows);
* ``per_row``: when a row lies within one rank (the input axis is not dim 0: Linear ``[out, in]``,
  fused experts) the rank's per-row selection is final and the ranks' rows are concatenated in rank
  order, which is row order; when every row crosses the ranks (input axis 0: HF Conv1D ``[in, out]``,
  embeddings ``[vocab, dim]``, or a tensor without input axis, one row), each rank proposes the k
  extremes of its part of every row and the merge keeps, per row, the k best.

``exchange`` is :func:`esa.model.distributed.all_gather_object` in a run; tests pass a function that
simulates ranks in one process.  ``Shards`` maps a target to ``(global shape, first row)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from esa.experiment.ranking import extreme_k, merge_global
from esa.experiment.rows import flat_indices, row_extreme_k, row_length

Shards = dict[str, tuple[tuple[int, ...], int]]
Exchange = Callable[[object], list]
View = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Split:
    """Where each rank's score rows sit (``shards``) and how the ranks swap candidates (``exchange``)."""

    shards: Shards
    exchange: Exchange

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shards[name][0]

    def numel(self, name: str) -> int:
        return math.prod(self.shards[name][0])


def offset(shards: Shards, name: str) -> int:
    """Global flat index of the rank's first local score of ``name``."""
    shape, start = shards[name]
    return start * math.prod(shape[1:])


def rows_cross_ranks(in_axis: int | None) -> bool:
    """Whether a ``per_row`` row spans the ranks (its input axis is dim 0, or it has none)."""
    return in_axis is None or in_axis == 0


def _extreme(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    return extreme_k(flat, k, largest) if flat.numel() and k else torch.zeros(0, dtype=torch.int64)


def propose(scores: dict[str, torch.Tensor], shards: Shards, names: list[str], k: int, mode: str, largest: bool,
            in_axes: dict[str, int | None], view: View | None = None) -> dict:
    """This rank's candidates: per name ``(global flat indices, fp32 values)`` (``per_row`` with rows that
    cross the ranks: ``(global input positions [rows, kk], values [rows, kk])``)."""
    def flat_of(n: str) -> torch.Tensor:
        flat = scores[n].reshape(-1)
        return flat if view is None else view(n, flat)

    out: dict = {}
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32))
    if mode == "global":
        held = [n for n in names if scores[n].numel()]  # a rank may hold no row of a small tensor
        picked = merge_global({n: flat_of(n) for n in held}, held, k, largest) if held else {}
        return {n: (picked[n] + offset(shards, n), flat_of(n)[picked[n].to(scores[n].device)].float().cpu())
                if n in picked else empty for n in names}
    for n in names:
        flat = flat_of(n)
        if mode == "per_layer":
            idx = _extreme(flat, k, largest).cpu()
            out[n] = (idx + offset(shards, n), flat[idx.to(flat.device)].float().cpu())
            continue
        shape, start = shards[n]
        local_shape = (scores[n].shape[0], *shape[1:])
        axis = in_axes.get(n)
        local = flat.reshape(local_shape)
        if not local.numel():  # no row of this tensor here
            n_rows = math.prod(shape) // row_length(shape, axis)
            out[n] = empty if not rows_cross_ranks(axis) else (torch.zeros(n_rows, 0, dtype=torch.int64),
                                                                torch.zeros(n_rows, 0, dtype=torch.float32))
        elif not rows_cross_ranks(axis):
            cols = row_extreme_k(local, axis, k, largest)
            idx = flat_indices(local_shape, axis, cols)
            out[n] = (idx + offset(shards, n), flat[idx.to(flat.device)].float().cpu())
        else:
            kk = min(k, row_length(local_shape, axis))
            cols = row_extreme_k(local, axis, kk, largest)
            idx = flat_indices(local_shape, axis, cols)
            vals = flat[idx.to(flat.device)].float().cpu().reshape(cols.shape)
            first = start if axis == 0 else offset(shards, n)  # a tensor without input axis is one flat row
            out[n] = (cols + first, vals)
    return out


def _order(idx: torch.Tensor, vals: torch.Tensor, largest: bool, tid: torch.Tensor | None = None) -> torch.Tensor:
    """Positions sorted by (value best first, target order, flat index)."""
    keys = [idx.numpy()] + ([tid.numpy()] if tid is not None else []) + [
        (-vals.double() if largest else vals.double()).numpy()]
    return torch.from_numpy(np.lexsort(keys))


def merge(proposals: list[dict], shards: Shards, names: list[str], k: int, mode: str, largest: bool,
          in_axes: dict[str, int | None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every rank's candidates -> the selection: per name the flat indices in selection order and
    their fp32 values."""
    if mode == "global":
        idx = torch.cat([p[n][0] for p in proposals for n in names])
        vals = torch.cat([p[n][1] for p in proposals for n in names])
        tid = torch.cat([torch.full((len(p[n][0]),), t) for p in proposals for t, n in enumerate(names)])
        order = _order(idx, vals, largest, tid)[:k]
        idx, vals, tid = idx[order], vals[order], tid[order]
        return ({n: idx[tid == t] for t, n in enumerate(names)}, {n: vals[tid == t] for t, n in enumerate(names)})
    out_i, out_v = {}, {}
    for n in names:
        if mode == "per_layer":
            idx = torch.cat([p[n][0] for p in proposals])
            vals = torch.cat([p[n][1] for p in proposals])
            order = _order(idx, vals, largest)[:k]
            out_i[n], out_v[n] = idx[order], vals[order]
        elif not rows_cross_ranks(in_axes.get(n)):  # each row on one rank, ranks in row order
            out_i[n] = torch.cat([p[n][0] for p in proposals])
            out_v[n] = torch.cat([p[n][1] for p in proposals])
        else:
            cols = torch.cat([p[n][0] for p in proposals], dim=1)
            vals = torch.cat([p[n][1] for p in proposals], dim=1)
            by_col = torch.sort(cols, dim=1, stable=True).indices  # ties go to the lower input position
            cols, vals = cols.gather(1, by_col), vals.gather(1, by_col)
            best = torch.sort(vals, dim=1, descending=largest, stable=True).indices[:, :k]
            cols, vals = cols.gather(1, best), vals.gather(1, best)
            out_i[n] = flat_indices(shards[n][0], in_axes.get(n), cols)
            out_v[n] = vals.reshape(-1)
    return out_i, out_v


def select(scores: dict[str, torch.Tensor], shards: Shards, names: list[str], k: int, mode: str, largest: bool,
           in_axes: dict[str, int | None], exchange: Exchange, view: View | None = None
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`propose`, exchange, :func:`merge`: the same selection on every rank."""
    mine = propose(scores, shards, names, k, mode, largest, in_axes, view)
    return merge(exchange(mine), shards, names, k, mode, largest, in_axes)


def gather(scores: dict[str, torch.Tensor], shards: Shards, indices: dict[str, torch.Tensor], exchange: Exchange
           ) -> dict[str, torch.Tensor]:
    """The fp32 scores at global flat ``indices`` (any order), each read on the rank that holds it."""
    mine = {}
    for n, idx in indices.items():
        lo = offset(shards, n)
        here = (idx >= lo) & (idx < lo + scores[n].numel())
        pos = torch.nonzero(here).squeeze(1)
        mine[n] = (pos, scores[n].reshape(-1)[(idx[pos] - lo).to(scores[n].device)].float().cpu())
    out = {n: torch.zeros(len(idx), dtype=torch.float32) for n, idx in indices.items()}
    for theirs in exchange(mine):
        for n, (pos, vals) in theirs.items():
            out[n][pos] = vals
    return out
