"""Seeds that mean something: different calibration samples, Jaccard stability, flat memory."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import esa_runner
from esa.analysis.stability import jaccard, stability_summary
from esa.config import RunConfig
from esa.data import load_spec
from esa.experiment.selection import Selection
from esa.model.device import resolve_device
from esa.model.loading import load_model
from esa.model.targets import find_targets
from esa.outdir.manifest import Manifest
from esa.runner.context import RunContext
from esa.runner.seeds import score_seed
from tests.realmodels import CORPUS, REPO, tiny_model_dir

STABILITY_KEYS = {"jaccard_mean", "jaccard_all", "jaccard_std", "num_seeds", "topk_overlap_size", "seeds",
                  "metric", "mode", "jaccard_matrix", "set_sizes", "identity"}


def sel(d: dict[str, list[int]]) -> Selection:
    return Selection("top_k", {n: torch.tensor(v, dtype=torch.long) for n, v in d.items()},
                     {n: torch.ones(len(v)) for n, v in d.items()})


def test_jaccard_by_hand():
    a = sel({"w1": [0, 1, 2], "w2": [5]})
    b = sel({"w1": [1, 2, 3], "w2": [6]})
    assert jaccard(a, b) == pytest.approx(2 / 6)  # {w1:1, w1:2} shared of 6 distinct
    assert jaccard(a, a) == 1.0
    c = sel({"w3": [0, 1, 2, 5]})  # same indices, other tensor: identity includes the name
    assert jaccard(a, c) == 0.0


def test_stability_summary_schema_and_values():
    tops = [sel({"w": [0, 1, 2, 3]}), sel({"w": [0, 1, 2, 4]}), sel({"w": [0, 1, 5, 6]})]
    s = stability_summary(tops, [7, 8, 9], 4, "grad_x_weight", "global")
    assert set(s) == STABILITY_KEYS
    j01, j12, j02 = 3 / 5, 2 / 6, 2 / 6
    assert s["jaccard_all"] == pytest.approx([j01, j12])  # consecutive pairs in the given order
    assert s["jaccard_mean"] == pytest.approx((j01 + j12) / 2)
    assert s["jaccard_std"] == pytest.approx(np.std([j01, j12], ddof=0))
    assert s["jaccard_matrix"][0][2] == pytest.approx(j02) and s["jaccard_matrix"][1][1] == 1.0
    assert (s["num_seeds"], s["topk_overlap_size"], s["seeds"]) == (3, 4, [7, 8, 9])
    with pytest.raises(ValueError):
        stability_summary(tops[:1], [7], 4, "m", "global")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    model, tok = load_model(str(d), "cpu", "fp32")
    cfg = RunConfig.of(model=str(d), device="cpu", dtype="fp32", topk=5, mode="global", max_length=32, max_samples=4,
                    eval_samples=2, data_file=str(CORPUS))
    data = load_spec(tok, cfg.data)
    return cfg, model, find_targets(model), data


def test_seeds_change_calibration_and_gradient_top_k(tiny_setup, tmp_path):
    cfg, model, targets, data = tiny_setup
    ctx = RunContext(cfg, resolve_device("cpu", True, "fp32", True), model, None, targets, data, tmp_path,
                     Manifest(tmp_path), True)
    r0, r0b, r1 = (score_seed(ctx, s, False).results[cfg.metric] for s in (0, 0, 1))
    assert r0.calibration_windows == r0b.calibration_windows
    assert r0.calibration_windows != r1.calibration_windows
    assert jaccard(r0.top, r0b.top) == 1.0  # identical seeds -> identical Top-K
    assert jaccard(r0.top, r1.top) < 1.0  # another calibration sample -> another gradient Top-K
    # random_k is drawn per seed too
    assert jaccard(r0.controls["random_k"], r1.controls["random_k"]) < 1.0


def _run(tmp_path, tiny, extra):
    argv = ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
            "--max-length", "32", "--max-samples", "4", "--eval-samples", "4", "--topk", "3",
            "--out-dir", str(tmp_path)] + extra
    assert esa_runner.main(argv) == 0
    return tmp_path


def test_one_seed_stability_check_warns_and_writes_nothing(tmp_path_factory, tmp_path, capsys):
    tiny = str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    out = _run(tmp_path, tiny, ["--seeds", "3", "--stability-check", "--perturb", "zero"])
    assert "needs at least two --seeds" in capsys.readouterr().err
    assert not (out / "stability_summary.json").exists()
    res = json.loads((out / "perturbation_results.json").read_text())
    assert "summary" not in res and "tests" not in res  # absent, not zero


def test_multi_seed_outputs_and_statistics_match_scipy(tmp_path_factory, tmp_path, capsys):
    tiny = str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    out = _run(tmp_path, tiny, ["--seeds", "11,5,7", "--stability-check", "--perturb", "gauss_noise",
                                "--perturb-scale", "3"])
    err = capsys.readouterr().err
    assert "Mean Jaccard overlap: " in err
    stab = json.loads((out / "stability_summary.json").read_text())
    assert set(stab) == STABILITY_KEYS and stab["seeds"] == [11, 5, 7] and len(stab["jaccard_all"]) == 2
    res = json.loads((out / "perturbation_results.json").read_text())
    assert res["seed"] == 11 and res["conditions"] == res["per_seed"]["11"]  # primary block where expected
    assert res["seeds"] == [11, 5, 7]
    with open(out / "top_weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["seed"] == "11"  # the primary seed is listed first
    assert {r["seed"] for r in rows} == {"11", "5", "7"}
    base = res["baseline"]["ppl"]
    deltas = {c: [res["per_seed"][s][c]["ppl"] - base for s in ("11", "5", "7")] for c in res["conditions"]}
    for c, vals in deltas.items():
        summ = res["summary"][c]["delta_ppl"]
        assert summ["mean"] == pytest.approx(np.mean(vals)) and summ["std"] == pytest.approx(np.std(vals, ddof=1))
        assert summ["min"] == pytest.approx(min(vals)) and summ["max"] == pytest.approx(max(vals))
    for c in ("random_k", "bottom_k"):
        t = res["tests"][f"top_k_vs_{c}"]
        ref = stats.ttest_ind(deltas["top_k"], deltas[c], equal_var=False)
        assert t["p_value"] == pytest.approx(ref.pvalue) and t["t"] == pytest.approx(ref.statistic)
        pooled = np.sqrt((np.var(deltas["top_k"], ddof=1) + np.var(deltas[c], ddof=1)) / 2)
        assert t["cohens_d"] == pytest.approx((np.mean(deltas["top_k"]) - np.mean(deltas[c])) / pooled)
        assert t["mean_delta_ratio"] == pytest.approx(np.mean(deltas["top_k"]) / np.mean(deltas[c]))
        logs = {k: [np.log(res["per_seed"][s][k]["ppl"] / base) for s in ("11", "5", "7")] for k in ("top_k", c)}
        ref = stats.ttest_ind(logs["top_k"], logs[c], equal_var=False)
        assert t["log_ratio"]["p_value"] == pytest.approx(ref.pvalue)
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert set(manifest["calibration_windows"]) == {"11", "5", "7"}


def _peak_rss_mb(tmp_path, seeds: str) -> float:
    out = tmp_path / f"mem_{seeds.count(',') + 1}"
    cmd = [sys.executable, "esa_runner.py", "--device", "cpu", "--data-file", str(CORPUS), "--max-length", "32",
           "--max-samples", "2", "--eval-samples", "1", "--batch-size", "2", "--topk", "5", "--seeds", seeds,
           "--stability-check", "--out-dir", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return json.loads((out / "experiment_manifest.json").read_text())["peak_memory"]["rss_peak_mb"]


def test_peak_memory_is_flat_in_the_number_of_seeds(tmp_path):
    """Real 135M model: every seed's fp32 scores are 540 MB, so keeping one copy per seed would add
    1.6 GB for 5 seeds vs 2 seeds; the peak must stay within 10 %."""
    two = _peak_rss_mb(tmp_path, "0,1")
    five = _peak_rss_mb(tmp_path, "0,1,2,3,4")
    assert five <= 1.10 * two, (two, five)
