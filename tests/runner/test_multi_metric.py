"""--metric a,b,c: one run whose per-metric folders equal the single-metric runs, plus the agreement."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

import esa_runner
from esa.analysis.agreement import spearman
from esa.outdir.compare import compare
from esa.outdir.readers import read_top_rows
from esa.reporting import metrics_report
from tests.realmodels import CORPUS, tiny_model_dir

METRICS = ["grad_x_weight", "act_mag", "obs", "taylor2", "magnitude"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def args(tiny: str, out, metric: str, mode: str = "global") -> list[str]:
    return ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS), "--max-length", "32",
            "--max-samples", "4", "--eval-samples", "4", "--topk", "6", "--mode", mode, "--metric", metric,
            "--perturb", "zero", "--controls", "random_k,bottom_k,random_mag_k", "--seeds", "0,1",
            "--topk-sweep", "2,6", "--stability-check", "--save-plots", "--out-dir", str(out)]


@pytest.fixture(scope="module")
def multi(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "run"
    assert esa_runner.main(args(tiny, out, ",".join(METRICS))) == 0
    return out


def summary_part(report: str) -> str:
    """report.md from its summary to its file list (the file list names the manifest, which a
    metric's folder does not have: the run's manifest is one level up)."""
    return report[report.index("## Summary"):report.index("## Files")]


@pytest.mark.parametrize("metric", [m for m in METRICS if m != "magnitude"])
def test_each_metric_folder_equals_the_single_metric_run(tiny, multi, tmp_path, metric):
    single = tmp_path / "single"
    assert esa_runner.main(args(tiny, single, metric)) == 0
    folder = multi / "metrics" / metric
    diff = {n: v for n, v in compare(folder, single).items() if v != "identical"}
    # everything identical (top_weights.csv, perturbation results, stability, stats, score sample,
    # config.json up to the command line and out-dir, every plot), except what only a run has
    assert diff == {"experiment_manifest.json": "only in B", "report.md": "differs"}
    assert summary_part((folder / "report.md").read_text()) == summary_part((single / "report.md").read_text())


def test_magnitude_skips_random_mag_k_with_its_reason(tiny, multi, tmp_path, capsys):
    """random_mag_k cannot be matched to the magnitude Top-K (its largest |w|): refused for --metric magnitude
    alone, skipped for magnitude in a run of several metrics; the folder is then the single run without it."""
    assert esa_runner.main(args(tiny, tmp_path / "refused", "magnitude")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "random_mag_k" in err and "cannot be matched by construction" in err
    argv = args(tiny, tmp_path / "single", "magnitude")
    argv[argv.index("--controls") + 1] = "random_k,bottom_k"
    assert esa_runner.main(argv) == 0
    folder = multi / "metrics" / "magnitude"
    diff = {n: v for n, v in compare(folder, tmp_path / "single").items() if v != "identical"}
    assert diff == {"experiment_manifest.json": "only in B", "report.md": "differs", "config.json": "differs",
                    "perturbation_results.json": "differs"}
    res = json.loads((folder / "perturbation_results.json").read_text())
    skipped = res["controls"].pop("random_mag_k")
    assert skipped["skipped"] and "cannot be matched by construction" in skipped["reason"]
    assert "random_mag_k" not in res["conditions"] and "random_mag_k" not in res["sweep"]["conditions"]
    single = json.loads((tmp_path / "single" / "perturbation_results.json").read_text())
    assert res["per_seed"] == single["per_seed"] and res.get("tests") == single.get("tests")
    assert f"random_mag_k was {skipped['reason']}." in (folder / "report.md").read_text()
    assert "random_mag_k was skipped for magnitude" in (multi / "report.md").read_text()
    matrix = (multi / "report.md").read_text().split("## Metric × condition")[1].splitlines()
    row = next(line for line in matrix if line.startswith("| `magnitude` |"))
    assert "skipped" in row
    # the metrics that can have it do, with their match quality
    assert "match_quality" in json.loads((multi / "metrics" / "obs" / "perturbation_results.json").read_text())[
        "controls"]["random_mag_k"]


def test_agreement_json_and_heatmap(multi):
    ag = json.loads((multi / "metric_agreement.json").read_text())
    assert ag["metrics"] == METRICS and ag["seeds"] == [0, 1] and len(ag["pairs"]) == 10
    rows = {m: read_top_rows(multi / "metrics" / m) for m in METRICS}
    for pair in ag["pairs"]:
        for seed, row in pair["per_seed"].items():
            # recomputed from the two metrics' top_weights.csv: weight identities per seed
            a, b = ({(r["parameter"], int(r["index"])) for r in rows[m] if r["seed"] == seed}
                    for m in (pair["a"], pair["b"]))
            assert row["jaccard"] == pytest.approx(len(a & b) / len(a | b))
            assert row["union"] == len(a | b)
    assert ag["jaccard_matrix"][0][0] == 1.0
    # the Spearman is named for what it ranks (the union of the Top-Ks), and a negative value is explained
    assert all("spearman_on_union" in row for p in ag["pairs"] for row in p["per_seed"].values())
    assert "spearman_matrix" not in ag and "negative_spearman_on_union" in ag["definition"]
    assert (multi / "metric_agreement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (multi / "report.md").read_text()
    assert "## Metric × condition → perplexity ratio" in report and "metric_agreement.png" in report
    assert "Spearman on the union of the Top-Ks" in report and "a negative value means" in report
    for m in METRICS:
        assert f"| `{m}` |" in report and f"metrics/{m}/report.md" in report
    manifest = json.loads((multi / "experiment_manifest.json").read_text())
    assert manifest["status"] == "success" and "metrics/obs/top_weights.csv" in manifest["files"]


def test_the_summary_and_report_list_each_metrics_top_weights(multi):
    """A multi-metric run names the weights it found: the primary seed's top 5 of each metric, in the
    printed summary and the top-level report, as each metric's top_weights.csv lists them."""
    report = (multi / "report.md").read_text()
    printed = metrics_report.console_summary(multi)
    for m in METRICS:
        top = [r for r in read_top_rows(multi / "metrics" / m) if r["seed"] == "0"][:5]
        for r in top:
            assert f"| `{m}` | {r['rank']} | `{r['parameter']}` | ({r['coords']}) | {r['score']} |" in report
            assert re.search(rf"{m}\s+{r['rank']}\s+{re.escape(r['parameter'])}\s+\({re.escape(r['coords'])}\)"
                             rf"\s+{re.escape(r['score'])}", printed), (m, r)


