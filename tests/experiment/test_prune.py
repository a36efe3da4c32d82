"""Pruning masks against brute-force loops: per row, N:M, per group with ties, random counts, the
bit packing, and the per-forward swap that leaves the model bit-exact."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from esa.experiment.prune import Level, group_masks, pack, pruned, random_masks, removed, rows_mask, score_masks, unpack
from esa.experiment.pruning import magnitude_score
from esa.model.targets import find_targets
from esa.model.weight_inputs import read_layouts
from tests.conftest import make_gpt2, make_llama
from tests.experiment.test_quantize import state_hash


def brute_rows(x: torch.Tensor, count: int) -> torch.Tensor:
    """Each row's `count` lowest entries removed (ties: lower position first), by a Python loop."""
    out = torch.zeros(x.shape, dtype=torch.bool)
    for r in range(x.shape[0]):
        order = sorted(range(x.shape[1]), key=lambda j: (float(x[r, j]), j))
        for j in order[:count]:
            out[r, j] = True
    return out


def brute_nm(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Of every m consecutive entries of a row, the m - n lowest removed (ties: lower position first)."""
    out = torch.zeros(x.shape, dtype=torch.bool)
    for r in range(x.shape[0]):
        for g in range(0, x.shape[1], m):
            order = sorted(range(g, g + m), key=lambda j: (float(x[r, j]), j))
            for j in order[:m - n]:
                out[r, j] = True
    return out


@pytest.mark.parametrize("shape", [(3, 5), (1, 8), (7, 9)])
def test_pack_round_trips(shape):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.4
    p = pack(m)
    assert p.dtype == torch.uint8 and p.numel() == math.ceil(m.numel() / 8)
    assert torch.equal(unpack(p, shape), m)
    assert removed({"a": p}) == int(m.sum())


def test_rows_mask_matches_a_loop_with_ties():
    # integer scores: many ties, so the tie rule is tested too
    x = torch.randint(0, 4, (6, 12), generator=torch.Generator().manual_seed(1)).float()
    levels = [Level.of("0.3"), Level.of("0.5"), Level.of("2:4"), Level.of("1:3")]
    masks = rows_mask(x, levels)
    assert torch.equal(masks[0], brute_rows(x, 3))  # floor(0.3 * 12) = 3
    assert torch.equal(masks[1], brute_rows(x, 6))
    assert torch.equal(masks[2], brute_nm(x, 2, 4))
    assert torch.equal(masks[3], brute_nm(x, 1, 3))


def test_counts_are_exact_floors_of_the_typed_fraction():
    assert Level.of("0.7").count(10) == 7 and Level.of("0.3").count(10) == 3  # no 6.9999 / 3.0000001
    assert Level.of("0.29").count(100) == 29 and Level.of("0.5").count(7) == 3
    assert Level.of("2:4").count(16) == 8 and Level.of("2:4").fraction is None
    assert Level.of("0.5").fraction == Fraction(1, 2)


def brute_group(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k lowest of all entries (ties: earlier tensor, then lower flat index), by sorting tuples."""
    entries = sorted((float(v) + 0.0, i, j) for i, t in enumerate(tensors) for j, v in enumerate(t.reshape(-1)))
    out = [torch.zeros(t.numel(), dtype=torch.bool) for t in tensors]
    for _, i, j in entries[:k]:
        out[i][j] = True
    return [o.reshape(t.shape) for o, t in zip(out, tensors)]


@pytest.mark.parametrize("k", [0, 1, 7, 20, 39, 40])
def test_group_masks_match_a_sort_with_ties_and_signs(k):
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-3, 3, (4, 5), generator=g).float()
    a[0, 0] = -0.0  # -0.0 ranks equal to +0.0
    b = torch.randn(20, generator=g)
    b[:5] = 1.0
    got = group_masks(["a", "b"], {"a": a, "b": b}.__getitem__, k)
    want = brute_group([a, b], k)
    assert torch.equal(got["a"], want[0]) and torch.equal(got["b"], want[1])
    assert int(got["a"].sum() + got["b"].sum()) == k


