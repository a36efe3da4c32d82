"""The pruning experiment in report.md and on the console, and its plot ``pruning.png`` (perplexity
against sparsity: one solid line per metric, the magnitude and random controls dashed, N:M patterns
as points at their sparsity (M-N)/M), from ``pruning_results.json`` only.

A single-metric out-dir draws its metric and the two controls; a multi-metric run's own folder
draws every metric's line over the same axes (:func:`multi_figure`, :func:`multi_table`).
"""

from __future__ import annotations

import math
from pathlib import Path

from esa.outdir.layout import METRICS_DIR
from esa.outdir.readers import read_json
from esa.reporting import summary
from esa.reporting.format import num, sci
from esa.reporting.parts import Part, register
from esa.reporting.plotkit import plt, save

RESULTS = "pruning_results.json"
PLOT = "pruning.png"
CONTROLS = ("magnitude", "random")
CONTROL_COLORS = {"magnitude": "black", "random": "tab:gray"}


def sparsity(level: str) -> float:
    """A level's share of weights removed: ``"0.5"`` -> 0.5, ``"2:4"`` -> 0.5 (M-N of every M)."""
    if ":" in level:
        n, m = map(int, level.split(":"))
        return (m - n) / m
    return float(level)


def mean_ppl(res: dict, level: str, cond: str) -> float:
    """The condition's perplexity at ``level``, mean over seeds (nan when a seed's is missing)."""
    values = [num(by_level[level][cond].get("ppl")) for by_level in res["per_seed"].values()]
    return sum(values) / len(values) if values else math.nan


def curves(by_metric: dict[str, dict]) -> dict[str, dict]:
    """What :func:`figure` draws, per series (each metric, then ``magnitude (control)`` and ``random
    (control)`` from the first metric's results: the same masks for every metric; named apart from a
    metric called ``magnitude``): ``{"x", "y"}`` over the sparsities (ascending), ``{"px", "py",
    "plabels"}`` for the N:M patterns, ``dashed`` and ``color``."""
    out = {}
    first = next(iter(by_metric.values()))
    series = [(m, r, "metric") for m, r in by_metric.items()] + [(f"{c} (control)", first, c) for c in CONTROLS]
    for label, res, cond in series:
        fractions = sorted(res["sparsities"], key=float)
        patterns = res["patterns"]
        out[label] = {"x": [float(s) for s in fractions], "y": [mean_ppl(res, s, cond) for s in fractions],
                      "px": [sparsity(p) for p in patterns], "py": [mean_ppl(res, p, cond) for p in patterns],
                      "plabels": list(patterns), "dashed": cond != "metric",
                      "color": CONTROL_COLORS.get(cond, f"C{len(out)}")}
    return out


