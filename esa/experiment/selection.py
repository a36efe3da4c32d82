"""Top-K selection with deterministic ties and O(k) memory beyond the scores (controls: :mod:`esa.experiment.controls`).

Order is (score descending, target order ascending, flat index ascending): among equal scores the
weight that comes first in ``model.named_parameters()`` order, then the lower flat (row-major)
index, wins.  ``bottom_k`` uses (score ascending, same tie-break).  ``global`` selection merges
per-tensor candidates (each tensor's own top-k under the same order), which provably contains the
global top-k, so no Python object is ever built per weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from esa.errors import UsageError
from esa.experiment import sharded
from esa.experiment.ranking import extreme_k, merge_global
from esa.experiment.rows import flat_indices, row_extreme_k, row_length
from esa.experiment.sharded import Split


@dataclass(frozen=True)
class Selection:
    """Chosen weights: per target name, flat indices (int64, cpu) and their scores (fp32, cpu).

    ``row_k``: for a ``per_row`` selection, the number per row; its indices are then ``[rows, row_k]``
    flattened (rows in order, each row's in rank order)."""

    kind: str
    indices: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    row_k: int = 0

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.indices.values())

    def keys(self) -> set[tuple[str, int]]:
        """Identity of each weight: (parameter name, flat index). O(k) objects, only for small k."""
        return {(n, int(i)) for n, idx in self.indices.items() for i in idx.tolist()}

    def ranked(self, order: list[str]) -> list[tuple[str, int, float]]:
        """Rows (name, flat index, score) in selection order; ``order`` = target names in order."""
        pos = {n: i for i, n in enumerate(order)}
        names = [n for n in order if n in self.indices and len(self.indices[n])]
        if not names:
            return []
        tid = torch.cat([torch.full((len(self.indices[n]),), pos[n]) for n in names])
        idx = torch.cat([self.indices[n] for n in names])
        sc = torch.cat([self.scores[n] for n in names])
        perm = np.lexsort((idx.numpy(), tid.numpy(), -sc.double().numpy() if self.kind != "bottom_k"
                           else sc.double().numpy()))
        return [(order[int(tid[j])], int(idx[j]), float(sc[j])) for j in perm]

    def prefix(self, k: int, mode: str, order: list[str]) -> Selection:
        """The first ``k`` of this selection in its rank order: per tensor for ``per_layer``, per row for
        ``per_row``, overall for ``global`` (``order`` = target names in order).

        Under the total order (score, target order, flat index) the Top-K sets are nested, so the
        prefix *is* the selection for the smaller k, with the same stored order, at O(k) cost instead
        of another pass over all scores.  Valid for ``top_k`` and ``bottom_k`` (stored in rank order).
        """
        if mode == "per_layer":
            return Selection(self.kind, {n: i[:k] for n, i in self.indices.items()},
                             {n: s[:k] for n, s in self.scores.items()})
        if mode == "per_row":
            def cut(v: torch.Tensor) -> torch.Tensor:
                return v.reshape(-1, self.row_k)[:, :k].reshape(-1)
            return Selection(self.kind, {n: cut(i) for n, i in self.indices.items()},
                             {n: cut(s) for n, s in self.scores.items()}, row_k=k)
        idx: dict[str, list[int]] = {n: [] for n in self.indices}
        pos_of: dict[str, list[int]] = {}
        for name, i, _score in self.ranked(order)[:k]:
            idx[name].append(i)
        for n in self.indices:  # scores gathered by position so they stay bit-identical fp32
            pos = {int(v): j for j, v in enumerate(self.indices[n].tolist())}
            pos_of[n] = [pos[i] for i in idx[n]]
        return Selection(self.kind, {n: torch.tensor(idx[n], dtype=torch.int64) for n in idx},
                         {n: self.scores[n][torch.tensor(pos_of[n], dtype=torch.int64)] for n in idx})


def gather(scores: dict[str, torch.Tensor], indices: dict[str, torch.Tensor], split: Split | None = None
           ) -> dict[str, torch.Tensor]:
    """The fp32 scores at ``indices`` (global flat; under ``split`` read on the rank that holds each)."""
    if split is not None:
        return sharded.gather(scores, split.shards, indices, split.exchange)
    return {n: scores[n].reshape(-1)[i.to(scores[n].device)].float().cpu() for n, i in indices.items()}


def shapes(scores: dict[str, torch.Tensor], split: Split | None) -> dict[str, tuple[int, ...]]:
    """Each score tensor's whole shape (a rank of a sharded run holds only some rows)."""
    return {n: split.shape(n) if split is not None else tuple(s.shape) for n, s in scores.items()}


def check_k(mode: str, k: int, sizes: dict[str, int], need: int, flag: str = "--topk") -> None:
    """Raise UsageError unless ``need * k`` weights fit (per tensor for per_layer, per row for per_row,
    overall for global).

    ``sizes`` = weight count per target (per_row: weights per row); ``need`` = 2 when random_k must be
    drawn disjoint from the Top-K.
    """
    if mode == "per_row":
        small = min(sizes, key=sizes.get)
        if sizes[small] < need * k:
            raise UsageError(f"{flag} {k} (per_row) is too large: the rows of {small} hold only {sizes[small]} weights"
                             + (" and the controls need as many again" if need > 1 else ""))
    elif mode == "per_layer":
        small = min(sizes, key=sizes.get)
        if sizes[small] < need * k:
            raise UsageError(f"{flag} {k} (per_layer) is too large: {small} has only {sizes[small]} weights"
                             + (" and the controls need as many again" if need > 1 else ""))
    elif sum(sizes.values()) < need * k:
        raise UsageError(f"{flag} {k} (global) is too large: the targets hold {sum(sizes.values())} weights"
                         + (" and the controls need as many again" if need > 1 else ""))


def top_k(scores: dict[str, torch.Tensor], names: list[str], k: int, mode: str, need: int = 1,
          in_axes: dict[str, int | None] | None = None, split: Split | None = None) -> Selection:
    """The Top-K of ``scores`` (``names`` in target order). ``need=2`` reserves room for controls;
    ``in_axes``: each tensor's input-feature axis (``per_row`` needs it: rows are output features);
    ``split``: each rank holds some rows of every tensor (:mod:`esa.experiment.sharded`)."""
    if split is not None:
        whole = shapes(scores, split)
        check_k(mode, k, {n: row_length(whole[n], (in_axes or {}).get(n)) if mode == "per_row"
                          else math.prod(whole[n]) for n in names}, need)
        indices, values = sharded.select(scores, split.shards, names, k, mode, True, in_axes or {}, split.exchange)
        return Selection("top_k", indices, values, row_k=k if mode == "per_row" else 0)
    if mode == "per_row":
        axes = in_axes or {}
        check_k(mode, k, {n: row_length(tuple(scores[n].shape), axes.get(n)) for n in names}, need)
        indices = {n: flat_indices(tuple(scores[n].shape), axes.get(n), row_extreme_k(scores[n], axes.get(n), k))
                   for n in names}
        return Selection("top_k", indices, gather(scores, indices), row_k=k)
    check_k(mode, k, {n: scores[n].numel() for n in names}, need)
    if mode == "per_layer":
        indices = {n: extreme_k(scores[n].reshape(-1), k).cpu() for n in names}
    else:
        indices = merge_global(scores, names, k, largest=True)
    return Selection("top_k", indices, gather(scores, indices))
