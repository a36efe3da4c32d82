"""esa.metrics.compute_scores against brute-force references computed a different way.

References run on a float64 deep copy of the model and never call esa code: central finite
differences and ``torch.autograd.grad`` on a hand-written mean token NLL for the gradient metrics,
forward pre-hooks that store every module input for ``act_mag``.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from esa.metrics import compute_scores
from esa.model.targets import find_targets
from tests.conftest import MODEL_FACTORIES, mean_token_nll64, to_double, window_gradients

pytestmark = pytest.mark.usefixtures("single_thread")

METRICS = ("grad_x_weight", "grad_squared", "magnitude", "act_mag")


def _params64(model64: torch.nn.Module, targets) -> list[torch.Tensor]:
    p64 = dict(model64.named_parameters())
    return [p64[t.name] for t in targets]


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- grad_x_weight

def _fd_entries(targets, windows, seed=0):
    """(target, flat index) pairs: 3 random entries per tensor plus chosen embedding rows."""
    rng = np.random.default_rng(seed)
    out = []
    for t in targets:
        for i in rng.choice(t.numel, size=3, replace=False):
            out.append((t, int(i)))
    present = set(windows.flatten().tolist())
    absent = min(set(range(64)) - present)
    emb = targets[0]  # the tied token embedding comes first in both models
    dim = emb.shape[1]
    out.append((emb, int(windows[0, 0]) * dim + 3))  # row of a token that is read (both uses)
    out.append((emb, int(windows[2, 5]) * dim + 7))
    out.append((emb, absent * dim + 1))  # row of a token never read: only the lm_head use
    return out


def test_grad_x_weight_matches_central_finite_differences(tiny_model, windows):
    targets = find_targets(tiny_model)
    scores = compute_scores("grad_x_weight", tiny_model, targets, windows, 4)
    model64 = to_double(tiny_model)
    p64 = dict(model64.named_parameters())
    h = 1e-5
    names = set()
    for t, i in _fd_entries(targets, windows):
        flat = p64[t.name].data.view(-1)
        w = float(flat[i])
        with torch.no_grad():
            flat[i] = w + h
            up = float(mean_token_nll64(model64, windows))
            flat[i] = w - h
            down = float(mean_token_nll64(model64, windows))
            flat[i] = w
        fd = (up - down) / (2 * h)
        expected = abs(w * fd)
        got = float(scores[t.name].view(-1)[i])
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-7), (t.name, i)
        names.add(t.name)
    assert len(names) == len(targets)


def test_grad_x_weight_full_tensors_match_autograd(tiny_model, windows):
    targets = find_targets(tiny_model)
    scores = compute_scores("grad_x_weight", tiny_model, targets, windows, 4)
    model64 = to_double(tiny_model)
    params = _params64(model64, targets)
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(mean_token_nll64(model64, windows), params)
    for t, p, g in zip(targets, params, grads):
        expected = (p.detach() * g).abs()
        assert expected.abs().max() > 1e-3  # the check is not vacuous
        torch.testing.assert_close(scores[t.name].double(), expected, rtol=1e-4, atol=1e-7, msg=t.name)


def test_grad_x_weight_tied_embedding_sums_both_uses(llama, windows):
    """The embedding's gradient must include the lm_head use (and vice versa)."""
    targets = find_targets(llama)
    score = compute_scores("grad_x_weight", llama, targets, windows, 6)["model.embed_tokens.weight"]
    model64 = to_double(llama)
    emb = model64.model.embed_tokens.weight
    # untie in the reference: a separate lm_head copy isolates the embedding-lookup use
    head = emb.detach().clone().requires_grad_(True)
    emb.requires_grad_(True)
    model64.lm_head.weight = torch.nn.Parameter(head)
    loss = mean_token_nll64(model64, windows)
    g_emb, g_head = torch.autograd.grad(loss, [emb, model64.lm_head.weight])
    both = (emb.detach() * (g_emb + g_head)).abs()
    torch.testing.assert_close(score.double(), both, rtol=1e-4, atol=1e-7)
    for partial in (g_emb, g_head):
        assert not torch.allclose(score.double(), (emb.detach() * partial).abs(), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("metric", ["grad_x_weight", "act_mag", "grad_squared"])
def test_batch_size_independence(tiny_model, windows, metric):
    targets = find_targets(tiny_model)
    ref = compute_scores(metric, tiny_model, targets, windows, 6)
    for bs in (1, 4):
        got = compute_scores(metric, tiny_model, targets, windows, bs)
        for t in targets:
            scale = float(ref[t.name].abs().max())
            torch.testing.assert_close(got[t.name], ref[t.name], rtol=1e-5, atol=1e-5 * scale,
                                       msg=f"{metric} batch {bs} {t.name}")


def test_grad_x_weight_repeatable(llama, windows):
    """A second call must not accumulate on top of the first one's gradients."""
    targets = find_targets(llama)
    a = compute_scores("grad_x_weight", llama, targets, windows, 4)
    b = compute_scores("grad_x_weight", llama, targets, windows, 4)
    for t in targets:
        torch.testing.assert_close(a[t.name], b[t.name], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- grad_squared

def test_grad_squared_matches_per_window_loop(tiny_model, windows):
    targets = find_targets(tiny_model)
    scores = compute_scores("grad_squared", tiny_model, targets, windows, 4)
    model64 = to_double(tiny_model)
    params = _params64(model64, targets)
    sq = [torch.zeros_like(p) for p in params]
    mean_g = [torch.zeros_like(p) for p in params]
    for grads in window_gradients(model64, params, windows):
        for acc, m, g in zip(sq, mean_g, grads):
            acc += g.square()
            m += g
    n = len(windows)
    for t, acc, m in zip(targets, sq, mean_g):
        expected = acc / n
        assert expected.max() > 1e-6
        torch.testing.assert_close(scores[t.name].double(), expected, rtol=1e-4, atol=1e-7 * float(expected.max()),
                                   msg=t.name)
        # squaring after averaging gives something clearly different: the test can tell them apart
        wrong = (m / n).square()
        assert (scores[t.name].double() - wrong).abs().max() > 0.1 * expected.max(), t.name


# ----------------------------------------------------------------------------- magnitude

def test_magnitude_is_abs_weight(tiny_model, windows):
    targets = find_targets(tiny_model)
    scores = compute_scores("magnitude", tiny_model, targets, windows, 4)
    assert set(scores) == {t.name for t in targets}
    params = dict(tiny_model.named_parameters())
    for t in targets:
        w = params[t.name].detach()
        assert (w < 0).any()
        assert torch.equal(scores[t.name], w.abs())


# ----------------------------------------------------------------------------- act_mag

def _act_mag_reference(model: torch.nn.Module, windows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Store every input of every Linear/Conv1D/Embedding, then compute Wanda scores in float64."""
    model64 = to_double(model)
    recorded: dict[str, list[torch.Tensor]] = {}
    modules = {}
    handles = []
    for mname, m in model64.named_modules():
        if type(m).__name__ in ("Linear", "Conv1D", "Embedding"):
            modules[mname] = m

            def pre_hook(module, args, mname=mname):
                recorded.setdefault(mname, []).append(args[0].detach().clone())

            handles.append(m.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            model64(input_ids=windows, use_cache=False)  # all windows in one call
    finally:
        for h in handles:
            h.remove()
    params = dict(model64.named_parameters())
    out = {}
    for name in names:
        p = params[name].detach()
        total = torch.zeros_like(p)
        n_uses = 0
        for mname, m in modules.items():
            if m.weight is not params[name]:
                continue
            n_uses += 1
            kind = type(m).__name__
            if kind == "Embedding":
                counts = Counter()
                for ids in recorded[mname]:
                    # every token of every window reads one row (position ids are broadcast over windows)
                    counts.update(ids.expand(windows.shape).flatten().tolist())
                norm = torch.tensor([float(counts[v]) ** 0.5 for v in range(p.shape[0])], dtype=torch.float64)
                total += p.abs() * norm[:, None]
            else:
                x = torch.cat([r.reshape(-1, r.shape[-1]) for r in recorded[mname]])
                norm = torch.linalg.vector_norm(x, dim=0)
                if kind == "Linear":  # [out, in]
                    total += p.abs() * norm[None, :]
                else:  # Conv1D [in, out]
                    total += p.abs() * norm[:, None]
        assert n_uses >= 1
        out[name] = total
    return out


@pytest.mark.parametrize("batch_size", [4, 6])
def test_act_mag_matches_recorded_inputs(tiny_model, windows, batch_size):
    targets = find_targets(tiny_model)
    names = [t.name for t in targets]
    scores = compute_scores("act_mag", tiny_model, targets, windows, batch_size)
    expected = _act_mag_reference(tiny_model, windows, names)
    for n in names:
        torch.testing.assert_close(scores[n].double(), expected[n], rtol=1e-5, atol=1e-6, msg=n)


def test_act_mag_tied_weight_is_sum_of_uses(llama, windows):
    targets = find_targets(llama)
    score = compute_scores("act_mag", llama, targets, windows, 4)["model.embed_tokens.weight"].double()
    w = llama.model.embed_tokens.weight.detach().double().abs()
    counts = Counter(windows.flatten().tolist())
    emb_part = w * torch.tensor([counts[v] ** 0.5 for v in range(64)], dtype=torch.float64)[:, None]
    hidden = []
    handle = llama.lm_head.register_forward_pre_hook(lambda m, a: hidden.append(a[0].detach().double()))
    try:
        with torch.no_grad():
            llama(input_ids=windows, use_cache=False)
    finally:
        handle.remove()
    head_norm = torch.linalg.vector_norm(hidden[0].reshape(-1, 16), dim=0)
    head_part = w * head_norm[None, :]
    torch.testing.assert_close(score, emb_part + head_part, rtol=1e-5, atol=1e-6)
    # rows of tokens absent from the windows only get the lm_head part
    absent = sorted(set(range(64)) - set(counts))
    assert absent
    torch.testing.assert_close(score[absent], head_part[absent], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(score, head_part) and not torch.allclose(score, emb_part)


def test_act_mag_gpt2_conv1d_uses_input_axis_0(gpt2, windows):
    targets = find_targets(gpt2)
    score = compute_scores("act_mag", gpt2, targets, windows, 4)["transformer.h.1.mlp.c_fc.weight"].double()
    module = gpt2.transformer.h[1].mlp.c_fc
    xs = []
    handle = module.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().double()))
    try:
        with torch.no_grad():
            gpt2(input_ids=windows, use_cache=False)
    finally:
        handle.remove()
    x = xs[0].reshape(-1, 16)
    W = module.weight.detach().double()  # [in=16, out=64]
    for i, o in [(0, 0), (3, 17), (15, 63), (7, 40)]:
        expected = abs(float(W[i, o])) * float(torch.sqrt((x[:, i] ** 2).sum()))
        assert float(score[i, o]) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- dtype and state

@pytest.mark.parametrize("metric", METRICS)
def test_scores_fp32_for_bf16_model(tiny_model, windows, metric):
    model = tiny_model.to(torch.bfloat16)
    targets = find_targets(model)
    scores = compute_scores(metric, model, targets, windows, 4)
    assert set(scores) == {t.name for t in targets}
    for t in targets:
        s = scores[t.name]
        assert s.dtype == torch.float32
        assert s.shape == t.param.shape
        assert torch.isfinite(s).all()
        assert (s > 0).any()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("metric", METRICS)
def test_model_state_untouched_after_scoring(tiny_model, windows, metric):
    before = _state_hash(tiny_model)
    targets = find_targets(tiny_model)
    compute_scores(metric, tiny_model, targets, windows, 4)
    assert not any(m.training for m in tiny_model.modules())
    for name, p in tiny_model.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
    assert _state_hash(tiny_model) == before
    # no hook left behind: a plain forward must not touch esa state
    for m in tiny_model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    for t in targets:
        assert not t.param._post_accumulate_grad_hooks


def test_refuses_training_mode(llama, windows):
    llama.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        compute_scores("grad_x_weight", llama, find_targets(llama), windows, 4)


@pytest.mark.parametrize("metric", ["no_such_metric", "hessian"])
def test_unknown_metric(llama, windows, metric):
    with pytest.raises(KeyError, match="registered: .*grad_x_weight"):  # aliases are the CLI's business
        compute_scores(metric, llama, find_targets(llama), windows, 4)


def test_subset_of_targets_only(llama, windows):
    """Scoring a filtered subset gives the same values as scoring everything."""
    all_targets = find_targets(llama)
    sub = find_targets(llama, include=("mlp",))
    full = compute_scores("grad_x_weight", llama, all_targets, windows, 4)
    part = compute_scores("grad_x_weight", llama, sub, windows, 4)
    assert set(part) == {t.name for t in sub}
    for t in sub:
        torch.testing.assert_close(part[t.name], full[t.name], rtol=1e-5, atol=1e-8)


def test_factories_are_deterministic():
    for make in MODEL_FACTORIES.values():
        assert _state_hash(make()) == _state_hash(make())
