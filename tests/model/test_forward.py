"""esa.model.forward.perplexity against a brute-force per-token loop in float64."""

from __future__ import annotations

import math

import pytest
import torch

from esa.model.forward import NaNLossError, nll_sum, perplexity
from tests.conftest import to_double

pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(x_t | x_<t) in float64, one forward per prefix, one token at a time."""
    model64 = to_double(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            for t in range(1, len(w)):
                logits = model64(input_ids=w[None, :t], use_cache=False).logits[0, -1]
                logp = torch.log_softmax(logits.double(), dim=-1)
                total -= float(logp[int(w[t])])
                n += 1
    return total, n


def test_perplexity_matches_brute_force(tiny_model, windows):
    ref_sum, ref_n = brute_force_nll(tiny_model, windows)
    assert ref_n == 6 * 11
    res = perplexity(tiny_model, windows, 4)
    assert res["tokens"] == ref_n
    assert res["nll_sum"] == pytest.approx(ref_sum, rel=1e-6)
    assert res["mean_nll"] == pytest.approx(ref_sum / ref_n, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(ref_sum / ref_n), rel=1e-6)
    assert res["ppl"] > 10  # a random model is far from perfect: the check is not vacuous


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 6, 100])
def test_perplexity_batch_size_independent(tiny_model, windows, batch_size):
    ref = perplexity(tiny_model, windows, 6)
    got = perplexity(tiny_model, windows, batch_size)
    assert got["tokens"] == ref["tokens"] == 66
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    assert got["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-6)


def test_nll_sum_matches_per_row_reference(llama, windows):
    got = nll_sum(llama, windows[:3])
    assert got.dtype == torch.float32
    ref, n = brute_force_nll(llama, windows[:3])
    assert n == 33
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_perplexity_of_uniform_model_is_vocab_size(llama, windows):
    """All-zero logits (lm_head zeroed) give exactly ppl = vocab size."""
    llama.lm_head.weight.data.zero_()  # tied: zeroes the embedding too
    res = perplexity(llama, windows, 4)
    assert res["ppl"] == pytest.approx(64.0, rel=1e-6)
    assert res["mean_nll"] == pytest.approx(math.log(64), rel=1e-6)


@pytest.mark.parametrize("where", ["embedding_row", "norm", "one_layer_weight"])
def test_nan_loss_raises(llama, windows, where):
    with torch.no_grad():
        if where == "embedding_row":
            llama.model.embed_tokens.weight[int(windows[3, 4])] = float("nan")
        elif where == "norm":
            llama.model.norm.weight[0] = float("nan")
        else:
            llama.model.layers[1].mlp.down_proj.weight[2, 3] = float("nan")
    with pytest.raises(NaNLossError):
        perplexity(llama, windows, 4)


def test_nan_in_one_batch_only_still_raises(gpt2, windows):
    """NaN confined to the last window (a token only it contains) must not be averaged away."""
    last_only = sorted(set(windows[-1].tolist()) - set(windows[:-1].flatten().tolist()))
    assert last_only
    # untie, so that the NaN embedding row does not also become a NaN logit for every position
    gpt2.lm_head.weight = torch.nn.Parameter(gpt2.lm_head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        gpt2.transformer.wte.weight[last_only[0]] = float("nan")
    assert math.isfinite(perplexity(gpt2, windows[:-1], 2)["ppl"])
    with pytest.raises(NaNLossError):
        perplexity(gpt2, windows, 2)


def test_refuses_training_mode(llama, windows):
    llama.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        perplexity(llama, windows, 4)


def test_perplexity_does_not_touch_grad_state(gpt2, windows):
    perplexity(gpt2, windows, 4)
    assert all(not p.requires_grad and p.grad is None for p in gpt2.parameters())
    assert not any(m.training for m in gpt2.modules())
