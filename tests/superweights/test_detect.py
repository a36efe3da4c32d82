"""Super weights: planted ones are found at the exact (layer, row, col), ablation and restore, CLI, real model.

The tiny models get *planted* super weights (:func:`plant_llama`): a residual channel ``s`` that is a
constant 5 for every token (embedding column, never written by any layer) feeds MLP input channel
``col`` of one block through gate and up projections, so that channel is large for every token;
``down_proj.weight[row, col]`` then writes a massive activation into residual channel ``row``.  That
is the super-weight mechanism in miniature: the huge channel dominates every later RMSNorm.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from esa.evaluators.measure import Measurer
from esa.experiment.perturb import INT_VIEW
from esa.reporting.superweights import format_table, plot_spikes, write_super_weights
from esa.superweights import ablation as swr
from esa.superweights import config as swc
from esa.superweights import detect as sw
from tests.conftest import VOCAB, _finish, _randomize

pytestmark = pytest.mark.usefixtures("single_thread")

N_LAYERS = 6
PREDICTED = 5  # token the super activation makes the model predict (via the tied lm_head)


def llama6(vocab: int = VOCAB, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                         num_hidden_layers=N_LAYERS, num_key_value_heads=1, tie_word_embeddings=True,
                                         attn_implementation="eager"))
    _randomize(model, seed)
    return _finish(model)


@torch.no_grad()
def plant_llama(model: LlamaForCausalLM, layer: int, row: int, col: int, source: int, weight: float = 20.0,
                constant_source: bool = True) -> None:
    """Plant ``layers[layer].mlp.down_proj.weight[row, col] = weight`` fed by residual channel ``source``
    through MLP input channel ``col``; ``constant_source``: make ``source`` a constant 5 for every token."""
    if constant_source:
        model.model.embed_tokens.weight[:, source] = 5.0  # the same for every token
        for blk in model.model.layers:  # nothing writes the source channel, so it stays 5 at every depth
            blk.self_attn.o_proj.weight[source].zero_()
            blk.mlp.down_proj.weight[source].zero_()
    mlp = model.model.layers[layer].mlp
    for proj in (mlp.gate_proj, mlp.up_proj):  # input channel col = silu(3 x_s) * 3 x_s, large for every token
        proj.weight[col].zero_()
        proj.weight[col, source] = 3.0
    mlp.down_proj.weight[:, col].zero_()  # only the planted weight reads the massive input channel
    mlp.down_proj.weight[row, col] = weight


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        bits = INT_VIEW[p.dtype]  # raw bits: -0.0 != 0.0 and NaN == NaN
        assert torch.equal(p.view(bits), before[n].view(bits)), n


def keys(cands) -> list[tuple]:
    return [(c.layer, c.row, c.col) for c in cands]  # (block, row, col) of each candidate, in order


def skewed_windows(n: int, length: int, seed: int = 3) -> torch.Tensor:
    """``[n, length]`` windows where 80 % of tokens are PREDICTED: text the super activation 'explains'."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, VOCAB, (n, length), generator=gen)
    return torch.where(torch.rand(n, length, generator=gen) < 0.8, torch.full_like(w, PREDICTED), w)


# ---------------------------------------------------------------- locating the projections


