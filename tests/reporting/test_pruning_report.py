"""pruning.png, the pruning table and the multi-metric section, from hand-made results files."""

from __future__ import annotations

import json

import pytest

from esa.reporting import metrics_report, parts, pruning
from esa.reporting.plotkit import plt


def results(metric: str, ppl: dict[str, dict[str, list[float]]], seeds=(0, 1)) -> dict:
    """A pruning_results.json with ``ppl[level][condition]`` = one perplexity per seed."""
    per_seed = {str(s): {lv: {c: {"ppl": v[i], "ratio": v[i] / 10.0, "removed": 8, "removed_share": 0.5}
                              for c, v in conds.items()} for lv, conds in ppl.items()} for i, s in enumerate(seeds)}
    return {"pruner": {"pruned_tensors": 2, "pruned_weights": 16, "rule": "r"}, "metric": metric, "mode": "per_row",
            "sparsities": [lv for lv in ppl if ":" not in lv], "patterns": [lv for lv in ppl if ":" in lv],
            "levels": list(ppl), "conditions": ["metric", "magnitude", "random"], "eval_windows": 4,
            "baseline": {"ppl": 10.0}, "seeds": list(seeds), "per_seed": per_seed}


PPL = {"0.3": {"metric": [11.0, 13.0], "magnitude": [14.0, 14.0], "random": [20.0, 22.0]},
       "0.5": {"metric": [15.0, 17.0], "magnitude": [30.0, 30.0], "random": [50.0, 70.0]},
       "2:4": {"metric": [18.0, 18.0], "magnitude": [40.0, 40.0], "random": [80.0, 80.0]}}


def test_figure_plots_the_mean_per_sparsity_controls_dashed_and_patterns_as_points():
    other = {lv: {**c, "metric": [v * 2 for v in c["metric"]]} for lv, c in PPL.items()}
    fig = pruning.figure({"act_mag": results("act_mag", PPL), "obs": results("obs", other)})
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["act_mag"].get_xdata()) == [0.3, 0.5] and list(lines["act_mag"].get_ydata()) == [12.0, 16.0]
    assert list(lines["obs"].get_ydata()) == [24.0, 32.0]
    assert list(lines["magnitude (control)"].get_ydata()) == [14.0, 30.0]
    assert list(lines["random (control)"].get_ydata()) == [21.0, 60.0]
    assert [ln.get_linestyle() for ln in lines.values()][:4] == ["-", "-", "--", "--"]
    assert list(lines["unpruned"].get_ydata()) == [10.0, 10.0]
    points = sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections)  # 2:4 = sparsity 0.5
    assert points == [(0.5, 18.0), (0.5, 36.0), (0.5, 40.0), (0.5, 80.0)]
    plt.close(fig)


def test_a_metric_called_magnitude_keeps_its_own_line_beside_the_control():
    fig = pruning.figure({"magnitude": results("magnitude", PPL), "act_mag": results("act_mag", PPL)})
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels[:4] == ["magnitude", "act_mag", "magnitude (control)", "random (control)"]
    plt.close(fig)


def test_table_and_files(tmp_path):
    res = results("act_mag", PPL, seeds=(0,))
    (tmp_path / pruning.RESULTS).write_text(json.dumps(res))
    head, rows = pruning.table(res)
    assert head[:4] == ["level", "act_mag (lowest removed)", "magnitude", "random"]
    assert rows[1][:5] == ["0.5", "15", "30", "50", "50.0 %"]
    assert (tmp_path / pruning.PLOT) in parts.figures(tmp_path)
    assert "## Pruning" in parts.sections(tmp_path) and "![pruning](pruning.png)" in parts.sections(tmp_path)


def test_multi_metric_table_and_figure(tmp_path):
    config = {"config": {"metrics": ["act_mag", "obs"]}}
    for m in ("act_mag", "obs"):
        (tmp_path / "metrics" / m).mkdir(parents=True)
        (tmp_path / "metrics" / m / pruning.RESULTS).write_text(json.dumps(results(m, PPL, seeds=(0,))))
    head, rows = pruning.multi_table(tmp_path, config)
    assert head == ["metric", "0.3", "0.5", "2:4"]
    assert [r[0] for r in rows] == ["`act_mag`", "`obs`", "magnitude (control)", "random (control)"]
    assert rows[2][1:] == ["14", "30", "40"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert tmp_path / pruning.PLOT in metrics_report.figures(tmp_path)


@pytest.mark.parametrize("level, share", [("0.5", 0.5), ("2:4", 0.5), ("1:4", 0.75), ("0.7", 0.7)])
def test_sparsity_of_a_level(level, share):
    assert pruning.sparsity(level) == share
