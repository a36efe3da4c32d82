"""taylor2 against a per-window loop in float64 (an independent computation)."""

from __future__ import annotations

import torch

from esa.metrics import compute_scores
from esa.model.targets import find_targets
from tests.conftest import to_double, window_gradients


def test_taylor2_matches_a_per_window_loop(tiny_model, windows):
    targets = find_targets(tiny_model)
    scores = compute_scores("taylor2", tiny_model, targets, windows, 4)
    model64 = to_double(tiny_model)
    params = [model64.get_parameter(t.name) for t in targets]
    g_sum = [torch.zeros_like(p) for p in params]
    sq_sum = [torch.zeros_like(p) for p in params]
    for grads in window_gradients(model64, params, windows):
        for gs, ss, g in zip(g_sum, sq_sum, grads):
            gs += g
            ss += g.square()
    n = len(windows)
    for t, p, gs, ss in zip(targets, params, g_sum, sq_sum):
        w = p.detach()
        first, second = gs / n * w, 0.5 * ss / n * w * w
        expected = (first - second).abs()
        # the two terms can cancel: tolerance relative to the terms' size, not to their difference
        scale = float((first.abs() + second).max())
        torch.testing.assert_close(scores[t.name].double(), expected, rtol=1e-4, atol=1e-5 * scale, msg=t.name)
        first_order = (gs / n * w).abs()  # grad_x_weight: the curvature term makes a visible difference
        assert (expected - first_order).abs().max() > 1e-3 * first_order.max(), t.name


def test_taylor2_is_grad_x_weight_corrected_by_grad_squared_bit_for_bit(llama, windows):
    """taylor2 reads the very gradient sums of grad_x_weight (batch) and grad_squared (per window):
    elementwise it is |g·w| − ½F·w² or |g·w| + ½F·w² in absolute value, exactly in fp32."""
    targets = find_targets(llama)
    gxw = compute_scores("grad_x_weight", llama, targets, windows, 2)
    t2 = compute_scores("taylor2", llama, targets, windows, 2)
    fisher = compute_scores("grad_squared", llama, targets, windows, 2)
    for t in targets:
        w = t.param.detach().float()
        c = fisher[t.name].mul(w).mul_(w).mul_(0.5)  # the same fp32 operations, in the same order
        same_sign, opposite = (gxw[t.name] - c).abs(), gxw[t.name] + c
        assert ((t2[t.name] == same_sign) | (t2[t.name] == opposite)).all(), t.name
        assert (t2[t.name] != gxw[t.name]).any()  # the curvature term changes something
