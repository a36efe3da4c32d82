"""--prune / --prune-pattern: act_mag + per_row = a plain-loop Wanda, the restored model, the files
of a multi-metric run, the checkpointed masks and the usage errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import esa_runner
from esa.config import RunConfig
from esa.experiment.prune import unpack
from esa.model.device import resolve_device
from esa.model.forward import perplexity
from esa.outdir.manifest import Manifest
from esa.runner import checkpoint
from esa.runner.experiments import measure_experiments
from esa.runner.pipeline import load
from esa.runner.seeds import SeedScores, score_seed
from tests.realmodels import CORPUS, tiny_model_dir
from tests.runner.test_pipeline import state_hash
from tests.runner.test_quantization import args as quantization_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def args(tiny: str, out) -> list[str]:
    """The quantization tests' tiny run, per_row on one seed (a later flag wins)."""
    return quantization_args(tiny, out) + ["--topk", "2", "--mode", "per_row", "--seeds", "0"]


@pytest.mark.parametrize("extra, needle", [
    (["--prune", "0"], "--prune takes sparsities strictly between 0 and 1"),
    (["--prune", "1"], "--prune takes sparsities strictly between 0 and 1"),
    (["--prune", "1.5"], "--prune takes sparsities strictly between 0 and 1"),
    (["--prune", "0.5,half"], "got 'half'"),
    (["--prune", "0.5,0.50"], "--prune names a value twice"),
    (["--prune-pattern", "4:4"], "--prune-pattern takes N:M with 1 <= N < M"),
    (["--prune-pattern", "5:4"], "--prune-pattern takes N:M with 1 <= N < M"),
    (["--prune-pattern", "0:4"], "--prune-pattern takes N:M with 1 <= N < M"),
    (["--prune-pattern", "2-4"], "--prune-pattern takes N:M"),
    (["--prune-pattern", "1:3"], "M = 3 does not divide the rows of"),  # the tiny model's rows: 16 or 32 inputs
    (["--prune", "0.5", "--perturb", "zero"], "--prune cannot be combined with --perturb"),
    (["--prune", "0.5", "--controls", "random_k"], "--controls applies to --perturb; --prune compares"),
])
def test_bad_pruning_flags_exit_2(tiny, tmp_path, capsys, extra, needle):
    assert esa_runner.main(args(tiny, tmp_path / "o") + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err)