def test_projections_found_generically():
    llama = llama6()
    projs = sw.find_mlp_output_projections(llama)
    assert [p.module_name for p in projs] == [f"model.layers.{i}.mlp.down_proj" for i in range(N_LAYERS)]
    assert [p.layer for p in projs] == list(range(N_LAYERS))
    assert all(p.kind == "linear" and p.rule == "name" and (p.in_features, p.out_features) == (32, 16) for p in projs)

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=3, n_head=2, n_positions=32))
    projs = sw.find_mlp_output_projections(gpt2)
    assert [p.module_name for p in projs] == [f"transformer.h.{i}.mlp.c_proj" for i in range(3)]  # not attn.c_proj
    assert all(p.kind == "conv1d" and (p.in_features, p.out_features) == (64, 16) for p in projs)
    assert projs[0].weight_index(out_channel=5, in_channel=37) == (37, 5)  # Conv1D weight is [in, out]

    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                   num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    projs = sw.find_mlp_output_projections(opt)  # fc2 sits directly in the block: the structural rule
    assert [(p.module_name, p.rule) for p in projs] == [(f"model.decoder.layers.{i}.fc2", "structure") for i in (0, 1)]


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planted_llama_super_weight_found_exactly_and_restored(dtype):
    model = llama6()
    plant_llama(model, layer=2, row=9, col=21, source=4)
    model.to(dtype)
    before = params(model)
    det = sw.detect_super_weights(model, skewed_windows(1, 12))
    assert_bit_identical(model, before)
    assert all(not p.module._forward_hooks for p in sw.find_mlp_output_projections(model))
    assert keys(det["candidates"]) == [(2, 9, 21)]
    c = det["candidates"][0]  # the checks below: out/in channel map to W[row, col] of a Linear [out, in]
    assert (c.param, c.out_channel, c.in_channel) == ("model.layers.2.mlp.down_proj.weight", 9, 21)
    assert c.flat_index == 9 * 32 + 21 and c.weight == 20.0 and c.input_channel_of_max == 21
    assert c.output_ratio > 100 and c.share > 0.99  # one weight makes the whole spike
    assert det["passes"][0]["spikes"] == ["model.layers.2.mlp.down_proj"]
    assert det["passes"][1]["spikes"] == [] and det["stopped"] == "no new spike"  # zeroing it removes the spike


def test_unplanted_model_has_no_candidate():
    det = sw.detect_super_weights(llama6(), skewed_windows(2, 12))
    assert det["candidates"] == [] and len(det["passes"]) == 1


def test_a_projection_never_called_is_skipped():
    """An MoE expert that no token is routed to has no activations: it is recorded, never a spike."""
    model = llama6()
    plant_llama(model, layer=2, row=9, col=21, source=4)
    extra = sw.Projection("x.mlp.down_proj", "x.mlp.down_proj.weight", torch.nn.Linear(32, 16), None, "linear",
                          32, 16, "name")
    det = sw.detect_super_weights(model, skewed_windows(1, 12), projections=[*sw.find_mlp_output_projections(model),
                                                                             extra])
    rec = det["passes"][0]["layers"][-1]
    assert keys(det["candidates"]) == [(2, 9, 21)]
    assert not rec["called"] and not rec["spike"] and rec["out_max"] is None


def test_iteration_finds_a_super_weight_masked_by_another():
    """Layer 1's super activation dominates layer 4's RMSNorm, which shrinks layer 4's source channel:
    layer 4 spikes only once layer 1's weight is zeroed.  The search must find both, in order, and stop."""
    model = llama6()
    plant_llama(model, layer=1, row=3, col=7, source=10)
    plant_llama(model, layer=4, row=12, col=20, source=14, weight=60.0)
    before = params(model)
    det = sw.detect_super_weights(model, skewed_windows(1, 12))
    assert_bit_identical(model, before)
    assert det["passes"][0]["spikes"] == ["model.layers.1.mlp.down_proj"]  # layer 4 is masked at first
    assert keys(det["candidates"]) == [(1, 3, 7), (4, 12, 20)]
    assert [c.iteration for c in det["candidates"]] == [0, 1]
    assert det["passes"][1]["zeroed"] == [["model.layers.1.mlp.down_proj.weight", 3 * 32 + 7]]
    assert len(det["passes"]) == 3 and det["passes"][2]["spikes"] == [] and det["stopped"] == "no new spike"
    capped = sw.detect_super_weights(model, skewed_windows(1, 12), max_super_weights=1)
    assert keys(capped["candidates"]) == [(1, 3, 7)] and capped["stopped"].startswith("max_super_weights (1)")
    assert_bit_identical(model, before)


