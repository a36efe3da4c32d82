"""``task_results.json`` from measured rows (statistics against numpy and scipy), and its report.md
section, console lines and figure (no lm-eval needed: the rows are made up)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from esa.evaluators.registry import Measured
from esa.evaluators.tasks import Tasks
from esa.reporting import parts
from esa.reporting import tasks as report
from esa.reporting.report_md import file_list

FACTS = {"arc_easy": {"split": "validation", "registered_split": "test", "docs": 570, "chance": 0.25,
                      "config_sha256": "a" * 64, "lm_eval": "0.4.13", "data": "/data/ai2_arc/ARC-Easy"},
         "piqa": {"split": "validation", "registered_split": "validation", "docs": 1838, "chance": 0.5,
                  "config_sha256": "b" * 64, "lm_eval": "0.4.13", "data": "/data/piqa/plain_text"}}
ACC = {"top_k": {0: (0.30, 0.52), 1: (0.34, 0.55)}, "random_k": {0: (0.61, 0.70), 1: (0.60, 0.72)}}


def record(arc: float, piqa: float) -> dict:
    return {"arc_easy": {"acc": arc, "acc_stderr": 0.03, "acc_norm": arc - 0.05, "acc_norm_stderr": 0.03,
                         "items": 200, **FACTS["arc_easy"]},
            "piqa": {"acc": piqa, "acc_stderr": 0.03, "acc_norm": piqa, "acc_norm_stderr": 0.03, "items": 200,
                     **FACTS["piqa"]}}


@pytest.fixture
def results() -> dict:
    rows = {seed: {100: {c: {"ppl": 1.0, "tasks": record(*ACC[c][seed])} for c in ACC}} for seed in (0, 1)}
    evaluator = SimpleNamespace(name="tasks", version="0.4.13", facts=FACTS,
                                data=SimpleNamespace(describe=lambda: "/data"),
                                options=SimpleNamespace(eval_tasks=("arc_easy", "piqa"), tasks_limit=200,
                                                        tasks_batch_size=16))
    return Tasks.results(evaluator, record(0.62, 0.71), [Measured("perturbation", rows, "k", (("top_k", "random_k"),))])


def test_the_statistics_over_seeds_are_numpys_and_scipys(results):
    block = results["experiments"]["perturbation"]
    top, rnd = [ACC["top_k"][s][0] for s in (0, 1)], [ACC["random_k"][s][0] for s in (0, 1)]
    got = block["summary"]["100"]["top_k"]["arc_easy"]["acc"]
    assert got["mean"] == pytest.approx(np.mean(top)) and got["std"] == pytest.approx(np.std(top, ddof=1))
    test = block["tests"]["100"]["top_k_vs_random_k"]["arc_easy"]["acc"]
    assert test["p_value"] == pytest.approx(stats.ttest_ind(top, rnd, equal_var=False).pvalue)
    assert "config_sha256" not in block["per_seed"]["0"]["100"]["top_k"]["arc_easy"]  # facts stated once
    assert results["tasks"]["arc_easy"]["registered_split"] == "test"
    json.dumps(results, allow_nan=False)


def test_report_section_console_and_figure(results, tmp_path):
    (tmp_path / report.RESULTS).write_text(json.dumps(results))
    assert [p.name for p in parts.figures(tmp_path)] == [report.PLOT]
    section = "\n".join(report.markdown_section(tmp_path))
    assert "## Zero-shot tasks" in section and f"![zero-shot task accuracy]({report.PLOT})" in section
    assert "**Split.** arc_easy is scored on its validation split: lm-eval evaluates test" in section
    assert "piqa is scored" not in section
    assert "| **top_k, k = 100** | 0.320 ± 0.028 / 0.270 ± 0.028 | 0.535 ± 0.021 / 0.535 ± 0.021 |" in section
    assert "| baseline | 0.620 / 0.570 | 0.710 / 0.710 |" in section and "| chance | 0.25 | 0.5 |" in section
    assert "top_k vs random_k (perturbation, k = 100)" in section
    lines = parts.console(tmp_path)
    assert len(lines) == 3 and lines[1].startswith("  arc_easy [validation split, NOT lm-eval's test]: baseline 0.620")
    assert lines[2].endswith("chance 0.500")
    listed = "\n".join(file_list(tmp_path, None))
    assert "| `task_results.json` | zero-shot lm-eval tasks" in listed and "| `task_accuracy.png` | zero-shot" in listed
