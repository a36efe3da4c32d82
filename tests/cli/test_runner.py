"""The command line: every flag exists, aliases normalise, bad input -> one line + exit 2, manifests."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import matplotlib.image
import pytest
import torch

import esa.evaluators.perplexity
import esa.runner.seeds
import esa_runner
from tests.realmodels import CORPUS, REPO, tiny_model_dir

FLAGS = ["--model", "-m", "--device", "--dtype", "--metric", "--mode", "--topk", "--perturb", "--perturb-scale",
         "--bit-index", "--hutchinson-samples", "--curvature-samples",
         "--perturb-prob", "--controls", "--seeds", "--stability-check", "--data-file", "--dataset",
         "--max-samples", "--eval-samples", "--max-length", "--batch-size", "--include", "--exclude",
         "--out-dir", "--save-plots", "--verbose"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def small_args(tiny: str, out) -> list[str]:
    return ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
            "--max-length", "32", "--max-samples", "4", "--eval-samples", "4", "--topk", "3",
            "--out-dir", str(out)]


@pytest.mark.parametrize("script", ["esa_runner.py", "phase1_runner_enhanced.py"])
def test_help_shows_every_flag(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, check=True)
    for flag in FLAGS:
        assert flag in out.stdout, flag
    assert "default: cuda" in out.stdout  # the help says what the default device is


def test_shim_runs_the_same_main():
    src = (REPO / "phase1_runner_enhanced.py").read_text()
    assert "esa_runner.main()" in src
    out = subprocess.run([sys.executable, "phase1_runner_enhanced.py", "--topk", "0"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --topk must be a positive integer, got 0"


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["--topk", "0"], "--topk must be a positive"),
    (["--topk", "-5"], "--topk must be a positive"),
    (["--seeds", "1,x"], "--seeds must be"),
    (["--seeds", "1,1"], "duplicates"),
    (["--controls", "random_k,foo"], "unknown control 'foo'"),
    (["--metric", "nope"], "unknown --metric"),
    (["--metric", "act_mag,nope"], "unknown --metric 'nope'"),
    (["--metric", "act_mag,wanda"], "--metric names act_mag more than once"),
    (["--metric", ","], "--metric is empty"),
    (["--metric", "act_mag", "--gradient-checkpointing"], "only applies to gradient metrics"),
    (["--bit-index", "3"], "only applies to --perturb bit_flip"),
    (["--perturb", "bit_flip", "--bit-index", "40"], "--bit-index must be in 0..31"),
    (["--hutchinson-samples", "0"], "--hutchinson-samples must be positive"),
    (["--curvature-samples", "0"], "--curvature-samples must be positive"),
    (["--data-file", "/no/such/file.txt"], "does not exist"),
    (["--data-dir", "/tmp"], "--data-dir needs --dataset"),
    (["--dataset", "wikitext2", "--data-dir", "/no/such/dir"], "does not exist or is not a folder"),
    (["--perturb-prob", "0"], "--perturb-prob"),
    (["--include", "("], "not a valid regular expression"),
    (["--mode", "sideways"], "invalid choice"),
])
def test_bad_flags_one_line_exit_2(argv, needle, capsys):
    assert esa_runner.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in _one_error_line(err)


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert esa_runner.main(["--data-file", str(empty)]) == 2
    assert "is empty" in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_explicit_cuda_without_cuda_is_an_error(tiny, tmp_path, capsys):
    argv = small_args(tiny, tmp_path / "o") + ["--device", "cuda"]
    assert esa_runner.main(argv) == 2
    assert "CUDA is not available" in _one_error_line(capsys.readouterr().err)


def test_bad_inputs_after_loading(tiny, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "no-such-model")], "does not exist"),
        (["--topk", "100000"], "too large"),
        (["--out-dir", str(tmp_path / "file.txt" / "sub")], "not writable"),
        (["--max-samples", "100000"], "too little text"),
        (["--include", "no_such_parameter_name"], "no target weights"),
        (["--perturb", "bit_flip", "--bit-index", "20", "--dtype", "bf16"], "out of range for torch.bfloat16"),
    ]
    (tmp_path / "file.txt").write_text("x")
    for i, (extra, needle) in enumerate(cases):  # each in its own out-dir: a failed run leaves its manifest
        assert esa_runner.main(small_args(tiny, tmp_path / f"o{i}") + extra) == 2, extra
        assert needle in _one_error_line(capsys.readouterr().err), extra


def test_dataset_from_local_raw_files_is_recorded_in_config(tiny, tmp_path, monkeypatch, capsys):
    """--dataset wikitext2 offline, with ESA_WIKITEXT2_RAW naming a local wiki.test.raw."""
    raw = tmp_path / "wikitext-2-raw"
    raw.mkdir()
    (raw / "wiki.test.raw").write_text(CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setenv("ESA_WIKITEXT2_RAW", str(raw / "wiki.test.raw"))
    argv = small_args(tiny, tmp_path / "o")
    i = argv.index("--data-file")
    argv[i:i + 2] = ["--dataset", "wikitext2"]
    assert esa_runner.main(argv) == 0
    source = json.loads((tmp_path / "o" / "config.json").read_text())["data"]["data_source"]
    assert source.startswith("local:wikitext2 raw files via ESA_WIKITEXT2_RAW") and str(raw) in source


def test_verbose_shows_the_traceback(capsys):
    assert esa_runner.main(["--topk", "0", "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_aliases_are_canonical_in_config(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    argv = small_args(tiny, out) + ["--metric", "activation_magnitude", "--perturb", "gaussian",
                                    "--perturb-scale", "0.5"]
    assert esa_runner.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["metric"] == "act_mag"
    assert cfg["config"]["perturb"] == "gauss_noise"
    res = json.loads((out / "perturbation_results.json").read_text())
    assert set(res["conditions"]) == {"top_k", "random_k", "bottom_k"}


def test_full_run_writes_every_output(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert esa_runner.main(small_args(tiny, out) + ["--perturb", "zero", "--seeds", "5", "--save-plots"]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "top_k" in printed and "top-5 weights" in printed
    for name in ("config.json", "experiment_manifest.json", "top_weights.csv", "sensitivity_stats.json",
                 "perturbation_results.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["status"] == "success" and manifest["error"] is None
    for png in ("plots/topk_locations.png", "plots/perturbation_effect.png"):
        assert png in manifest["files"]
        pixels = matplotlib.image.imread(out / png)
        assert (out / png).stat().st_size > 5000 and pixels.std() > 0.05, png
    assert {"load_model", "scoring", "evaluation"} <= set(manifest["timings_s"])
    assert manifest["peak_memory"]["rss_peak_mb"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"] == {**cfg["resolved"], "device": "cpu", "dtype": "fp32"}
    assert cfg["data"]["bos_policy"]["policy"] in ("none", "prepend_bos")
    assert cfg["data"]["data_source"].startswith("file:")
    assert cfg["versions"]["torch"]
    with open(out / "top_weights.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["rank", "parameter", "index", "coords", "score", "seed", "tensor_rank", "expert", "row",
                              "col"]
    assert all(r["expert"] == "" and r["row"] != "" and r["col"] != "" for r in table)  # no fused experts here
    n_targets = cfg["targets"]["count"]
    assert len(table) == 3 * n_targets  # per_layer: k per target tensor
    assert all(r["seed"] == "5" for r in table)
    assert [int(r["rank"]) for r in table] == list(range(1, len(table) + 1))  # across all tensors
    for name in {r["parameter"] for r in table}:  # within each tensor: 1..k in score order
        mine = [r for r in table if r["parameter"] == name]
        assert [int(r["tensor_rank"]) for r in mine] == [1, 2, 3]
        assert [float(r["score"]) for r in mine] == sorted((float(r["score"]) for r in mine), reverse=True)
    res = json.loads((out / "perturbation_results.json").read_text())
    for cond in res["conditions"].values():
        assert cond["n_selected"] == cond["n_perturbed"] == 3 * n_targets
        assert 0 <= cond["n_changed"] <= cond["n_perturbed"]
        assert cond["ratio"] == pytest.approx(cond["ppl"] / res["baseline"]["ppl"])
    stats = json.loads((out / "sensitivity_stats.json").read_text())["tensors"]
    assert len(stats) == n_targets
    one = next(iter(stats.values()))
    assert {"count", "mean", "std", "min", "max", "p50", "p95", "p99", "p99.9", "top_share"} <= set(one)


def test_auto_named_out_dir(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in small_args(tiny, "x") if a not in ("--out-dir", "x")]
    assert esa_runner.main(argv) == 0
    made = list((tmp_path / "outputs").iterdir())
    assert len(made) == 1 and "grad_x_weight_per_layer_k3" in made[0].name


def test_crash_leaves_failed_manifest(tiny, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("synthetic failure")
    monkeypatch.setattr(esa.runner.seeds, "score_metrics", boom)
    out = tmp_path / "run"
    assert esa_runner.main(small_args(tiny, out)) == 1
    assert "synthetic failure" in _one_error_line(capsys.readouterr().err)
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["status"] == "failed" and "synthetic failure" in manifest["error"]


def test_ctrl_c_leaves_interrupted_manifest(tiny, tmp_path, monkeypatch, capsys):
    real = esa.evaluators.perplexity.perplexity
    calls = []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(esa.evaluators.perplexity, "perplexity", interrupt_second)  # the baseline, each condition
    out = tmp_path / "run"
    assert esa_runner.main(small_args(tiny, out) + ["--perturb", "sign_flip"]) == 130
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["status"] == "interrupted"


def test_bit_flip_to_nan_is_reported_as_inf_not_a_crash(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert esa_runner.main(small_args(tiny, out) + ["--perturb", "bit_flip", "--seeds", "0,1"]) == 0
    res = json.loads((out / "perturbation_results.json").read_text())
    assert res["bit_index"] == 30  # fp32's most significant exponent bit
    top = res["conditions"]["top_k"]
    assert top["ppl"] == "inf" and top["ratio"] == "inf"  # strict JSON: non-finite floats as strings
    assert top["n_perturbed"] == top["n_changed"] > 0
    assert res["tests"]["top_k_vs_random_k"]["p_value"] is None  # undefined, with a note, never 0
    assert json.loads((out / "experiment_manifest.json").read_text())["status"] == "success"


@pytest.mark.parametrize("metric,extra", [("hutchinson_diag", ["--hutchinson-samples", "2"]),
                                          ("hessian_diag", ["--curvature-samples", "2"])])
def test_curvature_metrics_run_end_to_end(tiny, tmp_path, metric, extra, capsys):
    out = tmp_path / metric
    assert esa_runner.main(small_args(tiny, out) + ["--metric", metric, "--perturb", "zero"] + extra) == 0
    stats = json.loads((out / "sensitivity_stats.json").read_text())["tensors"]
    one = next(iter(stats.values()))
    assert ("signed_estimate" in one) == (metric == "hutchinson_diag")
    assert one["min"] >= 0.0


def test_help_and_dry_run_do_not_import_the_heavy_libraries():
    """--help and --dry-run must answer fast: transformers, matplotlib and scipy load only for a real run."""
    code = ("import sys, contextlib, io, esa_runner\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert esa_runner.main(['--dry-run', '--device', 'cpu']) == 0\n"
            "    assert esa_runner.main(['--help']) == 0\n"
            "heavy = [m for m in ('transformers', 'matplotlib', 'scipy', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_of_several_metrics_lists_their_folders(capsys):
    assert esa_runner.main(["--dry-run", "--device", "cpu", "--metric", "grad_x_weight,wanda", "--mode", "per_row",
                            "--perturb", "zero", "--out-dir", "/tmp/esa-dry"]) == 0
    out = capsys.readouterr().out
    assert "metrics:       grad_x_weight, act_mag   mode: per_row" in out
    assert "metric_agreement.json" in out and "metrics/{grad_x_weight,act_mag}/{config.json,top_weights.csv" in out
