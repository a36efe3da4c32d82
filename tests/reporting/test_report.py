"""report.md from a synthetic out-dir: question, configuration, summary table, every plot with a
data-driven reading, the file list; ``python -m esa.report OUT_DIR`` rebuilds plots and report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import matplotlib.image
import pytest

from esa.cli import report
from esa.reporting.format import ratio_text
from esa.reporting.plots import PLOTS, make_plots
from esa.reporting.report_md import build_report, write_report
from tests.realmodels import REPO
from tests.synthetic_outdir import make_out_dir


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = make_out_dir(tmp_path_factory.mktemp("synthetic"), layers=35)
    make_plots(out)
    write_report(out)
    return out


def test_report_references_every_plot_with_a_reading(out_dir):
    text = (out_dir / "report.md").read_text()
    pngs = sorted(p.name for p in (out_dir / "plots").glob("*.png"))
    assert len(pngs) == len(PLOTS)
    for spec in PLOTS:
        assert f"](plots/{spec.file})" in text, spec.file
        assert f"`plots/{spec.file}`" in text  # and in the file list
        reading = spec.read(out_dir)
        assert reading in text
        # the reading is computed (it quotes numbers), not boilerplate
        assert re.search(r"\d", reading), reading


def test_question_configuration_and_summary_table(out_dir):
    text = (out_dir / "report.md").read_text()
    lines = text.splitlines()
    assert lines[2].startswith("**Question.**") and lines[4].startswith("**Configuration.**")
    assert "dose–response over k = 1, 10, 100" in lines[2]
    assert "seeds 0, 1, 2" in lines[4] and "cpu fp32" in lines[4]
    table = [ln for ln in lines if ln.startswith("| ")]
    head = table[0]
    for col in ("PPL", "ΔPPL", "ratio", "ΔPPL mean ± std", "p (ΔPPL)", "p (log ratio)", "Cohen's d"):
        assert col in head
    rows = {ln.split("|")[1].strip().strip("*"): ln for ln in table[1:]}
    assert {"baseline", "top_k", "random_k", "bottom_k"} <= set(rows)
    res = json.loads((out_dir / "perturbation_results.json").read_text())
    assert ratio_text(res["conditions"]["top_k"]["ratio"]) in rows["top_k"]  # the primary seed's ratio
    assert ratio_text(res["summary"]["top_k"]["ratio"]["mean"]) in rows["top_k"]  # and the mean over seeds
    assert re.search(r"\d\.\d+e-\d+", rows["random_k"])  # a p-value
    assert "mean Jaccard" in text
    assert "| 100 (main) |" in text  # the sweep table marks the main k


def test_the_report_says_once_which_p_value_to_read(out_dir):
    """p (ΔPPL) and p (log ratio) can disagree (heavy-tailed ΔPPL): the report says which one answers
    the question, and why, in one place."""
    text = (out_dir / "report.md").read_text()
    assert text.count("Which p to read: p (log ratio)") == 1 and "heavy-tailed" in text


def test_file_list_covers_the_out_dir(out_dir):
    text = (out_dir / "report.md").read_text()
    files = text.split("## Files", 1)[1]
    for p in out_dir.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            assert f"`{p.relative_to(out_dir)}`" in files, p


def test_python_m_esa_report_regenerates_everything(tmp_path):
    """--save-plots draws the score plots of a run made without them (tests/reporting/test_regenerate.py:
    without it, exactly the files the run wrote come back)."""
    out = make_out_dir(tmp_path / "old_run", layers=4)
    shutil.rmtree(out / "plots", ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "esa.report", str(out), "--save-plots"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for spec in PLOTS:
        png = out / "plots" / spec.file
        assert png.is_file() and matplotlib.image.imread(png).std() > 0.05, spec.file
    text = (out / "report.md").read_text()
    assert all(f"](plots/{s.file})" in text for s in PLOTS)
    assert str(out / "report.md") in proc.stdout


def test_report_without_plots_or_perturbation(tmp_path):
    out = make_out_dir(tmp_path / "scores_only", layers=3, seeds=(0,), sweep=(), perturb=False)
    text = build_report(out)
    assert "No perturbation was run" in text and "--save-plots" in text and "![" not in text
    assert "**Question.** Which weights" in text


def test_usage_error(tmp_path, capsys):
    assert report.main([]) == 2
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "usage" in capsys.readouterr().err


def test_report_with_infinite_perplexity(tmp_path):
    """A bit flip that overflows the model: inf in the table, undefined tests as n/a, never a crash."""
    out = make_out_dir(tmp_path / "inf", layers=3, inf_top=True)
    make_plots(out)
    text = build_report(out)
    top = next(ln for ln in text.splitlines() if ln.startswith("| **top_k**"))
    assert "| inf |" in top and "×inf" in top
    rnd = next(ln for ln in text.splitlines() if ln.startswith("| random_k"))
    assert "n/a" in rnd  # Welch p-value undefined with an infinite ΔPPL (null in the JSON)
    assert "perplexity infinite" in text