def test_spearman_is_scipys_with_average_ranks_for_ties():
    import numpy as np

    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # ties: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): rho = 0.9487
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(0.9486833)
    assert spearman(np.array([1.0, 1, 1]), np.array([1.0, 2, 3])) is None


def test_per_row_mode_runs_end_to_end(tiny, tmp_path):
    out = tmp_path / "rows"
    argv = args(tiny, out, "grad_x_weight,act_mag", mode="per_row")
    argv[argv.index("--topk") + 1] = "2"
    argv[argv.index("--topk-sweep") + 1] = "1,2"
    assert esa_runner.main(argv) == 0
    folder = out / "metrics" / "act_mag"
    res = json.loads((folder / "perturbation_results.json").read_text())
    layouts = json.loads((folder / "config.json").read_text())["targets"]["layouts"]
    shapes = {n: s["shape"] for n, s in json.loads((folder / "sensitivity_stats.json").read_text())["tensors"].items()}
    n_rows = {n: math.prod(shape) // shape[layouts.get(n, ["out", "in"]).index("in")] for n, shape in shapes.items()}
    assert res["conditions"]["top_k"]["n_perturbed"] == 2 * sum(n_rows.values())
    for cond in ("top_k", "random_k", "bottom_k", "random_mag_k"):
        assert res["conditions"][cond]["n_perturbed"] == 2 * sum(n_rows.values()), cond
    per_row = Counter((r["parameter"], r["row"]) for r in read_top_rows(folder) if r["seed"] == "0")
    assert set(per_row.values()) == {2} and len(per_row) == sum(n_rows.values())


def test_identical_conditions_are_evaluated_once(multi):
    """random_k is drawn for each metric from the same stream, disjoint from that metric's Top-K; when
    the draws coincide (no Top-K touched them) the condition is measured once and its row reused."""
    rows = {m: json.loads((multi / "metrics" / m / "perturbation_results.json").read_text()) for m in METRICS}
    conditions = sum(len(c) for r in rows.values() for c in r["per_seed"].values())
    sweep = sum(len(r["sweep"]["k"]) - 1 for r in rows.values()) * 2 * 4  # the other k, 2 seeds, 4 conditions
    journal = (multi / "checkpoints" / "evaluations.jsonl").read_text().splitlines()
    assert len(journal) == len({json.loads(line)["key"] for line in journal})  # each measured once
    assert len(journal) < 1 + conditions + sweep
    random_ppl = {m: r["per_seed"]["0"]["random_k"]["ppl"] for m, r in rows.items()}
    assert len(set(random_ppl.values())) < len(METRICS)


def test_random_mag_k_match_quality_is_the_selected_weights_quantiles(tiny, multi):
    """Per seed, random_mag_k's |w| quantiles over the Top-K's, recomputed with numpy from the model file
    and the selections the run kept (checkpoints/seed_<s>.npz)."""
    import numpy as np
    from safetensors.numpy import load_file

    from esa.runner.checkpoint import load_seed

    weights = load_file(str(next(Path(tiny).glob("*.safetensors"))))
    for metric in ("grad_x_weight", "obs"):
        mq = json.loads((multi / "metrics" / metric / "perturbation_results.json").read_text())[
            "controls"]["random_mag_k"]["match_quality"]
        assert mq["quantiles"] == [0.1, 0.5, 0.9] and mq["tolerance"] == 0.05 and sorted(mq["per_seed"]) == ["0", "1"]
        worst = 0.0
        for seed in (0, 1):
            sel = load_seed(multi, seed).results[metric]

            def abs_w(s) -> np.ndarray:
                return np.concatenate([np.abs(weights[n].reshape(-1)[i.numpy()]) for n, i in s.indices.items()])
            top, ctl = (np.quantile(abs_w(s).astype(np.float64), [0.1, 0.5, 0.9])
                        for s in (sel.top, sel.controls["random_mag_k"]))
            got = mq["per_seed"][str(seed)]
            np.testing.assert_allclose(got["top_k_abs_w"], top, rtol=1e-12)
            np.testing.assert_allclose(got["control_abs_w"], ctl, rtol=1e-12)
            np.testing.assert_allclose(got["ratio"], ctl / top, rtol=1e-12)
            worst = max(worst, float(np.max(np.abs(ctl / top - 1))))
        assert mq["max_deviation"] == pytest.approx(worst)
        assert ("warning" in mq) == (worst > 0.05)
        report = (multi / "metrics" / metric / "report.md").read_text()
        assert "random_mag_k's |w| ÷ the Top-K's |w| at the 10/50/90 % quantiles" in report
