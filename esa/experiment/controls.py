"""Controls: selections with the Top-K's structure that a hypothesis test compares it against.

``per_layer`` -> k per tensor, ``global`` -> k overall, like the Top-K.  A control is a function
``(scores, names, k, mode, top, rng) -> Selection`` registered in :data:`CONTROLS` with its record:

* ``random_k``: drawn uniformly (seeded numpy Generator) from the weights *not* in the Top-K: per
  tensor for ``per_layer``, over all target weights (so larger tensors get more) for ``global``.
* ``bottom_k``: the k lowest scores (same tie-break as the Top-K, ascending).  A deterministic
  ranking, so the bottom-k of a smaller k is a prefix of a larger k's (``nested``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from esa.errors import UsageError
from esa.experiment.selection import Selection, extreme_k, gather, merge_global
from esa.registry import Registry

ControlFn = Callable[[dict[str, torch.Tensor], list[str], int, str, Selection, np.random.Generator], Selection]


@dataclass(frozen=True)
class Control:
    """A control's function; ``nested``: deterministic ranking (smaller k = prefix of a larger k)."""

    name: str
    fn: ControlFn
    nested: bool
    help: str


CONTROLS: Registry[Control] = Registry("control")


def control_kind(name: str, *, nested: bool, help: str, aliases: tuple[str, ...] = ()
                 ) -> Callable[[ControlFn], ControlFn]:
    """Register the decorated function as control ``name`` (a duplicate name is an error)."""
    def deco(fn: ControlFn) -> ControlFn:
        CONTROLS.add(name, Control(name, fn, nested, help), aliases)
        return fn
    return deco


def sample_excluding(n: int, k: int, excluded: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """k distinct integers uniform on [0, n) minus ``excluded``; O(k) memory when n >> k."""
    excl = np.unique(excluded.numpy())
    free = n - len(excl)
    if free < k:
        raise UsageError(f"cannot draw {k} random weights disjoint from the Top-K out of {n}")
    if free <= 4 * k:  # dense case: enumerate what is allowed
        allowed = np.setdiff1d(np.arange(n, dtype=np.int64), excl, assume_unique=True)
        return torch.from_numpy(rng.choice(allowed, size=k, replace=False))
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < k:
        draw = rng.integers(0, n, size=2 * (k - len(chosen)) + 16, dtype=np.int64)
        draw = draw[~np.isin(draw, excl)]
        cand = np.concatenate([chosen, draw])
        _, first = np.unique(cand, return_index=True)
        chosen = cand[np.sort(first)]  # order-preserving de-duplication keeps the draw uniform
    return torch.from_numpy(chosen[:k].copy())


@control_kind("random_k", nested=False, aliases=("random",),
              help="k random weights disjoint from the Top-K (per tensor for per_layer)")
def random_k(scores, names, k, mode, top, rng) -> Selection:
    if mode == "per_layer":
        indices = {n: sample_excluding(scores[n].numel(), k, top.indices[n], rng) for n in names}
    else:
        sizes = torch.tensor([scores[n].numel() for n in names], dtype=torch.long)
        starts = torch.cumsum(sizes, 0) - sizes
        excl = torch.cat([top.indices[n] + starts[i] for i, n in enumerate(names) if n in top.indices])
        offsets = sample_excluding(int(sizes.sum()), k, excl, rng)
        tid = torch.searchsorted(starts, offsets, right=True) - 1
        indices = {n: (offsets[tid == i] - starts[i]).sort().values for i, n in enumerate(names)}
    return Selection("random_k", indices, gather(scores, indices))


@control_kind("bottom_k", nested=True, aliases=("bottom",), help="the k lowest scores")
def bottom_k(scores, names, k, mode, top, rng) -> Selection:
    if mode == "per_layer":
        indices = {n: extreme_k(scores[n].reshape(-1), k, largest=False).cpu() for n in names}
    else:
        indices = merge_global(scores, names, k, largest=False)
    return Selection("bottom_k", indices, gather(scores, indices))


def control(name: str, scores, names, k, mode, top: Selection, rng: np.random.Generator) -> Selection:
    return CONTROLS[name].fn(scores, names, k, mode, top, rng)
