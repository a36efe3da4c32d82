"""esa-compare on three tiny runs (two models, two metrics, two perturbations, two evaluation data sets):
runs.csv holds exactly the rows read back from each run's JSON; the figures plot the table's numbers;
bad input is one line and exit 2; it runs where torch cannot be imported."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from matplotlib.container import BarContainer

import esa_runner
from esa.compare import cli, figures
from tests.realmodels import CORPUS, REPO, tiny_model_dir


def run(model, out, metric: str, perturb: str, eval_samples: int = 2) -> None:
    assert esa_runner.main(["--model", str(model), "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
                            "--max-length", "32", "--max-samples", "2", "--eval-samples", str(eval_samples),
                            "--topk", "4", "--metric", metric, "--perturb", perturb, "--controls", "random_k,bottom_k",
                            "--seeds", "0,1", "--topk-sweep", "2,4,8", "--out-dir", str(out)]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a, b = tiny_model_dir(root / "model_a", seed=0), tiny_model_dir(root / "model_b", seed=1)
    run(a, root / "r1", "act_mag,grad_x_weight", "zero,sign_flip")
    run(b, root / "r2", "act_mag", "zero")
    run(b, root / "r3", "grad_x_weight", "zero", eval_samples=3)  # other evaluation data: its own group
    return root


# each run's single-metric, single-perturbation folders, spelled out (not found by the code under test)
def leaves(root) -> dict[str, list]:
    return {"r1": [("act_mag", root / "r1/metrics/act_mag/perturbations/zero"),
                   ("act_mag", root / "r1/metrics/act_mag/perturbations/sign_flip"),
                   ("grad_x_weight", root / "r1/metrics/grad_x_weight/perturbations/zero"),
                   ("grad_x_weight", root / "r1/metrics/grad_x_weight/perturbations/sign_flip")],
            "r2": [("act_mag", root / "r2")], "r3": [("grad_x_weight", root / "r3")]}


def expected_rows(root) -> set[tuple]:
    out = set()
    for name, folders in leaves(root).items():
        for metric, folder in folders:
            res = json.loads((folder / "perturbation_results.json").read_text())
            for seed, conds in res["per_seed"].items():
                for cond, row in conds.items():
                    out.add((str(root / name), metric, res["perturb"], 4, cond, int(seed), float(row["ppl"]),
                             float(row["ratio"])))
            for i, k in enumerate(res["sweep"]["k"]):
                for cond, block in res["sweep"]["conditions"].items():
                    for seed, v in block["per_seed"].items():
                        out.add((str(root / name), metric, res["perturb"], k, cond, int(seed), float(v["ppl"][i]),
                                 float(v["ratio"][i])))
    return out


@pytest.fixture(scope="module")
def compared(runs):
    out = runs / "cmp"
    assert cli.main([str(runs / r) for r in ("r1", "r2", "r3")] + ["--out", str(out)]) == 0
    with open(out / "runs.csv", newline="") as f:
        return out, list(csv.DictReader(f))


def test_runs_csv_has_exactly_the_rows_of_each_runs_json(runs, compared):
    _, table = compared
    got = [(r["run"], r["metric"], r["perturbation"], int(r["k"]), r["condition"], int(r["seed"]), float(r["ppl"]),
            float(r["ratio"])) for r in table]
    # 4 leaves of r1 + r2 + r3 = 6 leaves, each 3 k x 3 conditions x 2 seeds
    assert len(got) == len(set(got)) == 6 * 3 * 3 * 2
    assert set(got) == expected_rows(runs)
    config = {r: json.loads((runs / r / "config.json").read_text()) for r in ("r1", "r2", "r3")}
    for r in table:
        c = config[r["run"].rsplit("/", 1)[1]]
        assert r["model"] == c["config"]["model"] and int(r["parameters"]) == c["model"]["num_parameters"]
        assert r["dtype"] == "fp32" and r["data_source"] == c["data"]["data_source"]
        assert int(r["eval_windows"]) == c["data"]["eval_windows"] and r["mode"] == c["config"]["mode"]
        assert r["data_fingerprint"] == c["fingerprints"]["data"]
    assert {r["run"].rsplit("/", 1)[1]: r["group"] for r in table} == {"r1": "1", "r2": "1", "r3": "2"}


def test_the_summary_says_why_the_groups_are_apart(compared):
    out, _ = compared
    text = (out / "summary.md").read_text()
    assert "evaluated on different data" in text and "## Group 1" in text and "## Group 2" in text
    assert "3 evaluation windows" in text and "2 evaluation windows" in text
    assert "p (log ratio, vs top_k)" in text and "| **top_k** |" in text
    assert sorted(p.name for p in out.glob("*.png")) == ["ratio_vs_k_group1.png", "ratio_vs_k_group2.png",
                                                         "topk_vs_controls_group1.png", "topk_vs_controls_group2.png"]


def as_table(rows: list[dict]) -> list[dict]:
    """runs.csv read back, typed as the figures take it."""
    return [{**r, "group": int(r["group"]), "k": int(r["k"]), "main_k": int(r["main_k"]), "ratio": float(r["ratio"])}
            for r in rows]


def test_ratio_vs_k_plots_the_tables_means(compared):
    _, rows = compared
    table = as_table(rows)
    fig = figures.figure_ratio_vs_k(table, 1)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3  # model a: two metrics; model b: act_mag (its grad_x_weight run is group 2)
    lines = 0
    for ax in axes:
        assert ax.get_xscale() == ax.get_yscale() == "log"
        model, metric = ax.get_title().split(", ")
        for line in ax.get_lines():
            pert, cond = line.get_label().split(": ")
            mine = [r for r in table if r["group"] == 1 and r["model"].endswith(model) and r["metric"] == metric
                    and r["perturbation"] == pert and r["condition"] == cond]
            ks = sorted({r["k"] for r in mine})
            means = [np.mean([r["ratio"] for r in mine if r["k"] == k]) for k in ks]
            assert list(line.get_xdata()) == ks
            np.testing.assert_allclose(line.get_ydata(), means, rtol=1e-12)
            assert line.get_linestyle() == ("-" if cond == "top_k" else "--")
            lines += 1
    assert lines == (4 + 1) * 3  # (r1's four leaves + r2) x 3 conditions


def test_topk_vs_controls_bars_are_the_tables_means(compared):
    _, rows = compared
    table = as_table(rows)
    fig = figures.figure_topk_vs_controls(table, 1)
    drawn = 0
    for ax in (a for a in fig.axes if a.get_visible()):
        pert = ax.get_title().split(":")[0]
        ticks = [t.get_text().split("\n") for t in ax.get_xticklabels()]  # model folder name, metric
        for container in (c for c in ax.containers if isinstance(c, BarContainer)):
            cond = container.get_label()
            expect = [np.mean([r["ratio"] for r in table if r["group"] == 1 and r["perturbation"] == pert
                               and r["model"].rsplit("/", 1)[1] == model and r["metric"] == metric
                               and r["condition"] == cond and r["k"] == 4]) for model, metric in ticks]
            np.testing.assert_allclose([p.get_height() for p in container.patches], expect, rtol=1e-12)
            drawn += 1
    assert drawn == 2 * 3  # zero and sign_flip, 3 conditions each


def test_task_accuracy_columns_when_present(runs, tmp_path):
    copy = tmp_path / "r2"
    shutil.copytree(runs / "r2", copy)
    res = json.loads((copy / "perturbation_results.json").read_text())
    res["per_seed"]["0"]["top_k"]["tasks"] = {"piqa": {"acc": 0.625, "acc_norm": 0.5}}
    (copy / "perturbation_results.json").write_text(json.dumps(res))
    assert cli.main([str(copy), "--out", str(tmp_path / "cmp")]) == 0
    with open(tmp_path / "cmp" / "runs.csv", newline="") as f:
        table = list(csv.DictReader(f))
    acc = {(r["condition"], r["seed"], r["k"]): r["acc:piqa"] for r in table}
    assert acc[("top_k", "0", "4")] == "0.625" and acc[("top_k", "1", "4")] == ""


def mark(folder, status: str, process=None) -> None:
    m = json.loads((folder / "experiment_manifest.json").read_text())
    m["status"] = status
    if process is not None:
        m["process"] = process
    (folder / "experiment_manifest.json").write_text(json.dumps(m))


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    failed, killed = tmp_path / "failed", tmp_path / "killed"
    shutil.copytree(runs / "r2", failed)
    shutil.copytree(runs / "r2", killed)
    mark(failed, "failed")
    mark(killed, "running", {"host": __import__("socket").gethostname(), "pid": 2 ** 22 + 7, "started_at": "x"})
    (tmp_path / "empty").mkdir()
    cases = {"given twice": [runs / "r2", runs / "r2"], "not an ESA run": [tmp_path / "empty"],
             "inside the run": [runs / "r1" / "metrics" / "act_mag"], "the run failed": [failed],
             "unfinished (status killed)": [killed]}
    for why, dirs in cases.items():
        assert cli.main([*map(str, dirs), "--out", str(tmp_path / "o")]) == 2, why
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], (why, err)
    assert cli.main([str(killed), "--include-unfinished", "--out", str(tmp_path / "o")]) == 0
    assert "Unfinished runs" in (tmp_path / "o" / "summary.md").read_text()


def test_runs_without_torch(runs, tmp_path):
    """python -m esa.compare never imports torch or transformers (scipy, which it uses, cannot load with torch
    blocked outright, so the test looks at what was imported)."""
    code = textwrap.dedent(f"""
        import sys, runpy
        sys.argv = ["esa.compare", {str(runs / 'r2')!r}, "--out", {str(tmp_path / 'o')!r}]
        try:
            runpy.run_module("esa.compare", run_name="__main__")
        except SystemExit as exc:
            print("exit", exc.code, "imported", sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 imported []", proc.stderr
    assert (tmp_path / "o" / "runs.csv").is_file() and (tmp_path / "o" / "ratio_vs_k.png").is_file()


def test_groups_are_the_same_data_and_one_models_runs_the_same_windows(tmp_path):
    from esa.compare.table import Run, assign_groups

    def fake(model: str, fingerprint: str, windows: int = 16) -> Run:
        return Run(tmp_path / f"{model}{fingerprint}{windows}", {
            "config": {"model": model}, "fingerprints": {"data": fingerprint},
            "data": {"data_source": "wikitext2", "eval_windows": windows, "window_tokens": 256, "bos_policy": "x"}},
            "success")
    runs = [fake("a", "f1"), fake("b", "f2"), fake("a", "f3"), fake("b", "f2", windows=8), fake("b", "f4")]
    assign_groups(runs)
    # b's other tokenizer: same group as a; a on other windows: apart; other window count: apart; then b on
    # other windows fits a's second group
    assert [r.group for r in runs] == [1, 1, 2, 3, 2]
