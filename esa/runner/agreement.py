"""One seed's cross-metric agreement, computed while every metric's scores are still alive."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from esa.analysis.agreement import pair_key, spearman
from esa.analysis.stability import jaccard
from esa.experiment.selection import Selection, gather
from esa.experiment.sharded import Split


def union_indices(a: Selection, b: Selection) -> dict[str, torch.Tensor]:
    """Per tensor, the sorted flat indices in either selection (int64, CPU)."""
    names = list(dict.fromkeys([*a.indices, *b.indices]))
    empty = torch.zeros(0, dtype=torch.int64)
    return {n: torch.from_numpy(np.union1d(a.indices.get(n, empty).numpy(), b.indices.get(n, empty).numpy()))
            for n in names}


def values_at(scores: dict[str, torch.Tensor], where: dict[str, torch.Tensor], split: Split | None = None
              ) -> np.ndarray:
    """The scores at ``where`` (per tensor flat indices), concatenated in ``where``'s order (float64);
    ``split``: each rank holds some rows (--shard fsdp), each value is read where it lies."""
    picked = gather(scores, {n: i for n, i in where.items() if len(i)}, split)
    return torch.cat([v.double() for v in picked.values()]).numpy() if picked else np.zeros(0)


def seed_agreement(scores: dict[str, dict[str, torch.Tensor]], tops: dict[str, Selection],
                   split: Split | None = None) -> dict[str, dict]:
    """``{pair_key(a, b): {"jaccard", "spearman_on_union", "union"}}`` for every pair in ``scores`` order."""
    out = {}
    for a, b in itertools.combinations(list(scores), 2):
        where = union_indices(tops[a], tops[b])
        out[pair_key(a, b)] = {"jaccard": jaccard(tops[a], tops[b]),
                               "spearman_on_union": spearman(values_at(scores[a], where, split),
                                                             values_at(scores[b], where, split)),
                               "union": sum(len(i) for i in where.values())}
    return out
