"""obs against a brute-force w^2 / diag(inv(H)) from recorded inputs, in float64 with a plain inverse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esa.metrics import MetricContext, compute_scores
from esa.metrics.obs import inverse_diagonal
from esa.model.targets import find_targets


def recorded_inputs(model, windows) -> dict[str, list[torch.Tensor]]:
    """Inputs of every Linear / Conv1D (rows of X) and every embedding (token ids, broadcast to the batch)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if type(m).__name__ in ("Linear", "Conv1D", "Embedding"):
            def hook(mod, args, out, name=name):
                x = args[0]
                if isinstance(mod, nn.Embedding):
                    x = x.expand(windows.shape) if x.shape != windows.shape else x
                    seen.setdefault(name, []).append(x.reshape(-1))
                else:
                    seen.setdefault(name, []).append(x.detach().double().reshape(-1, x.shape[-1]))
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("damp", [0.01, 0.5])
def test_obs_matches_w2_over_inverse_hessian_diagonal(tiny_model, windows, damp):
    targets = find_targets(tiny_model)
    scores = compute_scores("obs", tiny_model, targets, windows, 2, MetricContext(obs_damp=damp))
    inputs = recorded_inputs(tiny_model, windows)
    n = windows.numel()
    for t in targets:
        w2 = t.param.detach().double().square()
        expected = torch.zeros_like(w2)
        for use in t.uses:
            x = torch.cat(inputs[use.module_name])
            if use.kind == "embedding":
                h = torch.bincount(x, minlength=t.shape[0]).double() * 2 / n
                inv_diag = 1 / (h + damp * h.mean())
            else:
                h = 2 * x.T @ x / n
                h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
                inv_diag = torch.linalg.inv(h).diagonal()
            expected += w2 / (inv_diag[None, :] if use.in_axis == 1 else inv_diag[:, None])
        torch.testing.assert_close(scores[t.name].double(), expected, rtol=2e-3, atol=1e-6 * float(expected.max()),
                                   msg=t.name)
        assert (expected - w2).abs().max() > 0.1 * w2.max()  # the Hessian really weighs the columns


def test_indefinite_hessian_raises_the_dampening_instead_of_failing():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h_sum = x.T @ x  # rank 3 of 6: singular
    h_sum[0, 0] = -5.0  # and indefinite
    inv, lam = inverse_diagonal(h_sum, 3, 0.0)
    assert lam > 0 and torch.isfinite(inv).all() and (inv > 0).all()
    inv_ok, lam_ok = inverse_diagonal(h_sum.abs() + 10 * torch.eye(6, dtype=torch.float64), 3, 0.01)
    assert lam_ok == 0.01 and torch.isfinite(inv_ok).all()