def figure(by_metric: dict[str, dict]):
    """Perplexity (log axis) against sparsity; the unpruned baseline as a dotted line."""
    first = next(iter(by_metric.values()))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, c in curves(by_metric).items():
        color = c["color"]
        if c["x"]:
            ax.plot(c["x"], c["y"], ls="--" if c["dashed"] else "-", marker="o", ms=4, color=color, label=label)
        if c["px"]:
            ax.scatter(c["px"], c["py"], marker="s" if not c["dashed"] else "x", s=36, color=color,
                       label=None if c["x"] else label, zorder=3)
            for x, y, text in zip(c["px"], c["py"], c["plabels"]):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax.axhline(num(first["baseline"]["ppl"]), color="tab:green", ls=":", lw=1, label="unpruned")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity s (floor(s·n) of each group removed); N:M patterns as points at (M-N)/M")
    ax.set_ylabel("perplexity (mean over seeds)")
    ax.set_title(f"Pruning the lowest scores ({first['mode']}); controls dashed", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(out_dir: Path) -> Path | None:
    res = read_json(out_dir, RESULTS)
    return None if res is None else save(figure({res["metric"]: res}), Path(out_dir) / PLOT)


def _cell(res: dict, level: str, cond: str) -> str:
    """Perplexity: mean ± std over seeds, or the one value (a single seed, or measured once)."""
    s = (res.get("summary") or {}).get(level, {}).get(cond, {}).get("ratio")
    base = num(res["baseline"]["ppl"])
    if s and cond not in res.get("evaluated_once", ()):
        return sci(s["mean"] * base, 4) + ("" if s.get("std") is None else f" ± {sci(s['std'] * base)}")
    return sci(mean_ppl(res, level, cond), 4)


def table(res: dict) -> summary.Table:
    """level × condition → perplexity, and the share of weights removed."""
    first = next(iter(res["per_seed"].values()))
    tested = "tests" in res  # two seeds or more
    head = ["level", f"{res['metric']} (lowest removed)", *CONTROLS, "removed",
            *(["p (metric vs magnitude, log ratio)"] if tested else [])]
    return head, [[lv, *(_cell(res, lv, c) for c in ("metric", *CONTROLS)),
                   f"{100 * first[lv]['metric']['removed_share']:.1f} %", *([_p(res, lv)] if tested else [])]
                  for lv in res["levels"]]


def _p(res: dict, level: str) -> str:
    """The p-value of the metric's pruning against magnitude pruning over seeds (log perplexity ratio)."""
    return sci(res["tests"][level]["metric_vs_magnitude"]["log_ratio"].get("p_value"))


def caption(res: dict) -> str:
    p, seeds = res["pruner"], res["seeds"]
    return (f"Perplexity with the lowest-scoring weights of each {res['mode']} group removed (N:M: per row) from "
            f"{p['pruned_weights']:,} weights in {p['pruned_tensors']} tensors; unpruned "
            f"{sci(res['baseline']['ppl'], 4)} on {res['eval_windows']} evaluation windows; controls: as many weights "
            "per group by |w| (magnitude) and at random; "
            + (f"mean ± sample std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"))


def markdown_section(out_dir: Path) -> list[str]:
    res = read_json(out_dir, RESULTS)
    if res is None:
        return []
    lines = ["", "## Pruning", "", caption(res) + ":", "", *summary.markdown(table(res))]
    if (Path(out_dir) / PLOT).is_file():
        lines += ["", f"![pruning]({PLOT})"]
    return lines


def console_lines(out_dir: Path) -> list[str]:
    res = read_json(out_dir, RESULTS)
    return [] if res is None else [caption(res) + ":", *summary.text(table(res))]


def _by_metric(out_dir: Path, config: dict) -> dict[str, dict] | None:
    res = {m: read_json(Path(out_dir) / METRICS_DIR / m, RESULTS) for m in config["config"]["metrics"]}
    return None if any(r is None for r in res.values()) else res


def multi_table(out_dir: Path, config: dict) -> summary.Table | None:
    """A multi-metric run: metric (and each control) × level → perplexity, mean over seeds."""
    res = _by_metric(out_dir, config)
    if res is None:
        return None
    first = next(iter(res.values()))
    rows = [[f"`{m}`", *(_cell(r, lv, "metric") for lv in r["levels"])] for m, r in res.items()]
    rows += [[f"{c} (control)", *(_cell(first, lv, c) for lv in first["levels"])] for c in CONTROLS]
    return ["metric", *first["levels"]], rows


def multi_figure(out_dir: Path, config: dict) -> Path | None:
    """A multi-metric run's ``pruning.png``: every metric's line over the same axes."""
    res = _by_metric(out_dir, config)
    return None if res is None else save(figure(res), Path(out_dir) / PLOT)


register(Part(RESULTS, figure=plot, section=markdown_section, console=console_lines,
              notes=((RESULTS, "per seed, level (sparsity or N:M) and condition (metric, magnitude, random): every "
                      "evaluator's record, weights removed and their share; statistics over seeds"),
                     (PLOT, "perplexity against sparsity, one line per metric, controls dashed, N:M as points (PNG)"))))
