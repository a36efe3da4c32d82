"""esa.experiment.perturb.perturbed: exactly the selected weights change, and the model is restored bit-exactly."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from esa.experiment.perturb import PERTURBATIONS, Perturbation, perturbed
from esa.experiment.selection import Selection
from esa.model.targets import find_targets

pytestmark = pytest.mark.usefixtures("single_thread")

SELECTED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight")


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def make_selection(model, per_tensor: int = 20, seed: int = 0, names=SELECTED) -> Selection:
    params = dict(model.named_parameters())
    rng = np.random.default_rng(seed)
    idx = {n: torch.from_numpy(rng.choice(params[n].numel(), per_tensor, replace=False)).long() for n in names}
    scores = {n: torch.ones(per_tensor) for n in names}
    return Selection("top_k", idx, scores)


def selected_mask(model, sel: Selection) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        m = torch.zeros(p.numel(), dtype=torch.bool)
        if n in sel.indices:
            m[sel.indices[n]] = True
        out[n] = m.view(p.shape)
    return out


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise "not bit-identical" (so -0.0 vs 0.0 counts as a change)."""
    ia = a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.contiguous().view(torch.int16 if b.element_size() == 2 else torch.int32)
    return ia != ib


@pytest.fixture
def setup(llama):
    targets = {t.name: t for t in find_targets(llama)}
    return llama, targets


@pytest.mark.parametrize("kind,scale", [("zero", 1.0), ("sign_flip", 1.0), ("sign_flip", 0.5),
                                        ("gauss_noise", 0.5), ("gauss_noise", 2.0)])
