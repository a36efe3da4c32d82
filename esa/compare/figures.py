"""The figures of esa-compare, computed from the rows of ``runs.csv`` only (:mod:`esa.compare.table`).

* ``ratio_vs_k.png``: perplexity ratio (perturbed ÷ baseline, mean over seeds) against k, one panel
  per model and metric, log-log; the Top-K solid, each control dashed, one colour per perturbation.
* ``topk_vs_controls.png``: at each run's ``--topk``, the ratio of the Top-K and of each control
  (mean ± sample std over seeds), one panel per perturbation, one cluster of bars per model and metric.

Runs on different evaluation data (groups) are never drawn on one axis: each group gets its own
files, ``<name>_group<N>.png``, when there is more than one group.  A non-finite mean (a perplexity
that overflowed) cannot sit on a log axis: it is left out of the line, and its bar is marked "inf".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from esa.reporting.plotkit import COND_COLORS, plt, save

CONTROL_MARKERS = ("s", "^", "v", "D", "P", "X")


def _groups(table: list[dict]) -> list[int]:
    return sorted({r["group"] for r in table})


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    a = np.asarray(values, dtype=np.float64)
    if not np.isfinite(a).all():
        return math.inf, None
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) >= 2 else None)


def ratio_curves(table: list[dict], group: int) -> dict[tuple[str, str], dict[tuple[str, str], tuple[list, list]]]:
    """(model, metric) -> (perturbation, condition) -> (ks ascending, mean ratio over seeds at each k)."""
    acc: dict = {}
    for r in table:
        if r["group"] == group:
            acc.setdefault((r["model"], r["metric"]), {}).setdefault((r["perturbation"], r["condition"]), {}) \
                .setdefault(r["k"], []).append(r["ratio"])
    return {panel: {line: (sorted(by_k), [_mean_std(by_k[k])[0] for k in sorted(by_k)]) for line, by_k in lines.items()}
            for panel, lines in acc.items()}


def bars(table: list[dict], group: int) -> dict[str, dict[tuple[str, str], dict[str, tuple[float, float | None]]]]:
    """perturbation -> (model, metric) -> condition -> (mean ratio, sample std) over seeds at the run's --topk."""
    acc: dict = {}
    for r in table:
        if r["group"] == group and r["k"] == r["main_k"]:
            acc.setdefault(r["perturbation"], {}).setdefault((r["model"], r["metric"]), {}) \
                .setdefault(r["condition"], []).append(r["ratio"])
    return {p: {mm: {c: _mean_std(v) for c, v in conds.items()} for mm, conds in by.items()} for p, by in acc.items()}


def _grid(n: int):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def figure_ratio_vs_k(table: list[dict], group: int):
    """The figure of ``ratio_vs_k.png`` (not saved)."""
    curves = ratio_curves(table, group)
    fig, axes = _grid(len(curves))
    perts = list(dict.fromkeys(p for lines in curves.values() for p, _ in lines))
    colours = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(perts)}
    for ax, ((model, metric), lines) in zip(axes, curves.items()):
        controls = sorted({c for _, c in lines if c != "top_k"})
        for (pert, cond), (ks, means) in lines.items():
            keep = [(k, m) for k, m in zip(ks, means) if math.isfinite(m) and m > 0]
            ax.plot([k for k, _ in keep], [m for _, m in keep], color=colours[pert], label=f"{pert}: {cond}",
                    linestyle="-" if cond == "top_k" else "--",
                    marker="o" if cond == "top_k" else CONTROL_MARKERS[controls.index(cond) % len(CONTROL_MARKERS)])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k (weights perturbed)")
        ax.set_ylabel("perplexity ÷ baseline (mean over seeds)")
        ax.set_title(f"{Path(model).name}, {metric}", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Perplexity ratio vs k: Top-K solid, controls dashed", fontsize=10)
    return fig


def figure_topk_vs_controls(table: list[dict], group: int):
    """The figure of ``topk_vs_controls.png`` (not saved)."""
    data = bars(table, group)
    fig, axes = _grid(len(data))
    for ax, (pert, by) in zip(axes, data.items()):
        conds = list(dict.fromkeys(c for cs in by.values() for c in cs))
        width = 0.8 / len(conds)
        for j, cond in enumerate(conds):
            vals = [by[mm].get(cond, (math.nan, None)) for mm in by]
            x = np.arange(len(by)) + (j - (len(conds) - 1) / 2) * width
            heights = [m if math.isfinite(m) else math.nan for m, _ in vals]
            ax.bar(x, heights, width, yerr=[s if s is not None else 0.0 for _, s in vals], label=cond,
                   color=COND_COLORS.get(cond), capsize=2)
            for xi, (m, _) in zip(x, vals):
                if math.isinf(m):
                    ax.annotate("inf", (xi, 1.0), ha="center", fontsize=7, rotation=90)
        ax.set_xticks(range(len(by)), [f"{Path(m).name}\n{metric}" for m, metric in by], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity ÷ baseline (mean ± std over seeds)")
        ax.set_title(f"{pert}: Top-K vs controls at --topk", fontsize=9)
        ax.legend(fontsize=6)
    return fig


def write_figures(table: list[dict], out: Path) -> list[Path]:
    """Both figures for every group (``_group<N>`` in the name when there are several); the paths."""
    groups = _groups(table)
    made = []
    for g in groups:
        suffix = f"_group{g}" if len(groups) > 1 else ""
        made.append(save(figure_ratio_vs_k(table, g), out / f"ratio_vs_k{suffix}.png"))
        made.append(save(figure_topk_vs_controls(table, g), out / f"topk_vs_controls{suffix}.png"))
    return made