def test_a_consequence_spike_is_not_a_candidate():
    """Layer 3 reads the residual channel that layer 1's super weight makes massive: it spikes too, but only
    because of layer 1.  Earliest-first: layer 1 is zeroed, layer 3's spike vanishes, the search stops."""
    model = llama6()
    plant_llama(model, layer=1, row=3, col=7, source=10)
    plant_llama(model, layer=3, row=12, col=20, source=3, weight=5.0, constant_source=False)
    det = sw.detect_super_weights(model, skewed_windows(1, 12))
    assert det["passes"][0]["spikes"] == ["model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    assert keys(det["candidates"]) == [(1, 3, 7)]
    assert det["passes"][1]["spikes"] == [] and det["stopped"] == "no new spike"


def test_the_column_is_the_weight_that_makes_the_spike_not_the_largest_input():
    """A decoy MLP input channel larger than the planted one but read by no down_proj weight: the
    candidate's column must be the planted one (its weight produces the output), the decoy only recorded."""
    model = llama6()
    plant_llama(model, layer=2, row=9, col=21, source=4)
    plant_llama(model, layer=2, row=9, col=5, source=4, weight=0.0)  # gate/up of channel 5 as large as 21's
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[5, 4] = 6.0  # twice as large, yet feeds nothing
    c, = sw.detect_super_weights(model, skewed_windows(1, 12))["candidates"]
    assert (c.layer, c.row, c.col, c.input_channel_of_max) == (2, 9, 21, 5)
    assert c.max_abs_input > abs(c.input_activation) and c.share > 0.99


def test_gpt2_conv1d_coordinates_are_in_the_transposed_layout():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=N_LAYERS, n_head=2, n_positions=32,
                                       attn_implementation="eager"))
    _randomize(model, 0)
    mlp = _finish(model).transformer.h[2].mlp
    with torch.no_grad():  # input channel 37 of c_proj = gelu(4) for every token; c_proj.weight is [in=64, out=16]
        mlp.c_fc.weight[:, 37] = 0.0
        mlp.c_fc.bias[37] = 4.0
        mlp.c_proj.weight[37].zero_()
        mlp.c_proj.weight[37, 5] = 300.0
    seen = {}
    hook = mlp.c_proj.register_forward_hook(lambda m, a, out: seen.update(x=a[0][0].clone(), y=out[0].clone()))
    with torch.no_grad():  # an independent forward: where is the max |output|, which input feeds it most
        model(input_ids=skewed_windows(1, 12), use_cache=False)
    hook.remove()
    pos, out_ch = divmod(int(seen["y"].abs().argmax()), 16)
    in_ch = int((seen["x"][pos] * mlp.c_proj.weight[:, out_ch]).abs().argmax())  # y = x @ W, W is [in, out]
    assert (out_ch, in_ch) == (5, 37)
    before = params(model)
    det = sw.detect_super_weights(model, skewed_windows(1, 12))
    assert_bit_identical(model, before)
    c = det["candidates"][0]
    assert len(det["candidates"]) == 1 and c.module == "transformer.h.2.mlp.c_proj" and c.kind == "conv1d"
    assert (c.row, c.col, c.out_channel, c.in_channel) == (in_ch, out_ch, out_ch, in_ch)
    assert c.flat_index == 37 * 16 + 5 and float(mlp.c_proj.weight.view(-1)[c.flat_index]) == c.weight == 300.0
    assert c.position == pos and c.output_activation == pytest.approx(float(seen["y"][pos, out_ch]), rel=1e-5)
    first, second = (p["layers"][2]["out_max"] for p in det["passes"])
    assert second < 0.1 * first and det["stopped"] == "no new spike"  # zeroing that element removed the spike


def test_hooks_removed_and_weights_restored_when_a_pass_fails():
    model = llama6()
    plant_llama(model, layer=2, row=9, col=21, source=4)
    before = params(model)
    calls = []

    def boom(*_):
        calls.append(1)
        if len(calls) == 2:  # second pass: the candidate is zeroed and the hooks are in place
            raise RuntimeError("boom")

    h = model.model.norm.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        sw.detect_super_weights(model, skewed_windows(1, 12))
    h.remove()
    assert len(calls) == 2
    assert_bit_identical(model, before)
    assert all(not p.module._forward_hooks for p in sw.find_mlp_output_projections(model))


