"""The super-weight command lines: scripts/find_super_weights.py and esa_runner.py --detect-super-weights."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json

import pytest
from transformers import AutoTokenizer

import esa_runner
from esa.config import RunConfig
from esa.superweights import config as swc
from tests.realmodels import CORPUS, REPO, embedded_dir
from tests.superweights.test_detect import llama6, plant_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("find_super_weights", REPO / "scripts" / "find_super_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = load_script().main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv, needle", [
    (["--threshold", "1"], "--threshold must be"),
    (["--threshold", "nan"], "--threshold must be"),
    (["--threshold", "x"], "invalid float"),
    (["--max-super-weights", "0"], "--max-super-weights must be at least 1"),
    (["--eval-samples", "0"], "--eval-samples must be"),
    (["--max-length", "1"], "--max-length must be at least 2"),
    (["--data-file", "/no/such/file.txt"], "does not exist"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "hi", "--detect-on-data"], "not both"),
    (["--model", "/no/such/model"], "does not exist"),
])
def test_bad_input_one_line_exit_2(argv, needle, tmp_path):
    code, _, err = run_cli(argv + ["--device", "cpu", "--out-dir", str(tmp_path / "o")])
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and needle in lines[0], err


def test_dry_run_loads_nothing(tmp_path, monkeypatch):
    import esa.model.loading

    monkeypatch.setattr(esa.model.loading, "load_model", lambda *a, **k: pytest.fail("--dry-run loaded the model"))
    code, out, err = run_cli(["--dry-run", "--device", "cpu", "--threshold", "80", "--out-dir", str(tmp_path / "o")])
    assert code == 0 and "80x the median" in out and "quick brown fox" in out, err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """A 6-layer tiny Llama with the real SmolLM2 tokenizer and a super weight planted at layer 2 [9, 21]."""
    path = tmp_path_factory.mktemp("planted")
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    model = llama6(vocab=len(tok))
    plant_llama(model, layer=2, row=9, col=21, source=4)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("detect", [[], ["--detect-on-data"]], ids=["prompt", "data"])
def test_cli_writes_json_table_and_plot(planted_dir, tmp_path, detect):
    out = tmp_path / "o"
    code, stdout, err = run_cli(["--model", str(planted_dir), "--device", "cpu", "--dtype", "fp32", "--data-file",
                                 str(CORPUS), "--eval-samples", "2", "--max-length", "32", "--batch-size", "2",
                                 "--out-dir", str(out), *detect])
    assert code == 0, err
    res = json.loads((out / "super_weights.json").read_text())
    assert [(c["layer"], c["row"], c["col"]) for c in res["candidates"]] == [(2, 9, 21)]
    assert res["settings"]["detect_on"] == ("data" if detect else "prompt")
    assert res["detection_input"]["sequences"] == (4 if detect else 1)
    assert res["ablation"]["windows"] == 2 and res["ablation"]["seq_len"] == 32
    assert (out / "super_weights.png").stat().st_size > 1000 and (out / "super_weights.txt").is_file()
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["status"] == "success" and "super_weights.json" in manifest["files"]
    assert "model.layers.2.mlp.down_proj.weight" in stdout and "random weight" in stdout


# ---------------------------------------------------------------- esa_runner --detect-super-weights


def test_runner_detects_the_planted_weight_and_reports_its_topk_rank(planted_dir, tmp_path):
    out = tmp_path / "o"
    code = esa_runner.main(["--model", str(planted_dir), "--device", "cpu", "--data-file", str(CORPUS),
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
    cfg = RunConfig().super_weights
    assert (cfg.super_weight_threshold, cfg.max_super_weights) == (swc.DEFAULT_THRESHOLD, swc.DEFAULT_MAX_SUPER_WEIGHTS)
