"""``esa_runner.py --detect-super-weights``: detector, ablation and Top-K overlap inside a normal run."""

from __future__ import annotations

import csv
import json

import pytest

import esa_runner
from esa import superweights as sw
from esa.config import RunConfig
from tests.realmodels import WIKITEXT
from tests.test_superweights import planted_dir  # noqa: F401  (module fixture: planted tiny Llama on disk)


def test_runner_detects_the_planted_weight_and_reports_its_topk_rank(planted_dir, tmp_path):  # noqa: F811
    out = tmp_path / "o"
    code = esa_runner.main(["--model", str(planted_dir), "--device", "cpu", "--data-file", str(WIKITEXT),
                            "--metric", "grad_x_weight", "--mode", "global", "--topk", "50", "--seeds", "0,1",
                            "--max-length", "32", "--max-samples", "3", "--eval-samples", "2", "--batch-size", "2",
                            "--detect-super-weights", "--out-dir", str(out)])
    assert code == 0
    res = json.loads((out / "super_weights.json").read_text())
    assert [(c["layer"], c["row"], c["col"]) for c in res["candidates"]] == [(2, 9, 21)]
    assert res["ablation"]["windows"] == 2 and res["settings"]["detect_on"] == "prompt"
    overlap = res["topk_overlap"]
    assert (overlap["metric"], overlap["mode"], overlap["k"]) == ("grad_x_weight", "global", 50)
    with open(out / "top_weights.csv") as f:
        top = list(csv.DictReader(f))
    for seed in ("0", "1"):
        (row,) = overlap["per_seed"][seed]
        ranked = [(r["parameter"], int(r["index"])) for r in top if r["seed"] == seed]
        key = ("model.layers.2.mlp.down_proj.weight", 9 * 32 + 21)
        assert (row["param"], row["flat_index"]) == key
        # the reported rank is the weight's position in this seed's top_weights.csv, or absent from it
        assert row["in_topk"] == (key in ranked)
        assert row["rank"] == (ranked.index(key) + 1 if key in ranked else None)
    files = json.loads((out / "experiment_manifest.json").read_text())["files"]
    assert {"super_weights.json", "super_weights.txt", "super_weights.png"} <= set(files)
    assert "overlap with the grad_x_weight Top-K" in (out / "super_weights.txt").read_text()
    report = (out / "report.md").read_text()
    assert "## Super weights" in report and "`model.layers.2.mlp.down_proj.weight`[9, 21]" in report


@pytest.mark.parametrize("extra, needle", [
    (["--detect-on-data"], "need --detect-super-weights"),
    (["--detect-super-weights", "--super-weight-threshold", "1"], "must be a finite number > 1"),
    (["--detect-super-weights", "--max-super-weights", "0"], "at least 1"),
    (["--detect-super-weights", "--detect-on-data", "--super-weight-prompt", "x"], "not both"),
])
def test_runner_super_weight_flags_are_validated(extra, needle, capsys):
    assert esa_runner.main(["--device", "cpu", "--dry-run", *extra]) == 2
    assert needle in capsys.readouterr().err


def test_runner_defaults_match_the_detector():
    cfg = RunConfig()
    assert (cfg.super_weight_threshold, cfg.max_super_weights) == (sw.DEFAULT_THRESHOLD, sw.DEFAULT_MAX_SUPER_WEIGHTS)