# ---------------------------------------------------------------- ablation and outputs


def test_ablation_planted_weight_hurts_random_control_does_not(tmp_path):
    model = llama6()
    plant_llama(model, layer=2, row=9, col=21, source=4)
    with torch.no_grad():  # the tied lm_head reads channel 9: the super activation predicts PREDICTED
        model.model.embed_tokens.weight[:, 9] = 0.0
        model.model.embed_tokens.weight[PREDICTED, 9] = 2.0
    before = params(model)
    windows = skewed_windows(6, 16, seed=11)
    res = swr.run_super_weights(model, skewed_windows(1, 12), Measurer.perplexity(model, windows, 4), seed=0,
                                settings={"model": "planted-llama"})
    assert_bit_identical(model, before)
    assert [(c["layer"], c["row"], c["col"]) for c in res["candidates"]] == [(2, 9, 21)]
    abl = res["ablation"]
    assert abl["baseline"]["ppl"] < 8  # the super activation makes the model right on 80 % of tokens
    assert abl["each"][0]["ratio"] > 3 and abl["all"]["ratio"] == abl["each"][0]["ratio"]
    assert 0.9 < abl["random"]["ratio"] < 1.1
    (name, flat), = abl["random"]["weights"]
    assert name == "model.layers.2.mlp.down_proj.weight" and flat != 9 * 32 + 21
    again = swr.ablate(Measurer.perplexity(model, windows, 4), [sw.Candidate.from_dict(c) for c in res["candidates"]],
                       sw.find_mlp_output_projections(model), seed=0)
    assert again["random"]["weights"] == abl["random"]["weights"]  # the control is seeded
    assert again["random"]["ppl"] == abl["random"]["ppl"]
    assert_bit_identical(model, before)

    files = write_super_weights(res, tmp_path)
    loaded = json.loads((tmp_path / "super_weights.json").read_text())
    assert loaded["candidates"][0]["flat_index"] == 9 * 32 + 21 and loaded["settings"]["model"] == "planted-llama"
    assert len(loaded["passes"][0]["layers"]) == N_LAYERS and loaded["passes"][0]["layers"][2]["spike"]
    table = format_table(loaded)
    assert "model.layers.2.mlp.down_proj.weight" in table and "random weight" in table
    assert all((tmp_path / f).stat().st_size > 0 for f in files)
    assert plot_spikes(tmp_path, tmp_path / "again.png").stat().st_size > 1000  # from the file alone


def test_each_candidate_says_which_massive_activation_it_feeds(tmp_path):
    """The candidate's row is residual channel 9, massive from layer 2 on (the residual stream keeps it)."""
    model = llama6()
    plant_llama(model, layer=2, row=9, col=21, source=4, weight=2000.0)
    res = swr.run_super_weights(model, skewed_windows(1, 12), None)
    cand, = res["candidates"]
    assert cand["feeds"]["channel"] == 9 and cand["feeds"]["layers"] == [2, 3, 4, 5] and cand["feeds"]["max"] > 1e4
    assert res["massive_activations"]["massive"][0]["channel"] == 9
    assert "ch 9: massive in layers 2–5" in format_table(res)
    quiet = swr.run_super_weights(llama6(), skewed_windows(1, 12), None)
    assert quiet["candidates"] == [] and quiet["massive_activations"]["n_massive"] == 0


