"""--quantize rtn: the experiment's conditions, results, restored model, plan and usage errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

import esa_runner
from esa.config import RunConfig
from esa.data import load_data
from esa.experiment.quantization import quantizable
from esa.experiment.quantize import RTN, quantized
from esa.model.device import resolve_device
from esa.model.forward import perplexity
from esa.model.loading import load_model
from esa.model.targets import find_targets
from esa.outdir.manifest import Manifest
from esa.runner.experiments import measure_experiments
from esa.runner.pipeline import load
from esa.runner.seeds import score_seed
from tests.realmodels import CORPUS, embedded_dir, tiny_model_dir
from tests.runner.test_pipeline import state_hash


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def args(tiny: str, out) -> list[str]:
    return ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS), "--max-length", "32",
            "--max-samples", "4", "--eval-samples", "4", "--topk", "5", "--mode", "global", "--metric", "act_mag",
            "--seeds", "0,1", "--out-dir", str(out)]


@pytest.mark.parametrize("extra, needle", [
    (["--quantize", "rtn", "--perturb", "zero"], "--quantize cannot be combined with --perturb"),
    (["--quantize", "rtn", "--bits", "9"], "--bits must be in 2..8"),
    (["--quantize", "rtn", "--bits", "1"], "--bits must be in 2..8"),
    (["--bits", "4"], "--bits only applies with --quantize"),
    (["--block-size", "channel"], "--block-size only applies with --quantize"),
    (["--quantize", "rtn", "--block-size", "channel,rows"], "--block-size takes channel, tensor or a positive"),
    (["--quantize", "rtn", "--block-size", "16,16"], "names a block size twice"),
    (["--quantize", "rtn", "--block-size", "0"], "--block-size takes"),
    (["--quantize", "rtn", "--clip-z", "0"], "--clip-z must be a positive"),
    (["--quantize", "rtn", "--controls", "random_k"], "--controls applies to --perturb"),
    (["--quantize", "gptq"], "invalid choice"),
])
def test_bad_quantization_flags_exit_2(tiny, tmp_path, capsys, extra, needle):
    assert esa_runner.main(args(tiny, tmp_path / "o") + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err)


def test_dry_run_shows_conditions_block_sizes_seeds_and_evaluations(tiny, tmp_path, capsys):
    argv = args(tiny, tmp_path / "o") + ["--quantize", "rtn", "--block-size", "channel,64,tensor",
                                          "--detect-super-weights", "--dry-run"]
    assert esa_runner.main(argv) == 0
    out = capsys.readouterr().out
    assert ("rtn 4-bit; conditions none, protect_topk, protect_random_k, protect_super_weights x block sizes "
            "channel, 64, tensor x seeds 0, 1: at most 19 perplexity evaluations") in out
    assert "quantization_results.json" in out and not (tmp_path / "o").exists()
    assert "scores and Top-K only" not in out and "perturb:" not in out  # a quantization run perturbs nothing


def test_run_writes_every_condition_and_the_statistics(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert esa_runner.main(args(tiny, out) + ["--quantize", "rtn", "--bits", "3", "--block-size", "channel,64,tensor",
                                              "--detect-super-weights"]) == 0
    printed = capsys.readouterr()
    summary = printed.out
    assert "quantize=rtn 3-bit" in summary and "perturb=" not in summary and "scores and Top-K only" not in summary
    logged = [re.findall(r"\d+\.\d+", ln.split(" INFO ")[-1]) for ln in printed.err.splitlines() if "perplexity" in ln]
    assert sum(map(bool, logged)) > 10
    for numbers in logged:  # a log line quotes perplexities and ratios to 6 significant digits, not 16
        assert all(len(n.replace(".", "").lstrip("0")) <= 6 for n in numbers), numbers
    res = json.loads((out / "quantization_results.json").read_text())
    assert res["block_sizes"] == ["channel", "64", "tensor"] and res["seeds"] == [0, 1]
    config = json.loads((out / "config.json").read_text())
    assert "model.embed_tokens.weight" in config["coverage"]["excluded"]  # not quantized, so not selected
    for seed in ("0", "1"):
        for b in res["block_sizes"]:
            rows = res["per_seed"][seed][b]
            assert set(rows) == {"none", "protect_topk", "protect_random_k", "protect_super_weights"}
            assert rows["none"]["protected"] == 0 and rows["protect_topk"]["protected"] == 5
            assert rows["protect_random_k"]["protected"] == 5
            for r in rows.values():
                assert r["ratio"] == pytest.approx(r["ppl"] / res["baseline"]["ppl"])
                assert r["mse_unprotected"] > 0
            # protecting the Top-K (large act_mag = large |w| here) shrinks the scales: less error elsewhere
            assert rows["protect_topk"]["mse_unprotected"] < rows["none"]["mse_unprotected"]
        assert res["per_seed"][seed]["channel"]["none"] == res["per_seed"]["0"]["channel"]["none"]  # seed-free
    assert "protect_topk_vs_protect_random_k" in res["tests"]["channel"]
    assert res["evaluated_once"][:2] == ["none", "protect_super_weights"]  # seed-free: measured once
    assert (out / "quantization.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| channel |" in report and "quantization.png" in report
    assert "quantization RTN 3-bit, block sizes channel, 64, tensor" in report and "perturbation none" not in report
    head, *rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in report.splitlines() if ln.startswith("| ")][:4]
    for row in rows[1:]:  # one evaluation has no spread: no ± at all; the per-seed conditions keep theirs
        cells = dict(zip(head, row))
        assert "±" not in cells["none"] + cells["protect_super_weights"] and "±" in cells["protect_random_k"], row
    assert "evaluated once" in report


def test_every_condition_leaves_the_model_bit_exact(tiny, tmp_path):
    cfg = RunConfig.of(model=tiny, device="cpu", dtype="bf16", metrics=("grad_x_weight",), topk=4, max_length=32,
                       max_samples=4, eval_samples=2, data_file=str(CORPUS), out_dir=str(tmp_path), quantize="rtn",
                       bits=2, block_sizes=("channel", 16, "tensor"), controls=())
    ctx = load(cfg, resolve_device("cpu", True, "bf16", True), "cpu", tmp_path, Manifest(tmp_path))
    before = state_hash(ctx.model)
    result = score_seed(ctx, 0, write_stats=False).results[cfg.metric]
    res = measure_experiments(ctx, [result])["quantization"]
    assert state_hash(ctx.model) == before
    rows = res["per_seed"]["0"]
    assert all(r["ppl"] != res["baseline"]["ppl"] for b in rows.values() for r in b.values())  # 2 bits hurt


def test_int8_per_channel_barely_changes_the_embedded_model():
    """A sanity check of the quantizer on the real SmolLM2-135M: 8-bit per-channel RTN of every linear
    weight changes perplexity by less than 0.5 %."""
    model, tok = load_model(str(embedded_dir()), "cpu", "fp32")
    targets, _ = quantizable(model, find_targets(model), False)
    data = load_data(tok, str(CORPUS), None, 128, 4, 1)
    base = perplexity(model, data.eval_windows, 4)["ppl"]
    with torch.no_grad(), quantized(targets, RTN(8, "channel")):
        q = perplexity(model, data.eval_windows, 4)["ppl"]
    assert abs(q / base - 1) < 0.005, (q, base)
    with quantized(targets, RTN(3, "channel")):
        assert perplexity(model, data.eval_windows, 4)["ppl"] > 1.05 * base  # the check can fail
