"""--perturb a,b,c: one run, scored and selected once per seed, whose per-perturbation folders equal the
single-perturbation runs file for file."""

from __future__ import annotations

import json
import shutil

import pytest

import esa_runner
from esa.outdir.compare import compare
from esa.runner import seeds
from tests.realmodels import CORPUS, tiny_model_dir

PERTURBS = {"zero": [], "sign_flip": [], "gauss_noise": ["--perturb-scale", "0.5"], "bit_flip": []}
TYPED = "zero,sign_flip,gaussian:0.5,bit_flip"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def args(tiny: str, out, metric: str, perturb: str) -> list[str]:
    return ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS), "--max-length", "32",
            "--max-samples", "4", "--eval-samples", "3", "--topk", "6", "--metric", metric, "--perturb", perturb,
            "--controls", "random_k,bottom_k", "--seeds", "0,1", "--topk-sweep", "2,6", "--stability-check",
            "--save-plots", "--out-dir", str(out)]


def counted_run(monkeypatch, argv: list[str]) -> int:
    """Run ``argv``; the number of scoring passes (one per seed, every metric at once)."""
    calls = []
    real = seeds.score_metrics

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)
    monkeypatch.setattr(seeds, "score_metrics", counting)
    assert esa_runner.main(argv) == 0
    return len(calls)


@pytest.fixture(scope="module")
def multi(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "run"
    with pytest.MonkeyPatch.context() as mp:
        passes = counted_run(mp, args(tiny, out, "grad_x_weight,act_mag", TYPED))
    return out, passes


def test_scored_once_per_seed(multi):
    out, passes = multi
    assert passes == 2  # two seeds; every metric and every perturbation share each seed's pass
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["status"] == "success"
    for m in ("grad_x_weight", "act_mag"):
        for p in PERTURBS:
            assert f"metrics/{m}/perturbations/{p}/perturbation_results.json" in manifest["files"]
        assert f"metrics/{m}/report.md" in manifest["files"]


@pytest.mark.parametrize("metric, perturb", [*(("act_mag", p) for p in PERTURBS), ("grad_x_weight", "bit_flip")])
def test_each_perturbation_folder_equals_its_single_run(tiny, multi, tmp_path, monkeypatch, metric, perturb):
    single = tmp_path / "single"
    assert counted_run(monkeypatch, args(tiny, single, metric, perturb) + PERTURBS[perturb]) == 2
    folder = multi[0] / "metrics" / metric / "perturbations" / perturb
    diff = {n: v for n, v in compare(folder, single).items() if v != "identical"}
    # the report's file list names the manifest, which only a whole run has
    assert diff == {"experiment_manifest.json": "only in B", "report.md": "differs"}
    res = json.loads((folder / "perturbation_results.json").read_text())
    assert res["perturb"] == perturb and res["perturb_scale"] == (0.5 if perturb == "gauss_noise" else 1.0)


def test_the_reports_above_the_perturbations(multi):
    out = multi[0]
    report = (out / "metrics" / "act_mag" / "report.md").read_text()
    assert "## Perturbation × condition → perplexity ratio" in report
    res = {p: json.loads((out / "metrics/act_mag/perturbations" / p / "perturbation_results.json").read_text())
           for p in PERTURBS}
    for p in PERTURBS:
        assert f"| `{p}` |" in report and f"perturbations/{p}/report.md" in report
    top = (out / "report.md").read_text()
    for p, r in res.items():  # the run's report: a row per metric and perturbation
        assert f"| `act_mag` / `{p}` |" in top and r["perturb"] == p


def test_single_metric_several_perturbations(tiny, tmp_path, monkeypatch):
    out = tmp_path / "one"
    assert counted_run(monkeypatch, args(tiny, out, "act_mag", "zero,sign_flip")) == 2
    assert sorted(p.name for p in (out / "perturbations").iterdir()) == ["sign_flip", "zero"]
    assert "## Perturbation × condition → perplexity ratio" in (out / "report.md").read_text()
    assert json.loads((out / "config.json").read_text())["config"]["perturb"] == "zero,sign_flip"


@pytest.mark.parametrize("typed, why", [
    ("zero,zero", "names zero twice"), ("zero:0.5", "zero has no scale"), ("gauss_noise:-1", "non-negative"),
    ("zero,bogus", "unknown --perturb 'bogus'")])
def test_bad_perturb_lists(tiny, tmp_path, capsys, typed, why):
    assert esa_runner.main(args(tiny, tmp_path / "bad", "act_mag", typed)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0]


def test_bit_index_needs_bit_flip_among_them(tiny, tmp_path, capsys):
    argv = args(tiny, tmp_path / "bad", "act_mag", "zero,sign_flip") + ["--bit-index", "3"]
    assert esa_runner.main(argv) == 2
    assert "--bit-index only applies to --perturb bit_flip" in capsys.readouterr().err


def test_dry_run_lists_each_perturbation_and_its_folder(capsys):
    assert esa_runner.main(["--dry-run", "--device", "cpu", "--perturb", "zero,gaussian:0.5,bit_flip",
                            "--perturb-scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "zero scale=2.0; gauss_noise scale=0.5; bit_flip scale=2.0 bit=MSB of exponent" in out
    assert "perturbations/{zero,gauss_noise,bit_flip}/{config.json," in out


def test_deleted_figures_and_reports_come_back_the_same(multi, tmp_path, capsys):
    """python -m esa.report rebuilds every figure and report of a run of several metrics and perturbations."""
    from esa.cli import report

    copy = tmp_path / "copy"
    shutil.copytree(multi[0], copy)
    made = [p for p in copy.rglob("*") if p.suffix == ".png" or p.name == "report.md"]
    assert len([p for p in made if p.name == "report.md"]) == 1 + 2 + 2 * 4  # run, metrics, perturbations
    for p in made:
        p.unlink()
    assert report.main([str(copy)]) == 0, capsys.readouterr().err
    assert {str(p) for p in made} <= set(capsys.readouterr().out.split())
    assert {n: v for n, v in compare(multi[0], copy).items() if v != "identical"} == {}


def test_compute_overlap_finds_each_metrics_top_k(multi):
    from esa.analysis.overlap import runs_in

    out = multi[0]
    assert runs_in(out) == [(f"{out}[{m}]", out / "metrics" / m / "perturbations" / "zero")
                            for m in ("grad_x_weight", "act_mag")]


def test_a_killed_run_of_several_perturbations_resumes_to_the_same_files(tiny, tmp_path):
    """Each seed's checkpoint holds every perturbation's selections (bottom_k differs for bit_flip)."""
    import os
    import subprocess
    import sys

    from tests.realmodels import REPO

    full, out = tmp_path / "full", tmp_path / "run"
    assert esa_runner.main(args(tiny, full, "act_mag", "zero,bit_flip")) == 0
    env = {**os.environ, "ESA_FAULT": "condition:5"}
    proc = subprocess.run([sys.executable, "esa_runner.py", *args(tiny, out, "act_mag", "zero,bit_flip")], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert esa_runner.main(args(tiny, out, "act_mag", "zero,bit_flip") + ["--resume", str(out)]) == 0
    assert {n: v for n, v in compare(out, full).items() if v != "identical"} == {}
    assert json.loads((out / "experiment_manifest.json").read_text())["resumes"][0]["evaluations_done"] == 5