def test_random_control_is_disjoint_seeded_and_from_the_same_matrix():
    model = llama6()
    plant_llama(model, layer=2, row=9, col=21, source=4)
    projs = sw.find_mlp_output_projections(model)
    c, = sw.detect_super_weights(model, skewed_windows(1, 12), projections=projs)["candidates"]
    many = [dataclasses.replace(c, flat_index=i) for i in range(0, 512, 2)]  # half of the 16 x 32 matrix
    rand = swr.random_control(projs, many, seed=3)
    assert len(rand) == 256 and {n for n, _ in rand} == {c.param}
    assert {i for _, i in rand} == set(range(1, 512, 2))  # every free weight once: disjoint and distinct
    assert rand == swr.random_control(projs, many, seed=3) != swr.random_control(projs, many, seed=4)
    with pytest.raises(ValueError, match="no weight left"):
        swr.random_control(projs, [dataclasses.replace(c, flat_index=i) for i in range(300)], seed=0)


def test_overlap_with_topk():
    cands = [{"param": "a.weight", "flat_index": 7, "layer": 1, "row": 0, "col": 7},
             {"param": "b.weight", "flat_index": 3, "layer": 2, "row": 1, "col": 0}]
    rows = [("b.weight", 9, 5.0), ("a.weight", 7, 4.0), ("a.weight", 3, 1.0)]
    got = swr.overlap_with_topk(cands, rows)
    assert [(g["in_topk"], g["rank"]) for g in got] == [(True, 2), (False, None)]
    assert swr.overlap_with_topk(cands, [("b.weight", 3)])[1]["rank"] == 1


# ---------------------------------------------------------------- the real embedded model


def test_real_smollm2_candidates_are_valid_super_weights(wikitext2):
    """SmolLM2-135M (30 layers, hidden 576, intermediate 1536): every candidate is a real down_proj element,
    and zeroing the candidates hurts far more than zeroing as many random weights of the same matrices."""
    from esa.data import load_data
    from esa.model.loading import load_model

    model, tok = load_model("smollm2-135m", "cpu", "fp32")
    before = params(model)
    windows = load_data(tok, str(wikitext2), None, 96, 2, 0).eval_windows
    res = swr.run_super_weights(model, swr.prompt_input_ids(tok, swc.DEFAULT_PROMPT),
                                Measurer.perplexity(model, windows, 2), tokenizer=tok)
    assert_bit_identical(model, before)
    assert len(res["projections"]) == 30 and 1 <= len(res["candidates"]) <= swc.DEFAULT_MAX_SUPER_WEIGHTS
    for c in res["candidates"]:
        w = model.get_parameter(c["param"])
        assert c["module"] == f"model.layers.{c['layer']}.mlp.down_proj" and 0 <= c["layer"] < 30
        assert 0 <= c["row"] < 576 and 0 <= c["col"] < 1536 and w.shape == (576, 1536)
        assert float(w[c["row"], c["col"]]) == c["weight"] and c["flat_index"] == c["row"] * 1536 + c["col"]
        assert c["output_ratio"] >= swc.DEFAULT_THRESHOLD
    abl = res["ablation"]
    assert abl["all"]["ratio"] > 10 and 0.95 < abl["random"]["ratio"] < 1.05


def test_the_ablation_rows_reach_the_evaluators_own_results_files():
    """Every ablation condition (each candidate, all, the random control) is a row of the detector's
    seed, as the tasks evaluator's task_results.json reads them; no ablation, no rows."""
    each = [{"param": "model.layers.1.mlp.down_proj.weight", "row": 3, "col": 7, "ppl": 9.0, "tasks": {"piqa": {}}}]
    abl = {"seed": 5, "each": each, "all": {"ppl": 10.0, "tasks": {}}, "random": {"ppl": 2.0, "tasks": {}}}
    m = swr.ablation_measured({"ablation": abl})
    assert (m.experiment, list(m.rows), list(m.rows[5])) == ("super_weights", [5], ["ablation"])
    assert m.rows[5]["ablation"] == {"zeroing model.layers.1.mlp.down_proj.weight[3, 7]": each[0],
                                     "zeroing every candidate": abl["all"],
                                     "zeroing as many random weights": abl["random"]}
    assert swr.ablation_measured({"ablation": None}) is None
    assert swr.ablation_measured({"ablation": {**abl, "each": []}}) is None
