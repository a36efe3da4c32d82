"""--device-map auto, the memory budgets behind it, and eval-mode gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

import esa_runner
from esa.data import load_data
from esa.errors import UsageError
from esa.metrics import MetricContext, compute_scores
from esa.model.loading import load_model
from esa.model.placement import ACC_BYTES, HEADROOM, checkpointed_blocks, max_memory, plan_device_map, weight_budget
from esa.model.targets import find_targets
from tests.realmodels import CORPUS, tiny_model_dir


def test_device_map_auto_on_cpu_gives_the_plain_path_scores(tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    plain, tok = load_model(str(d), "cpu", "fp32")
    mapped, _ = load_model(str(d), "cpu", "fp32", device_map="auto")
    assert set(mapped.esa_device_map.values()) == {"cpu"}
    assert not mapped.training and not any(p.requires_grad for p in mapped.parameters())
    data = load_data(tok, str(CORPUS), None, 24, 2, 4)
    windows = data.calib_pool[:4]
    for metric in ("grad_x_weight", "act_mag", "grad_squared"):
        a = compute_scores(metric, plain, find_targets(plain), windows, 2, MetricContext())
        b = compute_scores(metric, mapped, find_targets(mapped), windows, 2, MetricContext())
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (metric, name)


def test_cli_device_map_auto_on_cpu_matches_plain_run(tmp_path_factory, tmp_path):
    d = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    args = ["--model", str(d), "--device", "cpu", "--data-file", str(CORPUS), "--topk", "3",
            "--perturb", "zero", "--max-length", "24", "--max-samples", "3", "--eval-samples", "3"]
    assert esa_runner.main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    assert esa_runner.main([*args, "--device-map", "auto", "--out-dir", str(tmp_path / "b")]) == 0
    a, b = ((tmp_path / x / "top_weights.csv").read_text() for x in "ab")
    assert a == b
    pa, pb = (json.loads((tmp_path / x / "perturbation_results.json").read_text()) for x in "ab")
    assert pa["conditions"]["top_k"]["ppl"] == pb["conditions"]["top_k"]["ppl"]
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())["config"]
    assert cfg["device_map"] == "auto"


def test_weight_budget_leaves_room_for_fp32_accumulators():
    gib = 2**30
    # bf16: 2 bytes of weight + 4 of accumulator per parameter -> a third of the usable memory is weights
    assert weight_budget(80 * gib, torch.bfloat16) == int(80 * gib * (1 - HEADROOM) * 2 / (2 + ACC_BYTES))
    assert weight_budget(80 * gib, torch.float32) == int(80 * gib * (1 - HEADROOM) / 2)
    budgets = max_memory(torch.bfloat16, offload=False, gpu_free={0: 80 * gib, 1: 40 * gib})
    assert set(budgets) == {0, 1}  # no CPU without --offload
    assert budgets[1] * 2 == pytest.approx(budgets[0], abs=2)
    assert "cpu" in max_memory(torch.bfloat16, offload=True, gpu_free={0: gib}, cpu_free=64 * gib)


def _llama_config(tmp_path_factory):
    return AutoConfig.from_pretrained(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def test_plan_spreads_blocks_over_gpus_and_needs_offload_for_cpu(tmp_path_factory):
    config = _llama_config(tmp_path_factory)
    config.num_hidden_layers = 8
    # per block: 4*16*16 (attention, 1 kv head is 16*8 twice) ... measure it rather than assume it
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    block_bytes = sum(p.numel() for p in meta.model.layers[0].parameters()) * 2
    embed_bytes = meta.model.embed_tokens.weight.numel() * 2
    # GPU 0 holds the embeddings plus ~2 blocks, GPU 1 another ~3: the rest does not fit without CPU
    gpu0 = embed_bytes + 2.5 * block_bytes
    free = {0: int(gpu0 / ((1 - HEADROOM) * 2 / 6)), 1: int(3.5 * block_bytes / ((1 - HEADROOM) * 2 / 6))}
    with pytest.raises(UsageError, match="--offload"):
        plan_device_map(config, torch.bfloat16, max_memory(torch.bfloat16, False, gpu_free=free))
    plan = plan_device_map(config, torch.bfloat16,
                           max_memory(torch.bfloat16, True, gpu_free=free, cpu_free=2**34))
    layers = {int(k.split(".")[2]): v for k, v in plan.items() if k.startswith("model.layers.")}
    devices = [layers[i] for i in sorted(layers)] if len(layers) == 8 else None
    assert devices is not None, plan  # every block placed whole
    assert devices[0] == 0 and "cpu" in devices and 1 in devices
    assert devices == sorted(devices, key=lambda d: (d == "cpu", d if d != "cpu" else 0))  # in order


@pytest.mark.parametrize("metric", ["grad_x_weight", "hessian_diag", "hutchinson_diag"])
def test_gradient_checkpointing_gives_the_same_scores_and_unwraps(tiny_model, windows, single_thread, metric):
    targets = find_targets(tiny_model)
    ctx = dict(seed=0, hutchinson_samples=2, curvature_samples=2)
    plain = compute_scores(metric, tiny_model, targets, windows, 3, MetricContext(**ctx))
    with checkpointed_blocks(tiny_model) as n:
        assert n == tiny_model.config.num_hidden_layers
        ck = compute_scores(metric, tiny_model, targets, windows, 3, MetricContext(**ctx))
    for name in plain:
        torch.testing.assert_close(ck[name], plain[name], rtol=1e-5, atol=1e-6 * float(plain[name].abs().max()))
    assert not any("forward" in m.__dict__ for m in tiny_model.modules())


def test_gradient_checkpointing_flag_is_refused_for_forward_only_metrics(capsys):
    assert esa_runner.main(["--device", "cpu", "--metric", "act_mag", "--gradient-checkpointing", "--dry-run"]) == 2
    assert "gradient metrics" in capsys.readouterr().err
    assert esa_runner.main(["--device", "cpu", "--offload", "--dry-run"]) == 2


def test_gpu_budget_env_caps_every_gpu_and_rejects_bad_values(monkeypatch):
    gib = 2**30
    free = {0: 80 * gib, 1: 40 * gib}
    monkeypatch.delenv("ESA_GPU_BUDGET_BYTES", raising=False)
    plain = max_memory(torch.float32, offload=True, gpu_free=free, cpu_free=64 * gib)
    monkeypatch.setenv("ESA_GPU_BUDGET_BYTES", "300000000")
    capped = max_memory(torch.float32, offload=True, gpu_free=free, cpu_free=64 * gib)
    assert capped[0] == capped[1] == 300_000_000 < plain[1]
    assert capped["cpu"] == plain["cpu"]  # the CPU budget is not capped
    monkeypatch.setenv("ESA_GPU_BUDGET_BYTES", str(100 * gib))  # a cap above the computed budget changes nothing
    assert max_memory(torch.float32, offload=False, gpu_free=free) == {0: plain[0], 1: plain[1]}
    monkeypatch.setenv("ESA_GPU_BUDGET_BYTES", "")  # empty = unset
    assert max_memory(torch.float32, offload=False, gpu_free=free) == {0: plain[0], 1: plain[1]}
    for bad in ("300MB", "-5", "0", "1.5e8"):
        monkeypatch.setenv("ESA_GPU_BUDGET_BYTES", bad)
        with pytest.raises(UsageError, match="ESA_GPU_BUDGET_BYTES") as err:
            max_memory(torch.float32, offload=False, gpu_free=free)
        assert "\n" not in str(err.value)
