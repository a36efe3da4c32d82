"""Controls that cannot be degenerate: bottom_k draws only weights the perturbation changes,
random_mag_k matches the Top-K's |w|, and too few eligible weights is a usage error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import esa_runner
from esa.errors import UsageError
from esa.experiment.controls import ControlContext, control
from esa.experiment.selection import top_k
from tests.realmodels import CORPUS, tiny_model_dir


def zero_heavy(seed: int = 0):
    """Two tensors whose lowest scores sit exactly on their zero weights (as |w * g| does)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(40, 30, generator=gen) for n in ("a", "b")}
    for w in weights.values():
        w.view(-1)[:50] = 0.0
    scores = {n: (w * torch.randn(w.shape, generator=gen)).abs() for n, w in weights.items()}
    return weights, scores


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_bottom_k_skips_exact_zeros_only_when_the_perturbation_leaves_them(mode):
    weights, scores = zero_heavy()
    names = list(weights)
    top = top_k(scores, names, 20, mode)
    keeps = control("bottom_k", scores, names, 20, mode, top, None, ControlContext(weights, zeros_unchanged=True))
    assert keeps.size == (40 if mode == "per_layer" else 20)
    assert all((weights[n].view(-1)[i] != 0).all() for n, i in keeps.indices.items())
    # the k lowest among the non-zero weights, by a full sort
    for n, idx in keeps.indices.items():
        if mode == "per_layer":
            flat, w = scores[n].view(-1), weights[n].view(-1)
            eligible = torch.nonzero(w != 0).squeeze(1)
            ref = eligible[torch.argsort(flat[eligible], stable=True)[:20]]
            assert sorted(idx.tolist()) == sorted(ref.tolist())
    flips = control("bottom_k", scores, names, 20, mode, top, None, ControlContext(weights, zeros_unchanged=False))
    assert any((weights[n].view(-1)[i] == 0).any() for n, i in flips.indices.items())  # a bit flip changes 0.0


def test_a_degenerate_bottom_k_is_a_usage_error():
    weights, scores = zero_heavy()
    weights["a"].view(-1)[50:1195] = 0.0  # 5 non-zero weights left in "a"
    scores["a"] = scores["a"] * (weights["a"] != 0)
    top = top_k(scores, list(weights), 10, "per_layer")
    with pytest.raises(UsageError, match="bottom_k is degenerate: a has fewer than 10"):
        control("bottom_k", scores, list(weights), 10, "per_layer", top, None, ControlContext(weights, True))


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_random_mag_k_matches_the_top_k_magnitudes(mode):
    gen = torch.Generator().manual_seed(3)
    weights = {n: torch.randn(200, 100, generator=gen) for n in ("a", "b")}
    scores = {n: (w * torch.randn(w.shape, generator=gen)).abs() for n, w in weights.items()}  # favours large |w|
    names = list(weights)
    top = top_k(scores, names, 200, mode)
    ctl = control("random_mag_k", scores, names, 200, mode, top, np.random.default_rng(0), ControlContext(weights))
    a = np.concatenate([weights[n].view(-1)[i].abs().numpy() for n, i in top.indices.items()])
    b = np.concatenate([weights[n].view(-1)[i].abs().numpy() for n, i in ctl.indices.items()])
    for q in (10, 50, 90):
        assert abs(np.percentile(b, q) / np.percentile(a, q) - 1) < 0.05, q
    assert np.median(a) > 1.5 * np.median(np.abs(weights["a"].numpy()))  # the Top-K is not a random sample
    for n in names:
        assert len(ctl.indices[n]) == len(top.indices[n])  # same tensors, same counts
        assert not set(ctl.indices[n].tolist()) & set(top.indices[n].tolist())
    again = control("random_mag_k", scores, names, 200, mode, top, np.random.default_rng(0), ControlContext(weights))
    other = control("random_mag_k", scores, names, 200, mode, top, np.random.default_rng(1), ControlContext(weights))
    assert all(torch.equal(again.indices[n], ctl.indices[n]) for n in names)  # seeded
    assert any(not torch.equal(other.indices[n], ctl.indices[n]) for n in names)


def test_cli_zero_changes_every_bottom_k_weight_and_reports_the_excluded(tmp_path_factory, tmp_path):
    tiny = str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():  # the weights with the smallest |w| become exact zeros, as in a quantised model
        for p in model.parameters():
            if p.ndim == 2:
                p.view(-1)[p.view(-1).abs() < 0.002] = 0.0
    model.save_pretrained(tiny)
    out = tmp_path / "o"
    argv = ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS), "--max-length", "32",
            "--max-samples", "4", "--eval-samples", "2", "--batch-size", "2", "--topk", "20", "--mode", "global",
            "--perturb", "zero", "--controls", "random_k,bottom_k,random_mag_k", "--out-dir", str(out)]
    assert esa_runner.main(argv) == 0
    res = json.loads((out / "perturbation_results.json").read_text())
    assert set(res["conditions"]) == {"top_k", "random_k", "bottom_k", "random_mag_k"}
    assert res["conditions"]["bottom_k"]["n_changed"] == res["conditions"]["bottom_k"]["n_perturbed"] == 20
    assert res["controls"]["bottom_k"]["ineligible_weights"] == sum(int((p == 0).sum()) for p in model.parameters()
                                                                    if p.ndim == 2) > 0