def test_only_selected_weights_change(setup, kind, scale):
    model, targets = setup
    sel = make_selection(model)
    before = snapshot(model)
    h0 = state_hash(model)
    mask = selected_mask(model, sel)
    with perturbed(targets, sel, kind, scale, 1.0, torch.Generator().manual_seed(0)) as info:
        assert info == {"n_selected": 60, "n_perturbed": 60, "n_changed": 60}
        n_changed = 0
        for n, p in model.named_parameters():
            changed = p != before[n]
            assert torch.equal(changed, mask[n]), (kind, n)
            n_changed += int(changed.sum())
            old, new = before[n][mask[n]], p.detach()[mask[n]]
            if kind == "zero":
                assert torch.equal(new, torch.zeros_like(new))
            elif kind == "sign_flip" and scale == 1.0:
                assert torch.equal(new, -old)
            elif kind == "sign_flip":
                torch.testing.assert_close(new, -scale * old, rtol=1e-6, atol=0)
        assert n_changed == 60
        # the tied lm_head sees the same perturbation
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        assert not torch.equal(model.lm_head.weight, before["model.embed_tokens.weight"])
    assert state_hash(model) == h0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_gauss_noise_seeded(setup):
    model, targets = setup
    sel = make_selection(model)
    name = SELECTED[1]

    def draw(seed):
        with perturbed(targets, sel, "gauss_noise", 0.3, 1.0, torch.Generator().manual_seed(seed)):
            return dict(model.named_parameters())[name].detach().clone()

    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gauss_noise_std_proportional_to_abs_weight(llama):
    """(new - w) / (scale |w|) must be standard normal: mean 0, std 1, for tiny and large |w| alike."""
    targets = {t.name: t for t in find_targets(llama)}
    name = "model.layers.0.mlp.up_proj.weight"  # 512 weights
    p = dict(llama.named_parameters())[name]
    with torch.no_grad():  # a wide range of magnitudes: 1e-3 .. 1e2
        p.copy_(torch.logspace(-3, 2, p.numel()).view(p.shape) * torch.where(torch.arange(p.numel()) % 2 == 0, 1, -1)
                .view(p.shape))
    before = p.detach().clone()
    sel = Selection("top_k", {name: torch.arange(p.numel())}, {name: torch.ones(p.numel())})
    scale = 0.25
    with perturbed(targets, sel, "gauss_noise", scale, 1.0, torch.Generator().manual_seed(0)):
        z = ((p.detach().double() - before.double()) / (scale * before.double().abs())).view(-1)
    assert abs(float(z.mean())) < 0.2
    assert 0.85 < float(z.std()) < 1.15
    # no magnitude dependence: small and large halves have the same spread
    lo, hi = z[: len(z) // 2], z[len(z) // 2:]
    assert 0.75 < float(lo.std() / hi.std()) < 1.33
    assert torch.equal(p, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,scale", [("zero", 1.0), ("sign_flip", 0.5), ("gauss_noise", 1.0)])
def test_restore_is_bit_exact(setup, dtype, kind, scale):
    model, _ = setup
    model.to(dtype)
    targets = {t.name: t for t in find_targets(model)}
    sel = make_selection(model, per_tensor=40)
    # include -0.0 entries: zeroing them writes +0.0, which compares equal but is a different bit pattern
    with torch.no_grad():
        targets[SELECTED[1]].param.view(-1)[sel.indices[SELECTED[1]][:5]] = -0.0
    h0 = state_hash(model)
    before = snapshot(model)
    with perturbed(targets, sel, kind, scale, 1.0, torch.Generator().manual_seed(1)):
        assert state_hash(model) != h0
        for n, p in model.named_parameters():
            assert p.dtype == dtype
            assert not (bits_differ(p.detach(), before[n]) & ~selected_mask(model, sel)[n]).any()
    assert state_hash(model) == h0


def test_restore_on_exception_inside_block(setup):
    model, targets = setup
    sel = make_selection(model)
    h0 = state_hash(model)
    with pytest.raises(KeyError, match="boom"):
        with perturbed(targets, sel, "sign_flip", 1.0, 1.0, torch.Generator().manual_seed(0)):
            assert state_hash(model) != h0
            raise KeyError("boom")
    assert state_hash(model) == h0


def test_restore_when_perturbation_itself_fails(setup):
    """A failure while writing the second tensor must still restore the first one."""
    model, targets = setup
    sel = make_selection(model)
    h0 = state_hash(model)
    calls = []

    def flaky(values, scale, gen):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("perturbation failed")
        return values * 3.0

    with PERTURBATIONS.temporary("flaky", Perturbation("flaky", flaky, "test", changes_zero=True)), \
            pytest.raises(ValueError, match="perturbation failed"), \
            perturbed(targets, sel, "flaky", 1.0, 1.0, torch.Generator().manual_seed(0)):
        pass  # pragma: no cover - never reached
    assert "flaky" not in PERTURBATIONS
    assert len(calls) == 2
    assert state_hash(model) == h0


def test_perturb_prob_half(setup):
    model, targets = setup
    sel = make_selection(model, per_tensor=200)
    before = snapshot(model)
    h0 = state_hash(model)
    mask = selected_mask(model, sel)

    def run(seed):
        with perturbed(targets, sel, "sign_flip", 1.0, 0.5, torch.Generator().manual_seed(seed)) as info:
            changed = {n: (p != before[n]) for n, p in model.named_parameters()}
        return info, changed

    info, changed = run(0)
    n_changed = sum(int(c.sum()) for c in changed.values())
    assert info["n_selected"] == 600
    assert info["n_perturbed"] == info["n_changed"] == n_changed
    assert abs(n_changed - 300) < 4 * (600 * 0.25) ** 0.5  # binomial(600, 0.5), 4 sigma
    for n, c in changed.items():
        assert not (c & ~mask[n]).any()  # only selected weights may change
    info2, changed2 = run(0)
    assert info2 == info
    assert all(torch.equal(changed[n], changed2[n]) for n in changed)
    _, changed3 = run(1)
    assert any(not torch.equal(changed[n], changed3[n]) for n in changed)
    assert state_hash(model) == h0


def test_empty_selection_is_noop(setup):
    model, targets = setup
    sel = Selection("top_k", {SELECTED[0]: torch.tensor([], dtype=torch.long)}, {SELECTED[0]: torch.tensor([])})
    h0 = state_hash(model)
    with perturbed(targets, sel, "zero", 1.0, 1.0, torch.Generator().manual_seed(0)) as info:
        assert info == {"n_selected": 0, "n_perturbed": 0, "n_changed": 0}
        assert state_hash(model) == h0
    assert state_hash(model) == h0


def test_unknown_perturbation(setup):
    model, targets = setup
    sel = make_selection(model)
    h0 = state_hash(model)
    with pytest.raises(KeyError, match="unknown perturbation .no_such_perturbation.; registered: zero"):
        with perturbed(targets, sel, "no_such_perturbation", 1.0, 1.0, torch.Generator().manual_seed(0)):
            pass  # pragma: no cover
    assert state_hash(model) == h0


def test_perturbation_changes_model_output(gpt2, windows):
    """Perturbing a GPT-2 Conv1D weight changes the logits; leaving the block restores them exactly."""
    targets = {t.name: t for t in find_targets(gpt2)}
    name = "transformer.h.0.mlp.c_fc.weight"
    sel = Selection("top_k", {name: torch.arange(0, 1024, 7)}, {name: torch.ones(147)})
    with torch.no_grad():
        ref = gpt2(input_ids=windows, use_cache=False).logits
        with perturbed(targets, sel, "zero", 1.0, 1.0, torch.Generator().manual_seed(0)):
            pert = gpt2(input_ids=windows, use_cache=False).logits
            w = gpt2.transformer.h[0].mlp.c_fc.weight.view(-1)
            assert (w[torch.arange(0, 1024, 7)] == 0).all()
        after = gpt2(input_ids=windows, use_cache=False).logits
    assert not torch.allclose(ref, pert)
    assert torch.equal(ref, after)


def test_zero_valued_weights_are_reported_as_unchanged(setup):
    """A control made of exact zeros must show up as a no-op (n_changed), not as a robust weight."""
    model, targets = setup
    sel = make_selection(model)
    name, idx = next(iter(sel.indices.items()))
    with torch.no_grad():
        targets[name].param.view(-1)[idx[:3]] = 0.0
    for kind in ("zero", "sign_flip"):
        with perturbed(targets, sel, kind, 1.0, 1.0, torch.Generator().manual_seed(0)) as info:
            assert info["n_perturbed"] == 60 and info["n_changed"] == 57, kind


INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("dtype,bit", [(torch.float32, None), (torch.float32, 31), (torch.float32, 0),
                                       (torch.bfloat16, None), (torch.bfloat16, 15), (torch.bfloat16, 3),
                                       (torch.float16, None), (torch.float16, 10)])
def test_bit_flip_changes_exactly_one_bit_of_exactly_the_selected_weights(llama, dtype, bit):
    model = llama.to(dtype)
    targets = {t.name: t for t in find_targets(model)}
    sel = make_selection(model)
    before = snapshot(model)
    h0 = state_hash(model)
    expected_bit = {torch.float32: 30, torch.bfloat16: 14, torch.float16: 14}[dtype] if bit is None else bit
    with perturbed(targets, sel, "bit_flip", 1.0, 1.0, torch.Generator().manual_seed(0), bit) as info:
        assert info["n_perturbed"] == 60
        for n, p in model.named_parameters():
            xor = p.detach().view(INT[dtype]) ^ before[n].view(INT[dtype])
            mask = selected_mask(model, sel)[n]
            assert not xor[~mask].any(), n  # nothing else changed
            if mask.any():
                flipped = xor[mask].long() & ((1 << torch.finfo(dtype).bits) - 1)  # as unsigned
                assert (flipped == (1 << expected_bit)).all(), n  # exactly the chosen bit
    assert state_hash(model) == h0  # identical bytes after restore, even where the flip made inf/NaN


def test_bit_flip_to_inf_and_nan_restores_identical_bytes(llama):
    model = llama.to(torch.bfloat16)
    targets = {t.name: t for t in find_targets(model)}
    name = SELECTED[1]
    flat = targets[name].param.data.view(-1)
    flat[:4] = torch.tensor([1.5, -2.0, 0.0, 3.0], dtype=torch.bfloat16)  # 1.5 with bit 14 -> huge/inf
    sel = Selection("top_k", {name: torch.arange(4)}, {name: torch.ones(4)})
    h0 = state_hash(model)
    for bit in (14, 15, 7):
        with perturbed(targets, sel, "bit_flip", 1.0, 1.0, torch.Generator().manual_seed(0), bit):
            pass
        assert state_hash(model) == h0


def test_bit_flip_prob_is_seeded_and_counted(llama):
    targets = {t.name: t for t in find_targets(llama)}
    sel = make_selection(llama, per_tensor=200)
    before = snapshot(llama)

    def flipped(seed):
        with perturbed(targets, sel, "bit_flip", 1.0, 0.25, torch.Generator().manual_seed(seed)) as info:
            n = sum(int(bits_differ(p.detach(), before[k]).sum()) for k, p in llama.named_parameters())
        return info["n_perturbed"], n

    a, b, c = flipped(0), flipped(0), flipped(1)
    assert a == b and a[0] == a[1] and a != c
    assert abs(a[0] - 150) < 4 * (600 * 0.25 * 0.75) ** 0.5  # binomial(600, 0.25)


def test_bit_index_out_of_range_is_a_usage_error(llama):
    from esa.errors import UsageError
    from esa.experiment.perturb import resolve_bit

    assert resolve_bit(torch.float32, None) == 30 and resolve_bit(torch.bfloat16, None) == 14
    with pytest.raises(UsageError, match="out of range"):
        resolve_bit(torch.float16, 16)
