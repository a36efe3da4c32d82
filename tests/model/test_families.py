"""Every weight of every family: tiny random models of twelve Hugging Face families (MoE included)
run end to end through the command line with grad_x_weight and act_mag, scoring 100 % of their
matrix weights; fused-expert act_mag against a brute-force loop over routed tokens; a planted
expert weight reported with (layer, expert, row, col); a planted super weight in an expert found
by the detector with its expert index."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

import esa_runner
from esa.metrics import compute_scores
from esa.model.targets import find_targets
from esa.superweights import detect as sw
from tests.model_families import FAMILIES, build, family_dir
from tests.realmodels import CORPUS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda family: family_dir(family, root / family)


def run_cli(model_dir, out, metric: str, *extra: str) -> dict:
    argv = ["--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
            "--max-length", "16", "--max-samples", "2", "--eval-samples", "2", "--batch-size", "2", "--metric", metric,
            "--mode", "global", "--topk", "5", "--perturb", "zero", "--out-dir", str(out), *extra]
    assert esa_runner.main(argv) == 0
    return json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("metric", ["grad_x_weight", "act_mag"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_scores_every_matrix_weight(dirs, tmp_path, family, metric):
    cfg = run_cli(dirs(family), tmp_path / "o", metric)
    cov = cfg["coverage"]
    # a weight no F.linear/matmul reads (gpt_oss's stacked expert biases) has no input features: act_mag
    # knows it before scoring and lists it with the reason; every other matrix weight is scored
    unread = {n: e for n, e in cov["excluded"].items() if "not read as a linear map" in e["reason"]}
    assert cov["scored_weights"] + sum(e["numel"] for e in unread.values()) == cov["matrix_weights"] > 0
    assert bool(unread) == (metric == "act_mag" and family == "gpt_oss")
    with open(tmp_path / "o" / "top_weights.csv", newline="") as fh:
        for r in csv.DictReader(fh):  # row/col in the module's (out, in) convention, whatever the storage
            at, layout = r["coords"].split(","), cfg["targets"]["layouts"].get(r["parameter"], ["out", "in"])
            assert (r["row"], r["col"]) == (at[layout.index("out")], at[layout.index("in")])
            assert r["expert"] == (at[0] if layout[0] == "expert" else "")
    assert cov["all_weights"] >= cov["matrix_weights"]
    assert all("1-D" in e["reason"] or n in unread for n, e in cov["excluded"].items())  # norms and biases


def routed_input_norms(model, windows) -> dict[str, torch.Tensor]:
    """Brute force, float64: per MoE layer, sum over routed tokens of x_j^2 per expert for gate_up_proj
    (the block input) and down_proj (act(gate) * up), routing recomputed from the router weights."""
    out, inputs = {}, {}
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__ == "MixtralSparseMoeBlock"}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].detach()))
               for n, m in blocks.items()]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    for name, block in blocks.items():
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in inputs[name]]).double()
        probs = torch.softmax(x @ block.gate.weight.double().T, dim=-1)
        chosen = torch.topk(probs, block.top_k, dim=-1).indices
        ex = block.experts
        gu_sum = torch.zeros(ex.num_experts, x.shape[1], dtype=torch.float64)
        down_sum = torch.zeros(ex.num_experts, ex.intermediate_dim, dtype=torch.float64)
        for e in range(ex.num_experts):
            for t in range(x.shape[0]):
                if e in chosen[t]:
                    gate, up = (ex.gate_up_proj[e].double() @ x[t]).chunk(2)
                    h = F.silu(gate) * up
                    gu_sum[e] += x[t] ** 2
                    down_sum[e] += h ** 2
        out[f"{name}.experts.gate_up_proj"] = gu_sum
        out[f"{name}.experts.down_proj"] = down_sum
    return out


def test_expert_act_mag_matches_a_loop_over_routed_tokens():
    model = build("mixtral", 64, seed=3)
    windows = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    targets = find_targets(model)
    scores = compute_scores("act_mag", model, targets, windows, 2)
    ref = routed_input_norms(model, windows)
    for name, sums in ref.items():
        w = model.get_parameter(name).detach().double().abs()  # [E, out, in]
        expected = w * sums.sqrt()[:, None, :]
        assert torch.allclose(scores[name].double(), expected, rtol=1e-4, atol=1e-6), name
        assert (sums > 0).all()  # every expert was routed some token: the check is not vacuous
    router = scores["model.layers.0.mlp.gate.weight"]
    assert router.shape == (4, 16) and (router > 0).all()


def test_planted_expert_weight_is_rank_one_with_its_coordinates(dirs, tmp_path):
    src = dirs("mixtral")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 5, 7] = 60.0  # [expert, out, in]
    planted = tmp_path / "planted"
    model.save_pretrained(planted)
    for f in src.glob("tokenizer*"):
        (planted / f.name).write_bytes(f.read_bytes())
    for metric in ("magnitude", "act_mag"):
        out = tmp_path / metric
        run_cli(planted, out, metric)
        with open(out / "top_weights.csv", newline="") as fh:
            first = next(csv.DictReader(fh))
        assert first["parameter"] == "model.layers.1.mlp.experts.down_proj"
        assert (first["expert"], first["row"], first["col"]) == ("2", "5", "7"), metric
        assert first["coords"] == "2,5,7"


@torch.no_grad()
def test_super_weight_in_an_expert_is_found_with_its_expert_index():
    model = build("mixtral", 64, seed=1, num_hidden_layers=4)
    layer, expert, row, col, source = 2, 1, 9, 21, 4
    inter = model.config.intermediate_size
    model.model.embed_tokens.weight[:, source] = 5.0  # a constant residual channel at every depth
    for blk in model.model.layers:
        blk.self_attn.o_proj.weight[source].zero_()
        blk.mlp.experts.down_proj[:, source, :] = 0.0
    moe = model.model.layers[layer].mlp
    moe.gate.weight[expert, source] = 10.0  # every token is routed to the planted expert
    for r in (col, inter + col):  # gate and up rows of channel col: silu(3 x_s) * 3 x_s for every token
        moe.experts.gate_up_proj[expert, r].zero_()
        moe.experts.gate_up_proj[expert, r, source] = 3.0
    moe.experts.down_proj[expert, :, col] = 0.0
    moe.experts.down_proj[expert, row, col] = 20.0
    before = {n: p.clone() for n, p in model.named_parameters()}
    det = sw.detect_super_weights(model, torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0)))
    cands = det["candidates"]
    assert [(c.layer, c.expert, c.row, c.col) for c in cands][:1] == [(layer, expert, row, col)]
    c = cands[0]
    assert c.param == f"model.layers.{layer}.mlp.experts.down_proj" and c.kind == "expert"
    w = model.get_parameter(c.param)
    assert w.view(-1)[c.flat_index] == 20.0 and c.flat_index == (expert * w.shape[1] + row) * w.shape[2] + col
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored


def mean_nll(model, windows) -> torch.Tensor:
    logits = model(input_ids=windows, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))


def test_gradient_and_curvature_metrics_cover_fused_experts():
    """grad_x_weight of a 3-D expert tensor equals |w * dL/dw| from one autograd call on the whole
    batch; the curvature metrics score every expert (finite, and non-zero for routed experts)."""
    model = build("mixtral", 64, seed=3)
    windows = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    targets = find_targets(model)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    w = model.get_parameter(name)
    w.requires_grad_(True)
    (grad,) = torch.autograd.grad(mean_nll(model, windows), [w])
    w.requires_grad_(False)
    got = compute_scores("grad_x_weight", model, targets, windows, 1)[name]
    assert torch.allclose(got, (w.detach() * grad).abs(), rtol=1e-4, atol=1e-9)
    for metric in ("grad_squared", "hessian_diag", "hutchinson_diag"):
        s = compute_scores(metric, model, targets, windows, 2)[name]
        assert s.shape == w.shape and torch.isfinite(s).all() and (s.flatten(1).sum(1) > 0).sum() >= 2, metric


def test_bit_flip_on_an_expert_tensor_restores_bit_exactly():
    from esa.experiment.perturb import perturbed
    from esa.experiment.selection import Selection

    model = build("mixtral", 64, seed=2)
    t = next(t for t in find_targets(model) if t.name.endswith("experts.down_proj"))
    before = t.param.detach().clone()
    idx = torch.tensor([0, 17, t.numel - 1])
    sel = Selection("top_k", {t.name: idx}, {t.name: torch.zeros(3)})
    with perturbed({t.name: t}, sel, "bit_flip", 1.0, 1.0, torch.Generator()) as info:
        assert info["n_changed"] == 3 and not torch.equal(t.param, before)
    assert torch.equal(t.param.view(torch.int32), before.view(torch.int32))


def test_opt_learned_positions_count_the_positions_it_looks_up():
    """OPT's positional embedding is called with the attention mask (which crashed act_mag's hook);
    its act_mag now counts the position ids it really reads: offset 2, once per window."""
    model = build("opt", 64, seed=0)
    windows = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    targets = find_targets(model)
    scores = compute_scores("act_mag", model, targets, windows, 2)
    pos = model.model.decoder.embed_positions.weight.detach()
    counts = torch.zeros(pos.shape[0])
    counts[2:12] = 3.0  # positions 0..9 of 3 windows, stored at offset 2
    assert torch.allclose(scores["model.decoder.embed_positions.weight"], pos.abs() * counts.sqrt()[:, None])


def test_targets_all_adds_vectors_and_act_mag_lists_what_it_cannot_score(caplog):
    from esa.config import RunConfig
    from esa.model.targets import coverage
    from esa.runner.pipeline import scorable_targets, warn_partial_coverage

    model = build("mixtral", 64)
    n_all = sum(p.numel() for p in model.parameters())
    grad, excluded = scorable_targets(RunConfig.of(targets="all", metrics=("grad_x_weight",)), model)
    assert excluded == {} and sum(t.numel for t in grad) == n_all  # norms too
    act, excluded = scorable_targets(RunConfig.of(targets="all", metrics=("act_mag",)), model)
    assert excluded and all("input-feature axis" in why for why in excluded.values())
    assert {t.name for t in act} | set(excluded) == {t.name for t in grad}
    assert "cannot score" in caplog.text
    cov = coverage(model, act, excluded)
    assert cov["scored_weights"] == cov["matrix_weights"] and set(cov["excluded"]) == set(excluded)
    # a 4-D weight has no known layout: act_mag cannot score it, and the run says so
    model.model.layers[0].mlp.register_parameter("odd", torch.nn.Parameter(torch.ones(2, 2, 2, 2), False))
    act, excluded = scorable_targets(RunConfig.of(metrics=("act_mag",)), model)
    cov = coverage(model, act, excluded)
    assert "model.layers.0.mlp.odd" in cov["excluded"] and cov["scored_share_of_matrix_weights"] < 1.0
    assert warn_partial_coverage(RunConfig.of(metrics=("act_mag",)), cov)
    assert "model.layers.0.mlp.odd (16)" in caplog.text
    assert not warn_partial_coverage(RunConfig.of(metrics=("act_mag",), exclude=("odd",)), cov)