def test_group_masks_reject_nan():
    with pytest.raises(ValueError, match="NaN"):
        group_masks(["a"], {"a": torch.tensor([1.0, math.nan])}.__getitem__, 1)


def targets_of(model):
    return [t for t in read_layouts(model, find_targets(model)) if t.param.ndim == 2
            and not any(u.kind == "embedding" for u in t.uses)]


def test_magnitude_per_row_half_matches_a_brute_force_mask_on_conv1d_and_linear():
    for model in (make_llama(0), make_gpt2(0)):
        targets = targets_of(model)
        by_name = {t.name: t for t in targets}
        masks = score_masks(targets, lambda n, b=by_name: magnitude_score(b[n]), "per_row", [Level.of("0.5")])["0.5"]
        for t in targets:
            w = t.param.detach().abs()
            rows = w.t() if t.axis("in") == 0 else w  # an HF Conv1D stores [in, out]: a row is a column
            want = brute_rows(rows, rows.shape[1] // 2)
            want = want.t() if t.axis("in") == 0 else want
            assert torch.equal(unpack(masks[t.name], t.shape), want), t.name


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_group_modes_match_a_brute_force_mask(mode):
    model = make_llama(1)
    targets = targets_of(model)
    score = {t.name: t.param.detach().float().abs() for t in targets}
    masks = score_masks(targets, score.__getitem__, mode, [Level.of("0.3"), Level.of("2:4")])
    groups = [[t] for t in targets] if mode == "per_layer" else [targets]
    for grp in groups:
        want = brute_group([score[t.name] for t in grp], math.floor(Fraction("0.3") * sum(t.numel for t in grp)))
        for t, w in zip(grp, want):
            assert torch.equal(unpack(masks["0.3"][t.name], t.shape), w)
    for t in targets:  # N:M is per row whatever the mode
        assert torch.equal(unpack(masks["2:4"][t.name], t.shape), brute_nm(score[t.name], 2, 4))


@pytest.mark.parametrize("mode", ["per_row", "per_layer", "global"])
def test_random_masks_remove_the_same_counts_per_group(mode):
    model = make_llama(2)
    targets = targets_of(model)
    lv = Level.of("0.5")

    def draw():
        return random_masks(targets, mode, lv, torch.Generator().manual_seed(5), np.random.default_rng(5))

    masks = draw()
    unpacked = {t.name: unpack(masks[t.name], t.shape) for t in targets}
    if mode == "per_row":
        assert all((unpacked[t.name].sum(dim=1) == t.shape[1] // 2).all() for t in targets)
    elif mode == "per_layer":
        assert all(int(unpacked[t.name].sum()) == t.numel // 2 for t in targets)
    else:
        assert removed(masks) == sum(t.numel for t in targets) // 2
        assert len({int(m.sum()) * 1000 // m.numel() for m in unpacked.values()}) > 1  # counts differ per tensor
    assert all(torch.equal(a, b) for a, b in zip(masks.values(), draw().values()))  # its stream alone decides


def test_pruned_forward_equals_a_zeroed_copy_and_the_model_is_untouched():
    model = make_llama(3)
    targets = targets_of(model)
    score = {t.name: t.param.detach().float().abs() for t in targets}
    masks = score_masks(targets, score.__getitem__, "per_row", [Level.of("0.5")])["0.5"]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in masks:
                p[unpack(masks[name], tuple(p.shape))] = 0.0
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    before = state_hash(model)
    with torch.no_grad():
        plain = model(ids).logits
        with pruned(targets, masks):
            got = model(ids).logits
            assert state_hash(model) == before  # swapped per forward, never written
        assert torch.equal(got, ref(ids).logits) and not torch.equal(got, plain)
        module = targets[0].uses[0].module

        def fail(*_):
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"), pruned(targets, masks):
            h = module.register_forward_pre_hook(fail)  # runs after the swap: the forward dies swapped
            try:
                model(ids)
            finally:
                h.remove()
    assert state_hash(model) == before and torch.equal(model(ids).logits, plain)
