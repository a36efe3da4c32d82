"""Curvature metrics against exact Hessians computed by brute force on a tiny float64 model."""

from __future__ import annotations

import math

import pytest
import torch

from esa.metrics import MetricContext, compute_scores
from esa.model.targets import find_targets
from tests.conftest import make_llama, mean_token_nll64, to_double

INCLUDE = (r"layers\.0\.self_attn\.q_proj", r"layers\.1\.mlp\.down_proj")  # 256 + 512 weights


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def exact_hessian_block(model64, windows) -> torch.Tensor:
    """Hessian of the mean token NLL restricted to the INCLUDE weights, ``[P, P]`` float64."""
    params = [t.param for t in find_targets(model64, INCLUDE)]
    for p in params:
        p.requires_grad_(True)
    g = _flat(torch.autograd.grad(mean_token_nll64(model64, windows), params, create_graph=True))
    rows = [_flat(torch.autograd.grad(g[i], params, retain_graph=True)) for i in range(len(g))]
    return torch.stack(rows)


def exact_gauss_newton_diag(model64, windows) -> torch.Tensor:
    """(1/N) sum_t sum_y p_t(y) (d log p_t(y) / dw)^2 by enumerating every label y, float64."""
    params = [t.param for t in find_targets(model64, INCLUDE)]
    for p in params:
        p.requires_grad_(True)
    total, n = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(model64(input_ids=w[None]).logits[0, :-1].double(), dim=-1)  # [T, V]
        for t in range(logp.shape[0]):
            eye = torch.eye(logp.shape[1], dtype=logp.dtype)
            jac = torch.autograd.grad(logp[t], params, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
            jac = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)  # [V, P]
            total = total + (logp[t].exp().detach()[:, None] * jac.square()).sum(0)
            n += 1
    return total / n


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = make_llama()
    windows = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(7))
    model64 = to_double(model)
    model64.set_attn_implementation("eager")  # SDPA has no double backward; eager's fp32 softmax is ~1e-7
    return model, model64, windows, find_targets(model, INCLUDE)


def test_hutchinson_error_falls_like_inverse_sqrt_probes(setup, single_thread):
    model, model64, windows, targets = setup
    h = exact_hessian_block(model64, windows)
    diag = torch.diagonal(h)
    off = (h.square().sum() - diag.square().sum()).item()
    rows = []
    for probes in (1, 4, 16, 64):
        ctx = MetricContext(seed=0, hutchinson_samples=probes)
        score = _flat(compute_scores("hutchinson_diag", model, targets, windows, 2, ctx).values()).double()
        err = ((score - diag.abs()).norm() / diag.norm()).item()
        # E||est - diag||^2 = (1/probes) sum_{i != j} H_ij^2 exactly for Rademacher probes, and
        # | |est| - |diag| | <= |est - diag|, so this is an upper-bound expectation for the score.
        predicted = math.sqrt(off / (probes * diag.square().sum().item()))
        rows.append((probes, err, predicted))
    print("\nHutchinson relative error vs exact diagonal (tiny Llama, 768 weights):")
    for probes, err, predicted in rows:
        print(f"  probes={probes:>3}  error={err:.4f}  expected(rms)={predicted:.4f}")
    errs = {p: e for p, e, _ in rows}
    # Bound: 1.5x the exact root-mean-square error at 64 probes (the error is an average over 768
    # weights, so it concentrates around its rms; 1.5x leaves room for one unlucky seed).
    assert errs[64] <= 1.5 * rows[-1][2]
    assert errs[1] > 3 * errs[64]  # 1/sqrt(64) predicts a factor 8


def test_hutchinson_signed_stats_recorded(setup):
    model, _, windows, targets = setup
    ctx = MetricContext(seed=1, hutchinson_samples=2)
    compute_scores("hutchinson_diag", model, targets, windows, 2, ctx)
    s = ctx.extra_stats[targets[0].name]["signed_estimate"]
    assert s["probes"] == 2 and s["min"] <= s["mean"] <= s["max"] and 0.0 <= s["share_negative"] <= 1.0
    assert model.config._attn_implementation == "eager"  # restored (the tiny model was built eager)
    assert not any(p.requires_grad for p in model.parameters())


def test_hessian_diag_matches_exact_gauss_newton_within_mc_error(setup, single_thread):
    model, model64, windows, targets = setup
    exact = exact_gauss_newton_diag(model64, windows)
    runs = torch.stack([_flat(compute_scores("hessian_diag", model, targets, windows, 2,
                                             MetricContext(seed=s, curvature_samples=4)).values()).double()
                        for s in range(8)])
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(len(runs))
    chi = ((mean - exact).square().sum() / se.square().sum()).item()
    assert chi < 3.0, chi  # ~1 when the estimator is unbiased; a biased one grows with every seed
    rel = ((mean - exact).norm() / exact.norm()).item()
    # the empirical Fisher (data labels) is a different quantity: it must not pass for the GN diagonal
    emp = _flat(compute_scores("grad_squared", model, targets, windows, 2).values()).double()
    assert ((emp - exact).norm() / exact.norm()).item() > 3 * rel
    # seeds redraw the labels
    assert not torch.equal(runs[0], runs[1])
