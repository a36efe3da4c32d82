"""Out-dir comparison: two runs with the same flags and seeds are identical except timestamps and
timings; a real difference is found.  (The same tool showed the package restructure changed no
output: see the README's Layout section.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import esa_runner
from esa.outdir.compare import compare
from tests.realmodels import CORPUS, REPO, tiny_model_dir

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def run(tiny: str, out, *extra: str):
    argv = ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS), "--max-length", "32",
            "--max-samples", "4", "--eval-samples", "2", "--batch-size", "2", "--topk", "5", "--mode", "global",
            "--perturb", "gauss_noise", "--seeds", "0,1", "--stability-check", "--save-plots", "--out-dir", str(out),
            *extra]
    assert esa_runner.main(argv) == 0
    return out


def test_identical_runs_compare_identical_and_a_change_is_found(tiny, tmp_path):
    a = run(tiny, tmp_path / "a")
    b = run(tiny, tmp_path / "b")
    result = compare(a, b)
    assert {"config.json", "experiment_manifest.json", "top_weights.csv", "perturbation_results.json",
            "stability_summary.json", "score_distribution.npz", "report.md", "plots/stability.png"} <= set(result)
    # the manifests' timings and start times differ, the out-dir names differ in config.json's argv
    assert json.loads((a / "experiment_manifest.json").read_text())["started_at"] is not None
    assert set(result.values()) == {"identical"}, result
    c = run(tiny, tmp_path / "c", "--perturb-scale", "0.5")
    changed = compare(a, c)
    assert changed["perturbation_results.json"] == "differs" and changed["top_weights.csv"] == "identical"
    (c / "extra.txt").write_text("x")
    assert compare(a, c)["extra.txt"] == "only in B"


def test_script_exit_codes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.json").write_text('{"v": 1, "timings_s": {"load": 1.0}}')
    (tmp_path / "b" / "x.json").write_text('{"timings_s": {"load": 9.0}, "v": 1}')
    script = [sys.executable, str(REPO / "scripts" / "compare_outdirs.py")]
    same = subprocess.run([*script, str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True)
    assert same.returncode == 0 and "identical" in same.stdout
    (tmp_path / "b" / "x.json").write_text('{"v": 2}')
    assert subprocess.run([*script, str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True).returncode == 1
    assert subprocess.run([*script, str(tmp_path / "a")], capture_output=True).returncode == 2
