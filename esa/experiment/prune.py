"""Pruning masks: which weights a pruning condition removes, from any per-weight score.

A **level** is a sparsity fraction ``s`` or an N:M pattern.  For a fraction, the lowest-scoring
``floor(s · n)`` weights of each comparison group are removed (the count computed exactly from the
fraction as typed, as Wanda's ``int(n * s)``):

* ``per_row``: each output row (:mod:`esa.experiment.rows`: Wanda's group), ranked by a stable sort
  (ties: the lower input index is removed first);
* ``per_layer``: each tensor; ``global``: every pruned tensor together.  Both find the score of the
  ``k``-th lowest weight of the group by bisection on the float's bits (32 counting passes, no sorted
  copy of the group) and remove every weight below it plus the first tied ones in (tensor order,
  flat index) order, so exactly ``k`` weights go.

An **N:M** pattern keeps the N highest of every M consecutive input weights of each row (removing
the ``M - N`` lowest; ties: the lower input index is removed first), whatever ``--mode``.

Masks are bool tensors in the weight's own shape (True = removed), stored bit-packed on the CPU
(:func:`pack`, one bit per weight: 1/16 of a bf16 model per condition) and applied per forward
(:func:`pruned`, via :mod:`esa.experiment.swap`), so the stored model is never written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from esa.experiment.rows import as_rows, from_rows, row_length
from esa.experiment.swap import swapped
from esa.model.targets import Target

CHUNK = 1 << 22  # weights of one row chunk ranked at once (bounds the sort's temporaries)
BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)  # set bits of each byte


@dataclass(frozen=True)
class Level:
    """One amount of pruning: ``fraction`` (0 < s < 1, exact) or the pattern ``n``:``m`` (n < m)."""

    label: str  # "0.5" or "2:4": the group of its results rows
    fraction: Fraction | None = None
    n: int = 0
    m: int = 0

    @classmethod
    def of(cls, label: str) -> Level:
        """``"0.5"`` or ``"2:4"`` (already validated by the options' parsers)."""
        if ":" in label:
            n, m = label.split(":")
            return cls(label, None, int(n), int(m))
        return cls(label, Fraction(label))

    def count(self, size: int) -> int:
        """Weights removed of a group of ``size`` (a fraction's floor; N:M: ``size·(M-N)/M``)."""
        if self.fraction is None:
            return size // self.m * (self.m - self.n)
        return math.floor(self.fraction * size)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``mask`` (any shape, row-major) as uint8 ``[ceil(numel/8)]`` on the CPU, bit i of byte j =
    flat entry ``8j + i``."""
    flat = mask.reshape(-1).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * BITS).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse of :func:`pack`: the bool mask of ``shape`` on ``device``."""
    p = packed.to(device)
    bits = (p[:, None] & BITS.to(device)) != 0
    return bits.reshape(-1)[:math.prod(shape)].reshape(shape)


def rows_mask(rows: torch.Tensor, levels: list[Level]) -> list[torch.Tensor]:
    """Per level, the bool ``[rows, n_in]`` mask removing each row's lowest ``rows``: the fraction's
    count per row, or (N:M) the M-N lowest of every M consecutive entries.  ``rows``: any real dtype."""
    n_in = rows.shape[1]
    masks = [torch.zeros(rows.shape, dtype=torch.bool, device=rows.device) for _ in levels]
    per = max(1, CHUNK // max(1, n_in))
    for start in range(0, rows.shape[0], per):
        chunk = rows[start:start + per]
        order = None
        for mask, lv in zip(masks, levels):
            if lv.fraction is None:  # N:M: rank inside each group of M consecutive inputs
                g = torch.sort(chunk.reshape(chunk.shape[0], -1, lv.m), dim=2, stable=True).indices
                drop = torch.zeros(g.shape, dtype=torch.bool, device=g.device)
                drop.scatter_(2, g[:, :, :lv.m - lv.n], True)
                mask[start:start + per] = drop.reshape(chunk.shape)
            else:
                order = torch.sort(chunk, dim=1, stable=True).indices if order is None else order
                mask[start:start + per].scatter_(1, order[:, :lv.count(n_in)], True)
    return masks


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the fp32 values of ``x`` (-0.0 = +0.0); NaN is an error."""
    x = x.float() + 0.0  # -0.0 + 0.0 = +0.0: the two zeros rank as equal, as in a sort
    if torch.isnan(x).any():
        raise ValueError("a score is NaN: cannot rank weights for pruning")
    i = x.view(torch.int32)
    return i ^ ((i >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits (more negative, lower key)


def group_masks(names: list[str], score: Callable[[str], torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Bool masks (per name, in its score's shape) removing exactly the ``k`` lowest scores of the group
    ``names`` (ties: earlier tensor, then lower flat index); ``score(name)`` is called once per
    counting pass, so the group's scores need not all be alive at once."""
    if k <= 0:
        return {n: torch.zeros(score(n).shape, dtype=torch.bool) for n in names}

    def count(limit: int) -> int:
        return sum(int((order_keys(score(n)) <= limit).sum()) for n in names)

    lo, hi = -(2 ** 31), 2 ** 31 - 1
    while lo < hi:  # the smallest key with at least k weights at or below it: the k-th lowest score
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(mid) >= k else (mid + 1, hi)
    out, need = {}, k - (count(lo - 1) if lo > -(2 ** 31) else 0)
    for n in names:
        keys = order_keys(score(n))
        tied = keys == lo
        if need > 0:  # the first `need` tied weights in (tensor order, flat index) go too
            flat = tied.reshape(-1)
            chosen = flat & (flat.cumsum(0) <= need)
            need -= int(chosen.sum())
            out[n] = (keys < lo) | chosen.reshape(keys.shape)
        else:
            out[n] = keys < lo
    return out


def score_masks(targets: list[Target], score: Callable[[str], torch.Tensor], mode: str, levels: list[Level]
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Per level label, the packed mask (:func:`pack`) of every target, removing its lowest scores in
    the groups of ``mode`` (N:M levels: per row whatever the mode).  ``score(name)``: the fp32 score
    of a whole target in its shape."""
    out: dict[str, dict[str, torch.Tensor]] = {lv.label: {} for lv in levels}
    rowwise = [lv for lv in levels if lv.fraction is None or mode == "per_row"]
    for t in targets:
        if not rowwise:
            break
        s = score(t.name)
        for lv, m in zip(rowwise, rows_mask(as_rows(s, t.axis("in")), rowwise)):
            out[lv.label][t.name] = pack(from_rows(m, t.shape, t.axis("in")))
    for lv in (lv for lv in levels if lv not in rowwise):
        groups = [[t] for t in targets] if mode == "per_layer" else [targets]
        for g in groups:
            k = lv.count(sum(t.numel for t in g))
            for name, m in group_masks([t.name for t in g], score, k).items():
                out[lv.label][name] = pack(m)
    return out


def random_masks(targets: list[Target], mode: str, level: Level, gen: torch.Generator, rng: np.random.Generator
                 ) -> dict[str, torch.Tensor]:
    """The packed masks of the ``random`` control: as many weights per group as ``level`` removes
    there, drawn uniformly (per row / N:M group: float64 keys from ``gen``, lowest removed; per tensor:
    a permutation from ``gen``; global: the per-tensor counts from a multivariate hypergeometric draw of
    ``rng`` — a uniform subset of the whole group — then a permutation per tensor)."""
    if level.fraction is None or mode == "per_row":
        out = {}
        for t in targets:
            keys = torch.rand(t.shape, generator=gen, dtype=torch.float64)
            (m,) = rows_mask(as_rows(keys, t.axis("in")), [level])
            out[t.name] = pack(from_rows(m, t.shape, t.axis("in")))
        return out
    sizes = [t.numel for t in targets]
    if mode == "per_layer":
        counts = [level.count(n) for n in sizes]
    else:
        counts = rng.multivariate_hypergeometric(np.array(sizes, dtype=np.int64), level.count(sum(sizes)),
                                                 method="marginals").tolist()
    out = {}
    for t, n, c in zip(targets, sizes, counts):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=gen)[:c]] = True
        out[t.name] = pack(m)
    return out


def removed(masks: dict[str, torch.Tensor]) -> int:
    """Weights a set of packed masks removes."""
    return sum(int(POPCOUNT[p.long()].sum()) for p in masks.values())


def pruned(targets: Iterable[Target], masks: dict[str, torch.Tensor]) -> AbstractContextManager[None]:
    """Inside the block every forward reads each target with its masked weights set to exactly 0
    (the others bit-identical); the stored weights are never written."""
    def make(t: Target, w: torch.Tensor) -> torch.Tensor:
        return w.detach().masked_fill(unpack(masks[t.name], tuple(w.shape), w.device), 0)
    return swapped([t for t in targets if t.name in masks], make)


def divides_rows(targets: list[Target], m: int) -> str | None:
    """The first target whose rows M does not divide (as ``"name (n inputs per row)"``), or None."""
    for t in targets:
        n = row_length(t.shape, t.axis("in"))
        if n % m:
            return f"{t.name} ({n} inputs per row)"
    return None
