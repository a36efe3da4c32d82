"""PNG plots built only from the files in an out-dir (so old runs can be re-plotted without a model).

``PLOTS`` lists every plot (file under ``OUT_DIR/plots/``, report section title, drawing function,
one-sentence reading computed from the data); a plot whose data is absent is skipped:

* ``score_distribution.png``: log-log CCDF of the primary seed's scores per module type + Top-K threshold;
* ``topk_locations.png``: heatmap of Top-K counts by layer index x module type (per_layer / per_row,
  where every tensor or row holds k: the Top-K's share of each cell's total score);
* ``score_concentration.png``: share of each tensor's total score held by its top 0.1 %;
* ``perturbation_effect.png``: ΔPPL of the Top-K and each control, per seed and mean ± std;
* ``stability.png``: Jaccard matrix of the Top-K across seeds (>= 2 seeds);
* ``dose_response.png``: ΔPPL versus k (``--topk-sweep``).

Usage: ``python -m esa.reporting.plots OUT_DIR`` (plots only; ``python -m esa.report OUT_DIR`` adds report.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esa.naming import MODULE_TYPES, module_type
from esa.outdir.readers import read_json, read_top_rows
from esa.reporting.plotkit import layer_type_heatmap, save
from esa.reporting.plots_effects import (
    plot_dose_response,
    plot_perturbation,
    plot_stability,
    read_dose_response,
    read_perturbation,
    read_stability,
)
from esa.reporting.plots_scores import (
    layer_rows,
    plot_concentration,
    plot_score_distribution,
    read_concentration,
    read_score_distribution,
)

__all__ = ["MODULE_TYPES", "PLOTS", "PlotSpec", "make_plots", "module_type"]


TYPE_PHRASES = {"embeddings": "the embeddings", "lm_head": "the LM head", "other": "unclassified tensors"}


def _primary_rows(out_dir: Path) -> list[dict]:
    rows = read_top_rows(out_dir)
    return [r for r in rows if r["seed"] == rows[0]["seed"]] if rows else []


def _mode(out_dir: Path) -> str | None:
    cfg = read_json(out_dir, "config.json")
    return cfg["config"]["mode"] if cfg is not None else None


def topk_location_grid(out_dir: Path, rows: list[dict]) -> tuple[list[str], np.ndarray, str]:
    """What ``topk_locations.png`` shows: row labels (emb/head, then every layer of the model, so depth
    reads true even where no Top-K weight lives), the values ``[rows, len(MODULE_TYPES)]`` (float64) and
    what they are: ``"count"`` (global: how many Top-K weights fall in the cell) or, where the mode
    puts k in every tensor or row so that counts are the same by construction, ``"share"``: the Top-K's
    share of the cell's total score (sum of its Top-K scores in ``top_weights.csv`` ÷ sum over its
    tensors of mean × count in ``sensitivity_stats.json``)."""
    stats = read_json(out_dir, "sensitivity_stats.json")
    tensors = stats["tensors"] if stats else {}
    ylabels, row = layer_rows(list(tensors) + [r["parameter"] for r in rows])
    values = np.zeros((len(ylabels), len(MODULE_TYPES)))
    cell = {n: (row[n], MODULE_TYPES.index(module_type(n))) for n in row}
    structured = _mode(out_dir) in ("per_layer", "per_row") and all(r["parameter"] in tensors for r in rows)
    for r in rows:
        values[cell[r["parameter"]]] += float(r["score"]) if structured else 1.0
    if not structured:
        return ylabels, values, "count"
    totals = np.zeros_like(values)
    for name, s in tensors.items():
        totals[cell[name]] += s["mean"] * s["count"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return ylabels, np.where(totals > 0, values / totals, 0.0), "share"


def plot_topk_locations(out_dir: Path, dest: Path) -> bool:
    rows = _primary_rows(out_dir)
    if not rows:
        return False
    ylabels, values, kind = topk_location_grid(out_dir, rows)
    top = values.max()
    text = (lambda v: f"{int(v)}") if kind == "count" else (lambda v: f"{100 * v:.2g}%")
    cells = [(i, j, text(values[i, j]), "white" if values[i, j] < 0.6 * top else "black")
             for i, j in zip(*np.nonzero(values))]
    what = ("cell = count" if kind == "count" else
            f"{_mode(out_dir)}: k in every {'tensor' if _mode(out_dir) == 'per_layer' else 'row'}; "
            "cell = the Top-K's share of the cell's total score")
    fig, _ = layer_type_heatmap(np.ma.masked_equal(values, 0),  # empty cells blank: a few hot cells stand out
                                ylabels, "viridis", cells, xlabel="module type (from parameter names)",
                                title=f"Where the Top-K live: {len(rows)} weights of seed {rows[0]['seed']} ({what})",
                                bar_label="Top-K weights in the cell (count)" if kind == "count"
                                else "Top-K share of the cell's total score")
    save(fig, dest)
    return True


def read_topk_locations(out_dir: Path) -> str | None:
    rows = _primary_rows(out_dir)
    if not rows:
        return None
    ylabels, values, kind = topk_location_grid(out_dir, rows)
    if kind == "share":
        i, j = np.unravel_index(int(values.argmax()), values.shape)
        unit = "tensor" if _mode(out_dir) == "per_layer" else "output row"
        return (f"{_mode(out_dir)} selects k in every {unit}, so the cells show the Top-K's share of each cell's "
                f"total score instead of counts: highest in {MODULE_TYPES[j]} of "
                f"{'layer ' if i else ''}{ylabels[i]} ({100 * values[i, j]:.3g} %), median over the cells "
                f"{100 * float(np.median(values[values > 0])):.3g} %.")
    n = len(rows)
    by_type = values.sum(0)
    by_layer = values.sum(1)
    t = int(by_type.argmax())
    order = np.argsort(-by_layer, kind="stable")[:3]
    layers = ", ".join(f"{'layer ' if i else ''}{ylabels[i]} ({int(by_layer[i])})" for i in order if by_layer[i] > 0)
    per_tensor = len({r["parameter"] for r in rows})
    return (f"{int(by_type[t])} of the {n} Top-K weights ({100 * by_type[t] / n:.0f} %) are in "
            f"{TYPE_PHRASES.get(MODULE_TYPES[t], MODULE_TYPES[t] + ' projections')} and the busiest rows are "
            f"{layers}; they sit in {per_tensor} distinct tensors.")


@dataclass(frozen=True)
class PlotSpec:
    file: str  # under OUT_DIR/plots/
    title: str  # section title in report.md
    draw: Callable[[Path, Path], bool]  # (out_dir, dest) -> whether its data existed and it was drawn
    read: Callable[[Path], str | None]  # one-sentence reading computed from the out-dir files


PLOTS = (
    PlotSpec("score_distribution.png", "Score distribution", plot_score_distribution, read_score_distribution),
    PlotSpec("topk_locations.png", "Where the Top-K live", plot_topk_locations, read_topk_locations),
    PlotSpec("score_concentration.png", "Score concentration per tensor", plot_concentration, read_concentration),
    PlotSpec("perturbation_effect.png", "Perturbation effect", plot_perturbation, read_perturbation),
    PlotSpec("stability.png", "Top-K stability across seeds", plot_stability, read_stability),
    PlotSpec("dose_response.png", "Dose–response", plot_dose_response, read_dose_response),
)


def make_plots(out_dir: Path) -> list[Path]:
    """Draw every plot whose data is in ``out_dir``; returns the PNG paths written."""
    out_dir = Path(out_dir)
    made = []
    for spec in PLOTS:
        dest = out_dir / "plots" / spec.file
        if spec.draw(out_dir, dest):
            made.append(dest)
    return made


if __name__ == "__main__":
    for p in make_plots(Path(sys.argv[1])):
        print(p)
