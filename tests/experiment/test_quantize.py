"""RTN quantization: a hand-worked example, protection, block layouts, and a model that is never changed."""

from __future__ import annotations

import hashlib

import pytest
import torch

from esa.experiment.quantize import RTN, quantization_error, quantize_tensor, quantized, rtn_blocks
from esa.model.targets import find_targets
from tests.conftest import make_gpt2


def test_hand_worked_example():
    # 2 bits: qmax = 3; lo = -1, hi = 2 -> scale = 1, zero = round(1) = 1; q = clamp(round(w) + 1, 0, 3)
    x = torch.tensor([[-1.0, -0.2, 0.5, 1.5, 2.0]])
    w_q, scale, zero = rtn_blocks(x, 2)
    assert scale.tolist() == [1.0] and zero.tolist() == [1.0]
    # -0.2 -> 0; ties round half to even: 0.5 -> 0 (q = 1), 1.5 -> 2 (q = 3)
    assert w_q.tolist() == [[-1.0, 0.0, 0.0, 2.0, 2.0]]
    # the range always holds 0: an all-positive block [1, 4] uses lo = 0, scale = 4/3, zero = 0
    w_q, scale, zero = rtn_blocks(torch.tensor([[1.0, 4.0]]), 2)
    assert scale.item() == pytest.approx(4 / 3) and zero.item() == 0.0
    assert w_q[0].tolist() == pytest.approx([4 / 3, 4.0])
    # an all-zero block stays zero
    assert rtn_blocks(torch.zeros(1, 4), 4)[0].tolist() == [[0.0] * 4]


def test_protected_outlier_leaves_the_range_and_stays_exact():
    x = torch.tensor([[0.1, -0.3, 0.2, 50.0]])
    plain, s_plain, _ = rtn_blocks(x, 4)
    prot = torch.tensor([[False, False, False, True]])
    kept, s_prot, _ = rtn_blocks(x, 4, prot)
    assert s_plain.item() == pytest.approx(50.3 / 15)  # the outlier sets the scale
    assert s_prot.item() == pytest.approx(0.5 / 15)  # without it the range is [-0.3, 0.2]
    assert kept[0, 3].item() == 50.0
    assert plain[0, :3].abs().max() < 1e-6 + 50.3 / 30  # plain RTN crushes the small weights to 0
    assert (kept[0, :3] - x[0, :3]).abs().max() <= s_prot.item() / 2 + 1e-7


def test_clip_z_clips_the_range_to_mean_plus_minus_z_std():
    x = torch.tensor([[-1.0, 0.0, 1.0, 10.0]])
    mean, std = x.mean(), x.std(unbiased=False)
    w_q, scale, zero = rtn_blocks(x, 8, clip_z=1.0)
    assert scale.item() == pytest.approx(float((mean + std) - (-1.0)) / 255)
    assert w_q[0, 3].item() == pytest.approx((255 - zero.item()) * scale.item())  # 10.0 saturates at the clamp


def state_hash(model) -> str:
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("block", ["channel", "tensor", 7, 100000])
def test_blocks_match_a_loop_over_the_layout(llama, block):
    t = next(t for t in find_targets(llama) if t.name.endswith("mlp.down_proj.weight"))
    w = t.param.detach()
    got = quantize_tensor(t, RTN(4, block))
    if block == "channel":
        expected = torch.stack([rtn_blocks(w[r:r + 1], 4)[0][0] for r in range(w.shape[0])])
    else:
        size = w.numel() if block == "tensor" else block
        flat = w.reshape(-1)
        expected = torch.cat([rtn_blocks(flat[i:i + size][None], 4)[0][0] for i in range(0, flat.numel(), size)])
    assert torch.equal(got.reshape(-1), expected.reshape(-1))


def test_channel_blocks_of_a_conv1d_are_its_columns():
    gpt2 = make_gpt2()
    t = next(t for t in find_targets(gpt2) if t.name.endswith("mlp.c_fc.weight"))  # [in, out]
    w = t.param.detach()
    got = quantize_tensor(t, RTN(3, "channel"))
    expected = torch.stack([rtn_blocks(w[:, c][None], 3)[0][0] for c in range(w.shape[1])], dim=1)
    assert torch.equal(got, expected)


def test_quantized_model_reads_quantized_weights_and_is_never_changed(llama, windows):
    targets = [t for t in find_targets(llama) if "embed" not in t.name]
    spec = RTN(2, "channel")
    before = state_hash(llama)
    with torch.no_grad():
        plain = llama(input_ids=windows).logits
        protect = {targets[0].name: torch.tensor([0, 5])}
        with quantized(targets, spec, protect):
            assert state_hash(llama) == before  # nothing is written outside a forward
            got = llama(input_ids=windows).logits
        assert state_hash(llama) == before
        # the reference: a copy of the model with the quantized weights written in
        ref = type(llama)(llama.config).eval()
        ref.load_state_dict(llama.state_dict())
        by_name = dict(ref.named_parameters())
        for t in targets:
            by_name[t.name].data.copy_(quantize_tensor(t, spec, protect.get(t.name)))
        expected = ref(input_ids=windows).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)


def test_quantization_error_counts_only_unprotected_weights(llama):
    targets = [t for t in find_targets(llama) if "embed" not in t.name][:2]
    spec = RTN(3, 16)
    mse, n = quantization_error(targets, spec, {})
    sq = sum(float((quantize_tensor(t, spec) - t.param.detach()).square().sum()) for t in targets)
    assert n == sum(t.numel for t in targets) and mse == pytest.approx(sq / n, rel=1e-6)
    mse_p, n_p = quantization_error(targets, spec, {targets[0].name: torch.tensor([1, 2, 3])})
    assert n_p == n - 3


def test_each_experiment_declares_the_pairs_it_compares():
    """The pairs an evaluator's own results file tests are the experiment's own comparisons."""
    from esa.experiment.registry import EXPERIMENTS

    assert EXPERIMENTS["perturbation"].pairs(["top_k", "random_k", "bottom_k"]) == [("top_k", "random_k"),
                                                                                   ("top_k", "bottom_k")]
    assert EXPERIMENTS["quantization"].pairs(["none", "protect_topk", "protect_random_k"]) == [
        ("protect_topk", "protect_random_k")]
    assert EXPERIMENTS["quantization"].pairs(["none"]) == []