def wanda_masks(model, targets, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Wanda (Sun et al. 2023) written out: ||X_j||_2 of each linear layer's input over the calibration
    tokens, W_metric = |W| * ||X||, per output row the lowest int(n_in * 0.5) removed."""
    sumsq, hooks = {}, []
    linears = {t.name: t.uses[0].module for t in targets}
    for name, mod in linears.items():
        assert isinstance(mod, torch.nn.Linear)

        def hook(_m, inputs, _out, name=name):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sumsq[name] = sumsq.get(name, 0) + (x * x).sum(dim=0)
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:  # one window at a time: the sum over tokens does not care
            model(w[None])
    for h in hooks:
        h.remove()
    out = {}
    for name, mod in linears.items():
        metric = mod.weight.detach().double().abs() * sumsq[name].sqrt()[None, :]
        mask = torch.zeros_like(metric, dtype=torch.bool)
        for r in range(metric.shape[0]):
            order = sorted(range(metric.shape[1]), key=lambda j, r=r: float(metric[r, j]))
            mask[r, order[:int(metric.shape[1] * 0.5)]] = True
        out[name] = mask
    return out


def context(tiny, tmp_path, dtype: str, **kw):
    cfg = RunConfig.of(model=tiny, device="cpu", dtype=dtype, topk=2, max_length=32, max_samples=4, eval_samples=2,
                       data_file=str(CORPUS), out_dir=str(tmp_path), controls=(), **kw)
    return cfg, load(cfg, resolve_device("cpu", True, dtype, True), "cpu", tmp_path, Manifest(tmp_path))


def test_act_mag_per_row_half_is_wanda_and_measures_the_wanda_pruned_model(tiny, tmp_path):
    cfg, ctx = context(tiny, tmp_path, "fp32", metrics=("act_mag",), mode="per_row", prune=("0.5",))
    sel = score_seed(ctx, 0, write_stats=False).results["act_mag"]
    windows = ctx.data.calib_pool[torch.tensor(sel.calibration_windows)]
    want = wanda_masks(ctx.model, ctx.targets, windows)
    kept = sel.kept["pruning"]
    assert {t.name for t in ctx.targets} == set(want) and len(want) == 14  # every linear weight, no embedding
    for t in ctx.targets:
        assert torch.equal(unpack(kept[f"0.5|{t.name}"], t.shape), want[t.name]), t.name
    ref = copy.deepcopy(ctx.model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in want:
                p[want[name]] = 0.0
    res = measure_experiments(ctx, [sel])["pruning"]
    row = res["per_seed"]["0"]["0.5"]["metric"]
    assert row["ppl"] == perplexity(ref, ctx.data.eval_windows, cfg.data.batch_size)["ppl"]
    assert row["removed"] == sum(t.numel for t in ctx.targets) // 2 and row["removed_share"] == 0.5


def test_every_condition_leaves_the_model_bit_exact_and_the_masks_survive_the_checkpoint(tiny, tmp_path):
    cfg, ctx = context(tiny, tmp_path, "bf16", metrics=("grad_x_weight",), mode="global", prune=("0.3", "0.7"),
                       prune_pattern=("2:4",))
    before = state_hash(ctx.model)
    sel = score_seed(ctx, 0, write_stats=False).results["grad_x_weight"]
    res = measure_experiments(ctx, [sel])["pruning"]
    assert state_hash(ctx.model) == before
    rows = res["per_seed"]["0"]
    assert list(rows) == ["0.3", "0.7", "2:4"]
    assert all(set(r) == {"metric", "magnitude", "random"} for r in rows.values())
    total = sum(t.numel for t in ctx.targets)
    for level, share in (("0.3", 0.3), ("0.7", 0.7), ("2:4", 0.5)):  # global: floor(s * all pruned weights)
        assert all(r["removed"] == int(total * share) for r in rows[level].values()), level
        assert all(r["ppl"] != res["baseline"]["ppl"] for r in rows[level].values())
    checkpoint.save_seed(tmp_path, 0, SeedScores({"grad_x_weight": sel}))
    back = checkpoint.load_seed(tmp_path, 0).results["grad_x_weight"].kept["pruning"]
    assert list(back) == list(sel.kept["pruning"])
    assert all(torch.equal(back[k], v) for k, v in sel.kept["pruning"].items())


def test_multi_metric_run_writes_each_metric_and_the_shared_figure(tiny, tmp_path, capsys):
    out = tmp_path / "m"
    argv = args(tiny, out) + ["--metric", "act_mag,magnitude", "--prune", "0.5", "--prune-pattern", "2:4"]
    assert esa_runner.main(argv + ["--dry-run"]) == 0
    assert "0.5, 2:4 (per_row; N:M per row); conditions metric, magnitude, random x seeds 0: at most 9 evaluations" \
        in capsys.readouterr().out
    assert esa_runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Metric × sparsity → pruned perplexity" in printed
    res = {m: json.loads((out / "metrics" / m / "pruning_results.json").read_text()) for m in ("act_mag", "magnitude")}
    mag = res["magnitude"]["per_seed"]["0"]
    for level in ("0.5", "2:4"):  # magnitude pruning by the metric = the magnitude control: one measurement
        assert mag[level]["metric"]["ppl"] == mag[level]["magnitude"]["ppl"]
        assert res["act_mag"]["per_seed"]["0"][level]["random"] == mag[level]["random"]  # same seed, same draw
    assert (out / "pruning.png").is_file() and (out / "metrics" / "act_mag" / "pruning.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Metric × sparsity → pruned perplexity" in report and "![pruning](pruning.png)" in report
    single = (out / "metrics" / "act_mag" / "report.md").read_text()
    assert "## Pruning" in single and "pruning 0.5, 2:4 (per_row)" in single
