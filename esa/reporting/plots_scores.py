"""Plots of the scores themselves (primary seed): their distribution and their concentration.

* ``score_distribution.png``: log-log complementary CDF P(score >= x), one line per module type and
  one for all target weights, from ``score_distribution.npz`` (exact top tail, weighted bulk sample;
  see :mod:`esa.analysis.score_sample`), with the Top-K threshold marked;
* ``score_concentration.png``: per tensor, the share of its total score held by its top 0.1 % of
  weights (``top_share`` in ``sensitivity_stats.json``), as a layer x module-type heatmap (the same
  grid as ``topk_locations.png``; one cell per tensor, log colour scale).

Each ``read_*`` returns the one-sentence reading of its plot computed from the same data.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm

from esa.analysis.score_sample import load_ccdf
from esa.naming import MODULE_TYPES, layer_index, module_type
from esa.outdir.readers import read_json
from esa.reporting.format import count_text, sci
from esa.reporting.plotkit import TYPE_COLORS, layer_type_heatmap, save, score_unit

SHARE_KEY = "0.1%"


def _load_npz(out_dir: Path) -> dict | None:
    path = out_dir / "score_distribution.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _thin(x: np.ndarray, p: np.ndarray, points: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Keep log-spaced ranks: every point of the extreme tail, ever fewer in the bulk (smooth on log y)."""
    if len(x) <= points:
        return x, p
    idx = np.unique(np.geomspace(1, len(x), points).astype(np.int64) - 1)
    return x[idx], p[idx]


def _quantile(x: np.ndarray, p: np.ndarray, q: float) -> float:
    """Smallest plotted score whose CCDF is still <= q (x descending, p ascending)."""
    i = int(np.searchsorted(p, q, side="right")) - 1
    return float(x[max(i, 0)]) if len(x) else math.nan


def plot_score_distribution(out_dir: Path, dest: Path) -> bool:
    z = _load_npz(out_dir)
    if z is None:
        return False
    metric, mode, k, seed = str(z["metric"]), str(z["mode"]), int(z["k"]), int(z["seed"])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    types = [str(t) for t in z["types"]]
    counts = dict(zip(types, z["count"].tolist()))
    nonpos = dict(zip(types, z["nonpositive"].tolist()))
    for t in types:
        x, p, n = load_ccdf(z, t)
        x, p = _thin(x, p)
        hidden = f"; {100 * nonpos[t] / n:.2g}% ≤ 0 not shown" if nonpos[t] else ""
        ax.loglog(x, p, color=TYPE_COLORS[t], lw=1.2, label=f"{t} ({count_text(counts[t])} weights{hidden})")
    x, p, n = load_ccdf(z)
    x, p = _thin(x, p)
    hidden = f"; {100 * int(z['nonpositive'].sum()) / n:.2g}% ≤ 0 not shown" if z["nonpositive"].sum() else ""
    ax.loglog(x, p, color="black", lw=2.2, label=f"all targets ({count_text(n)} weights{hidden})")
    thr = float(z["topk_threshold"])
    if mode in ("per_layer", "per_row") and len(z["thresholds"]) > 1:
        lo, hi = float(np.min(z["thresholds"])), float(np.max(z["thresholds"]))
        ax.axvspan(lo, hi, color="tab:red", alpha=0.12,
                   label=f"per-tensor Top-K thresholds (lowest selected score), k={k} per "
                         f"{'tensor' if mode == 'per_layer' else 'row'} ({sci(lo)} … {sci(hi)})")
    elif math.isfinite(thr):
        ax.axvline(thr, color="tab:red", ls="--", lw=1.5, label=f"Top-K threshold, k={k} {mode} ({sci(thr)})")
    ax.set_xlabel(f"score x: {score_unit(read_json(out_dir, 'config.json'), metric)}")
    ax.set_ylabel("fraction of weights with score ≥ x")
    ax.set_title(f"Score distribution ({metric}, seed {seed}): complementary CDF, log–log")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    save(fig, dest)
    return True


