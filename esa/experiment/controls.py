"""Controls: selections with the Top-K's structure that a hypothesis test compares it against.

``per_layer`` -> k per tensor, ``per_row`` -> k per output row, ``global`` -> k overall, like the
Top-K.  A control is a function ``(scores, names, k, mode, top, rng) -> Selection`` registered in
:data:`CONTROLS` with its record:

* ``random_k``: drawn uniformly (seeded numpy Generator) from the weights *not* in the Top-K: per
  tensor for ``per_layer``, per row for ``per_row``, over all target weights (so larger tensors get
  more) for ``global``.
* ``bottom_k``: the k lowest scores (same tie-break as the Top-K, ascending) among the weights the
  perturbation can change: ``zero``, ``sign_flip`` and ``gauss_noise`` leave an exact 0.0 as it is,
  so exact zeros are not eligible (otherwise the lowest scores of a gradient metric are exactly
  those zeros and the control changes nothing).  A deterministic ranking, so the bottom-k of a
  smaller k is a prefix of a larger k's (``nested``).
* ``random_mag_k``: for each Top-K weight, a random weight of the same tensor among the nearest
  neighbours in |w| order (the 4 closest ranks not already taken), disjoint from the Top-K: the
  same |w| distribution as the Top-K, so "large weights matter" and "sensitive weights matter" can
  be told apart.

Too few eligible weights for a control is a usage error (a degenerate control is no control).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from esa.errors import UsageError
from esa.experiment import sharded
from esa.experiment.rows import as_rows, flat_indices, row_extreme_k
from esa.experiment.selection import Selection, extreme_k, gather, merge_global, shapes
from esa.experiment.sharded import Split
from esa.registry import Registry


@dataclass(frozen=True)
class ControlContext:
    """What a control may need beyond the scores: the weights (name -> this rank's rows of the
    parameter), and whether the perturbation leaves exact zeros unchanged (then they are not eligible
    for bottom_k), and each tensor's input-feature axis (``per_row``: rows are the output features).
    ``split``: each rank holds some rows of every tensor (``--shard fsdp``); ``whole_weight(name)``
    then gathers one whole weight (random_mag_k ranks a tensor's |w|: one tensor at a time)."""

    weights: dict[str, torch.Tensor] | None = None
    zeros_unchanged: bool = False
    in_axes: dict[str, int | None] = field(default_factory=dict)
    split: Split | None = None
    whole_weight: Callable[[str], torch.Tensor] | None = None

    def weight(self, name: str) -> torch.Tensor:
        """The whole weight ``name`` (gathered from the ranks when it is split)."""
        return self.whole_weight(name) if self.split is not None else self.weights[name]


ControlFn = Callable[[dict[str, torch.Tensor], list[str], int, str, Selection, np.random.Generator, ControlContext],
                     Selection]


@dataclass(frozen=True)
class Control:
    """A control's function; ``nested``: deterministic ranking (smaller k = prefix of a larger k);
    ``unmatched``: metric -> why the control cannot be built for that metric's Top-K."""

    name: str
    fn: ControlFn
    nested: bool
    help: str
    unmatched: dict[str, str] = field(default_factory=dict)


CONTROLS: Registry[Control] = Registry("control")


def control_kind(name: str, *, nested: bool, help: str, aliases: tuple[str, ...] = (),
                 unmatched: dict[str, str] | None = None) -> Callable[[ControlFn], ControlFn]:
    """Register the decorated function as control ``name`` (a duplicate name is an error);
    ``unmatched``: the metrics whose Top-K it cannot be built for, each with the reason."""
    def deco(fn: ControlFn) -> ControlFn:
        CONTROLS.add(name, Control(name, fn, nested, help, dict(unmatched or {})), aliases)
        return fn
    return deco


def unmatched_controls(metric: str, names: tuple[str, ...]) -> dict[str, str]:
    """The controls of ``names`` that cannot be built for ``metric``'s Top-K, each with the reason
    (a single-metric run refuses them; a run of several metrics skips them for that metric only)."""
    return {c: CONTROLS[c].unmatched[metric] for c in names if metric in CONTROLS[c].unmatched}


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
def random_k(scores, names, k, mode, top, rng, ctx) -> Selection:
    shape = shapes(scores, ctx.split)  # the draws depend on the sizes only: the same on every rank
    if mode == "per_row":  # per row: the k smallest of uniform keys, the Top-K's keys set beyond reach
        indices = {}
        for n in names:
            axis = ctx.in_axes.get(n)
            keys = torch.from_numpy(rng.random(size=math.prod(shape[n]), dtype=np.float32))
            keys[top.indices[n]] = 2.0
            indices[n] = flat_indices(shape[n], axis, row_extreme_k(keys.reshape(shape[n]), axis, k, largest=False))
        return Selection("random_k", indices, gather(scores, indices, ctx.split), row_k=k)
    if mode == "per_layer":
        indices = {n: sample_excluding(math.prod(shape[n]), k, top.indices[n], rng) for n in names}
    else:
        sizes = torch.tensor([math.prod(shape[n]) for n in names], dtype=torch.long)
        starts = torch.cumsum(sizes, 0) - sizes
        excl = torch.cat([top.indices[n] + starts[i] for i, n in enumerate(names) if n in top.indices])
        offsets = sample_excluding(int(sizes.sum()), k, excl, rng)
        tid = torch.searchsorted(starts, offsets, right=True) - 1
        indices = {n: (offsets[tid == i] - starts[i]).sort().values for i, n in enumerate(names)}
    return Selection("random_k", indices, gather(scores, indices, ctx.split))


@control_kind("bottom_k", nested=True, aliases=("bottom",),
              help="the k lowest scores among the weights the perturbation changes (no exact zeros under zero, "
                   "sign_flip, gauss_noise)")
def bottom_k(scores, names, k, mode, top, rng, ctx) -> Selection:
    def eligible_only(name: str, flat: torch.Tensor) -> torch.Tensor:
        if not ctx.zeros_unchanged:
            return flat
        w = ctx.weights[name].reshape(-1).to(flat.device)
        return flat.masked_fill(w == 0, float("inf"))  # never among the k lowest while enough others exist

    if ctx.split is not None:  # each rank proposes its rows' lowest eligible scores; merged exactly
        indices, values = sharded.select(scores, ctx.split.shards, names, k, mode, False, ctx.in_axes,
                                         ctx.split.exchange, eligible_only)
        _check_bottom(values, k, mode)
        return Selection("bottom_k", indices, gather(scores, indices, ctx.split), row_k=k if mode == "per_row" else 0)
    if mode == "per_row":
        indices = {}
        for n in names:
            flat = eligible_only(n, scores[n].reshape(-1))
            axis, shape = ctx.in_axes.get(n), tuple(scores[n].shape)
            indices[n] = flat_indices(shape, axis, row_extreme_k(flat.reshape(shape), axis, k, largest=False))
        _check_bottom({n: eligible_only(n, scores[n].reshape(-1))[i.to(scores[n].device)] for n, i in indices.items()},
                      k, mode)
        return Selection("bottom_k", indices, gather(scores, indices), row_k=k)
    if mode == "per_layer":
        indices = {n: extreme_k(eligible_only(n, scores[n].reshape(-1)), k, largest=False).cpu() for n in names}
    else:
        indices = merge_global(scores, names, k, largest=False, view=eligible_only)
    _check_bottom({n: eligible_only(n, scores[n].reshape(-1))[i.to(scores[n].device)] for n, i in indices.items()},
                  k, mode)
    return Selection("bottom_k", indices, gather(scores, indices))


def _check_bottom(values: dict[str, torch.Tensor], k: int, mode: str) -> None:
    """A bottom_k that had to take a weight the perturbation does not change (an exact zero, scored
    ``inf`` by the eligibility view) is degenerate: a usage error naming the tensor."""
    if mode == "global":
        if sum(len(v) for v in values.values()) < k or any(torch.isinf(v).any() for v in values.values()):
            raise UsageError(f"bottom_k is degenerate: fewer than {k} weights the perturbation changes; lower "
                             "--topk or drop bottom_k from --controls")
        return
    for n, v in values.items():
        if torch.isinf(v).any():
            where = f"a row of {n} has" if mode == "per_row" else f"{n} has"
            raise UsageError(f"bottom_k is degenerate: {where} fewer than {k} weights the perturbation changes "
                             "(the rest are exact zeros); lower --topk or drop bottom_k from --controls")


NEIGHBOURS = 4  # random_mag_k draws among this many nearest free |w| ranks


@control_kind("random_mag_k", nested=False, aliases=("random_mag", "magnitude_matched"),
              help="for each Top-K weight a random weight of the same tensor with nearly the same |w| (one of the "
                   f"{NEIGHBOURS} nearest free |w| ranks), disjoint from the Top-K",
              unmatched={"magnitude": "the magnitude Top-K is the largest |w| of every tensor (every row under "
                                      "per_row) it takes weights from, so no weight left outside it has as large a "
                                      "|w|: it cannot be matched by construction"})
def random_mag_k(scores, names, k, mode, top, rng, ctx) -> Selection:
    indices = {}
    for n in names:
        mine = top.indices.get(n, torch.zeros(0, dtype=torch.int64))
        if mode == "per_row":  # matched within each row: the row's |w| ranking, the row's Top-K
            indices[n] = per_row_matched(ctx.weight(n), ctx.in_axes.get(n), mine.reshape(-1, k), rng, n)
        else:
            indices[n] = magnitude_matched(ctx.weight(n), mine, rng, n) if len(mine) else mine.clone()
    return Selection("random_mag_k", indices, gather(scores, indices, ctx.split),
                     row_k=k if mode == "per_row" else 0)


def per_row_matched(weight: torch.Tensor, in_axis: int | None, top: torch.Tensor, rng: np.random.Generator,
                    name: str) -> torch.Tensor:
    """:func:`magnitude_matched` row by row; ``top`` ``[rows, k]`` flat indices; returns ``[rows, k]``
    flattened, each row's draws sorted."""
    shape = tuple(weight.shape)
    pos = as_rows(torch.arange(weight.numel()).reshape(shape), in_axis)  # flat index of each (row, column)
    rows = as_rows(weight.detach(), in_axis)
    col_of = torch.empty(weight.numel(), dtype=torch.int64)
    col_of[pos.reshape(-1)] = torch.arange(pos.shape[1]).repeat(pos.shape[0])
    out = [pos[r][magnitude_matched(rows[r], col_of[top[r]], rng, name)] for r in range(len(top))]
    return torch.cat(out)


def magnitude_matched(weight: torch.Tensor, chosen: torch.Tensor, rng: np.random.Generator, name: str
                      ) -> torch.Tensor:
    """One weight per index of ``chosen`` (flat, int64), each drawn among the ``NEIGHBOURS`` nearest ranks
    of |w| not in ``chosen`` nor drawn before; sorted flat indices.  O(numel) for the ranking, O(k) Python."""
    order = torch.argsort(weight.detach().reshape(-1).abs().float().cpu(), stable=True)
    n = order.numel()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    taken = set(chosen.tolist())
    out = []
    for r in rank[chosen].tolist():
        near, d = [], 1
        while len(near) < NEIGHBOURS and (r - d >= 0 or r + d < n):
            for q in (r - d, r + d):
                if 0 <= q < n and int(order[q]) not in taken:
                    near.append(int(order[q]))
            d += 1
        if not near:
            raise UsageError(f"random_mag_k is degenerate: {name} has no weight left outside the Top-K")
        pick = near[int(rng.integers(len(near)))]
        taken.add(pick)
        out.append(pick)
    return torch.tensor(sorted(out), dtype=torch.int64)


def control(name: str, scores, names, k, mode, top: Selection, rng: np.random.Generator,
            ctx: ControlContext | None = None) -> Selection:
    """Control ``name`` of ``top`` (``ctx``: weights and eligibility; default none)."""
    return CONTROLS[name].fn(scores, names, k, mode, top, rng, ctx or ControlContext())
