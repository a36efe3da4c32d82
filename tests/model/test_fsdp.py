"""--shard fsdp loading: tiny Llama (tied), Qwen3-MoE (5 experts, a multi-file checkpoint stored per
expert), Mixtral (per-expert ``block_sparse_moe`` names) and GPT-2 (Conv1D, tied) loaded by
``load_sharded`` under torchrun with 1, 2 and 4 gloo processes, against the same models loaded
whole by transformers (tests/model/fsdp_driver.py does the checking inside the process group);
and the checkpoint mapping's refusals, in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from esa.errors import UsageError
from esa.model import distributed
from esa.model.device import DistributedSpec, validate_distributed
from esa.model.fsdp import flat_offset, local, local_bytes, process_mesh, row_range, shard
from esa.model.fsdp_load import Checkpoint, fill, meta_model, plan
from esa.model.introspect import decoder_blocks
from tests.model_families import family_dir
from tests.realmodels import REPO

DRIVER = REPO / "tests" / "model" / "fsdp_driver.py"
# what each world size loads (a launch costs 10-30 s of imports on 2 cores, so each model where its
# point is): NAME=model dir, @bf16 loads in bf16, @whole goes through load_whole (the GGUF path:
# loaded whole, then sharded); the 5 experts of qwen3_moe split unevenly at W=2 and W=4
RUNS = {1: ("llama", "qwen3_moe", "llama@bf16"),
        2: ("llama", "qwen3_moe", "mixtral", "gpt2", "llama@whole"),
        4: ("llama", "qwen3_moe", "gpt2")}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    dirs = {"llama": family_dir("llama", root / "llama", tie_word_embeddings=True),
            "mixtral": family_dir("mixtral", root / "mixtral"),
            "gpt2": family_dir("gpt2", root / "gpt2")}
    # 5 experts: uneven rows (W=2: 3+2, W=4: 2+2+1+0); saved in ~10 files, experts spread over them
    one_file = family_dir("qwen3_moe", root / "qwen3_moe_one_file", num_experts=5)
    dirs["qwen3_moe"] = root / "qwen3_moe"
    AutoModelForCausalLM.from_pretrained(one_file).save_pretrained(dirs["qwen3_moe"], max_shard_size="4KB")
    AutoTokenizer.from_pretrained(one_file).save_pretrained(dirs["qwen3_moe"])
    return dirs


def run_driver(world: int, specs: list[str], out) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           distributed.TIMEOUT_ENV: "60"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(DRIVER), str(out), *specs], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("world", sorted(RUNS))
def test_sharded_load_equals_the_plain_model(models, world, tmp_path):
    names = RUNS[world]
    res = run_driver(world, [f"{n}={models[n.split('@')[0]]}" for n in names], tmp_path / "out.json")
    assert res["world"] == world and [r["rank"] for r in res["ranks"]] == list(range(world))
    for name in names:
        recs = [r[name] for r in res["ranks"]]
        for rank, rec in enumerate(recs):
            where = f"{name} rank {rank}/{world}"
            # same weights, same ops: the sharded forward is bit for bit the plain one (fp32 and bf16)
            assert rec["logits_equal"] and rec["logits_max_abs"] == 0.0, where
            assert rec["params_same_names"] and rec["frozen_eval"] and rec["buffers_equal"], where
            assert rec["dtypes"] == (["torch.bfloat16"] if name.endswith("@bf16") else ["torch.float32"]), where
            assert rec["tied"] == (name.split("@")[0] in ("llama", "gpt2")), where
            # every parameter a Shard(0) DTensor holding torch.chunk's rows, equal to the plain model's
            for failed in ("not_dtensor", "rows", "values", "full", "flat"):
                assert rec[failed] == [], (where, failed)
            # local(p) writes reach the shards: zeroing the same weights gives the plain model's logits
            # bit for bit, and restoring brings back the bits and the logits
            assert rec["edit_changed"] and rec["edit_equal"], where
            assert rec["restore_bits_equal"] and rec["restore_logits_equal"], where
            assert rec["unsharded_equal"] and rec["resharded"], where
            if "grad_sum_rel" in rec:  # gradients reduced as the exact sum over ranks
                assert rec["grad_sum_rel"] < 1e-6, where
            # each rank holds its torch.chunk rows; padded to ceil(N/W) rows the share is the same on
            # every rank and at most one row per tensor above 1/W of the total
            assert rec["local_bytes"] <= rec["padded_share"] <= rec["total_bytes"] / world + rec["row_bytes"], where
        assert sum(r["local_bytes"] for r in recs) == recs[0]["total_bytes"], name
        assert len({r["padded_share"] for r in recs}) == 1, name
        if name == "qwen3_moe" and world == 4:  # the last rank holds none of the 5 experts' rows
            assert recs[3]["local_bytes"] < recs[0]["local_bytes"]


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_neox", "qwen2_moe", "olmoe", "gpt_oss"])
def test_the_checkpoints_of_more_families_map_to_the_plain_model(family, tmp_path):
    """plan + fill without sharding (row_range of a plain tensor: all rows) on families the torchrun
    test does not load: an embedding module with its own non-persistent buffer (gemma3's embed_scale),
    a renamed head (gpt_neox's embed_out), shared experts (qwen2_moe), olmoe, experts stored fused
    with biases (gpt_oss)."""
    path = family_dir(family, tmp_path / family)
    net = meta_model(AutoConfig.from_pretrained(path), "fp32")
    built = {n: b.clone() for n, b in net.named_buffers()}
    with Checkpoint(sorted(path.glob("*.safetensors"))) as ckpt:
        sources = plan(net, ckpt.keys)
        net.to_empty(device="cpu")
        net.tie_weights()  # plain Module.to_empty unties (fully_shard's keeps the tie, see the torchrun test)
        with torch.no_grad():
            for name, buf in net.named_buffers():
                buf.copy_(built[name])
            fill(net, sources, ckpt)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[1, 17, 400, 9000, 23, 5, 77, 301]])
    with torch.no_grad():
        assert torch.equal(net.eval()(ids).logits, ref.eval()(ids).logits)
    if family.endswith("moe"):
        assert any(s.converter is not None for s in sources.values())


def checkpoint_keys(path) -> list[str]:
    files = sorted(path.glob("*.safetensors"))
    with Checkpoint(files) as ckpt:
        return ckpt.keys


def test_the_mapping_stacks_per_expert_tensors_and_refuses_what_it_cannot_fill(models):
    path = models["qwen3_moe"]
    net = meta_model(AutoConfig.from_pretrained(path), "fp32")
    keys = checkpoint_keys(path)
    sources = plan(net, keys)
    fused = sources["model.layers.1.mlp.experts.gate_up_proj"]
    assert list(fused.experts) == ["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"]
    assert fused.experts["mlp.experts.*.up_proj.weight"][4] == "model.layers.1.mlp.experts.4.up_proj.weight"
    assert sources["model.layers.0.mlp.gate.weight"].key == "model.layers.0.mlp.gate.weight"
    # an old per-layer rotary buffer is ignored as from_pretrained ignores it
    assert plan(net, [*keys, "model.layers.0.self_attn.rotary_emb.inv_freq"]).keys() == sources.keys()
    with pytest.raises(UsageError, match="cannot map checkpoint tensor 'model.layers.0.mystery.weight'"):
        plan(net, [*keys, "model.layers.0.mystery.weight"])
    with pytest.raises(UsageError, match="no tensor for 'model.norm.weight'"):
        plan(net, [k for k in keys if k != "model.norm.weight"])
    with pytest.raises(UsageError, match=r"experts \[0, 1, 3, 4\] of 'mlp.experts.\*.down_proj.weight'"):
        plan(net, [k for k in keys if k != "model.layers.0.mlp.experts.2.down_proj.weight"])


def test_mixtral_names_are_renamed_before_stacking(models):
    path = models["mixtral"]
    sources = plan(meta_model(AutoConfig.from_pretrained(path), "fp32"), checkpoint_keys(path))
    fused = sources["model.layers.0.mlp.experts.gate_up_proj"]
    assert fused.experts[".experts.*.w3.weight"][1] == "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    assert sources["model.layers.0.mlp.gate.weight"].key == "model.layers.0.block_sparse_moe.gate.weight"


def test_a_conversion_that_is_not_per_expert_rows_is_refused(models, monkeypatch):
    from transformers import conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    path = models["mixtral"]
    net = meta_model(AutoConfig.from_pretrained(path), "fp32")
    rules = conversion_mapping.get_checkpoint_conversion_mapping("mixtral")  # rename, gate_up, down
    rules[2] = WeightConverter(".experts.*.w2.weight", ".experts.down_proj", [Transpose(0, 1)])
    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", lambda model: rules)
    with pytest.raises(UsageError, match="cannot read checkpoint tensor .* in slices.*Transpose"):
        plan(net, checkpoint_keys(path))


def test_quantized_checkpoints_are_refused(models):
    config = AutoConfig.from_pretrained(models["llama"])
    config.quantization_config = {"quant_method": "fp8"}
    with pytest.raises(UsageError, match="unquantized.*fp8"):
        meta_model(config, "fp32")


def test_shard_needs_torchrun_and_excludes_device_map(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched()
    with pytest.raises(UsageError, match="--shard fsdp needs torchrun"):
        validate_distributed(DistributedSpec(shard="fsdp"), torchrun=False)
    with pytest.raises(UsageError, match="--shard fsdp needs torchrun"), process_mesh("cpu"):
        pass
    with pytest.raises(UsageError, match="cannot be combined with --device-map"):
        validate_distributed(DistributedSpec(shard="fsdp", device_map="auto"), torchrun=False, launched=True)
    validate_distributed(DistributedSpec(shard="fsdp"), torchrun=False, launched=True)  # torchrun, 1 process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.launched() and not distributed.requested()
    validate_distributed(DistributedSpec(shard="fsdp"), distributed.requested())


def test_collective_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout().total_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.collective_timeout().total_seconds() == 12.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=distributed.TIMEOUT_ENV):
            distributed.collective_timeout()


def test_helpers_on_a_plain_tensor_and_a_model_without_blocks():
    t = torch.arange(12.0).reshape(3, 4)
    assert local(t) is t and row_range(t) == (0, 3) and flat_offset(t) == 0
    assert local_bytes([t, None, t[0]]) == 12 * 4 + 4 * 4
    with pytest.raises(UsageError, match="--shard fsdp: cannot find this model's decoder blocks"):
        decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), "--shard fsdp")
    scaled = torch.nn.Linear(2, 2)
    scaled.scale = torch.nn.Parameter(torch.tensor(2.0))
    with pytest.raises(UsageError, match="scalar parameters.*'scale'"):  # checked before any collective
        shard(scaled, mesh=None)