def read_score_distribution(out_dir: Path) -> str | None:
    z = _load_npz(out_dir)
    if z is None:
        return None
    x, p, n = load_ccdf(z)
    if not len(x):
        return "No weight has a positive score, so the log–log distribution is empty."
    med, q4 = _quantile(x, p, 0.5), _quantile(x, p, 1e-4)
    top_type = max((str(t) for t in z["types"]), key=lambda t: float(z[f"tail_{t}"][0]) if len(z[f"tail_{t}"]) else 0)
    thr, k, mode = float(z["topk_threshold"]), int(z["k"]), str(z["mode"])
    share = float(np.interp(-thr, -x, p)) if math.isfinite(thr) else math.nan  # CCDF at the threshold
    where = (f"the Top-K threshold {sci(thr)} is reached by {k} of {count_text(n)} weights"
             if mode == "global" else f"the lowest per-tensor Top-K threshold {sci(thr)} is exceeded by "
             f"{sci(100 * share)} % of all weights")
    return (f"The scores are heavy-tailed: the median is {sci(med)} but the top 0.01 % of weights score above "
            f"{sci(q4)} ({sci(q4 / med) if med > 0 else 'inf'}× the median) and the maximum {sci(x[0])} "
            f"(in {top_type}) is {sci(x[0] / med) if med > 0 else 'inf'}× the median; {where}.")


def _shares(out_dir: Path) -> list[tuple[str, float]]:
    stats = read_json(out_dir, "sensitivity_stats.json")
    if stats is None:
        return []
    out = []
    for name, s in stats["tensors"].items():
        v = (s.get("top_share") or {}).get(SHARE_KEY)
        if v is not None:
            out.append((name, float(v)))
    return out


def layer_rows(names: list[str]) -> tuple[list[str], dict[str, int]]:
    """Heatmap rows: "emb/head" (tensors outside the blocks) then every layer index of ``names``."""
    layers = sorted({i for n in names if (i := layer_index(n)) is not None})
    pos = {i: j + 1 for j, i in enumerate(layers)}
    return ["emb/head"] + [str(i) for i in layers], {n: pos.get(layer_index(n), 0) for n in names}


def plot_concentration(out_dir: Path, dest: Path) -> bool:
    shares = _shares(out_dir)
    if not shares:
        return False
    stats = read_json(out_dir, "sensitivity_stats.json")
    ylabels, row = layer_rows([n for n, _ in shares])
    grid = np.full((len(ylabels), len(MODULE_TYPES)), np.nan)
    for name, v in shares:  # several tensors in one cell (e.g. "other"): the most concentrated is shown
        r, c = row[name], MODULE_TYPES.index(module_type(name))
        grid[r, c] = max(100 * v, np.nan_to_num(grid[r, c], nan=0.0))
    finite = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=max(0.1, float(finite.min())), vmax=max(100.0 if finite.max() > 50 else float(finite.max()),
                                                                float(finite.min()) * 1.01))
    cells = [(i, j, f"{grid[i, j]:.2g}", "black" if norm(grid[i, j]) > 0.6 else "white")
             for i, j in zip(*np.nonzero(np.isfinite(grid)))]
    fig, bar = layer_type_heatmap(
        np.ma.masked_invalid(grid), ylabels, "magma", cells, norm=norm,
        xlabel="module type (from parameter names; grey = no such tensor)",
        title=f"Score concentration: % of each tensor's total {stats['metric']} score\n"
              f"held by its top 0.1 % of weights (seed {stats['seed']}; uniform scores = 0.1 %)",
        bar_label="share of the tensor's total score in its top 0.1 % of weights (%)")
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if norm.vmin <= t <= norm.vmax]
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.minorticks_off()  # LogNorm's minor labels (4×10^1, ...) would clutter the plain % ticks
    save(fig, dest)
    return True


def read_concentration(out_dir: Path) -> str | None:
    shares = _shares(out_dir)
    if not shares:
        return None
    ordered = sorted(shares, key=lambda s: -s[1])
    (top_n, top_v), (low_n, low_v) = ordered[0], ordered[-1]
    med = float(np.median([v for _, v in shares]))
    by_type = {}
    for n, v in shares:
        by_type.setdefault(module_type(n), []).append(v)
    conc_type = max(by_type, key=lambda t: np.median(by_type[t]))
    return (f"The top 0.1 % of a tensor's weights hold {100 * med:.2g} % of its total score in the median tensor "
            f"(0.1 % if scores were uniform), from {100 * low_v:.2g} % in {low_n} up to {100 * top_v:.3g} % in "
            f"{top_n}; the most concentrated module type is {conc_type} (median "
            f"{100 * float(np.median(by_type[conc_type])):.2g} %).")
