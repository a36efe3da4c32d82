"""PNG plots built only from the files in an out-dir (so old runs can be re-plotted without a model).

* ``plots/topk_locations.png``: heatmap of Top-K counts by layer index x module type;
* ``plots/perturbation_effect.png``: perplexity change of the Top-K and each control (log scale).

Usage: ``python -m esa.plots OUT_DIR``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from esa.targets import layer_index  # noqa: E402

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embeddings", "lm_head", "other")
_TYPE_PATTERNS = [
    ("embeddings", r"(embed|wte|wpe|word_embeddings|position_embeddings)"),
    ("lm_head", r"(lm_head|embed_out|output\.weight$)"),
    ("q", r"(q_proj|\.query\b|\.wq\b)"), ("k", r"(k_proj|\.key\b|\.wk\b)"), ("v", r"(v_proj|\.value\b|\.wv\b)"),
    ("o", r"(o_proj|out_proj|attn\.c_proj|attention\.dense|\.wo\b)"),
    ("gate", r"(gate_proj|\.w1\b)"), ("up", r"(up_proj|c_fc|fc1|dense_h_to_4h|\.w3\b)"),
    ("down", r"(down_proj|mlp\.c_proj|fc2|dense_4h_to_h|\.w2\b)"),
]


def module_type(name: str) -> str:
    """Coarse module type from a parameter name, by generic naming conventions."""
    for kind, pattern in _TYPE_PATTERNS:
        if re.search(pattern, name):
            return kind
    return "other"


def _save(fig, dest: Path) -> Path:
    """Write the PNG atomically (temporary sibling + rename) and close the figure."""
    tmp = dest.with_name(f".{dest.name}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, dest)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return dest


def plot_topk_locations(out_dir: Path, dest: Path) -> Path | None:
    path = out_dir / "top_weights.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    seed = rows[0]["seed"] if rows else None
    rows = [r for r in rows if r["seed"] == seed]
    layers = sorted({i for r in rows if (i := layer_index(r["parameter"])) is not None})
    ylabels = ["(none)"] + [str(i) for i in layers]
    ypos = {None: 0, **{i: j + 1 for j, i in enumerate(layers)}}
    counts = np.zeros((len(ylabels), len(MODULE_TYPES)))
    for r in rows:
        counts[ypos[layer_index(r["parameter"])], MODULE_TYPES.index(module_type(r["parameter"]))] += 1
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.25 * len(ylabels) + 1.5)))
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(MODULE_TYPES)), MODULE_TYPES, rotation=45, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7 if len(ylabels) > 20 else 9)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer index ((none) = embeddings / head)")
    ax.set_title(f"Where the Top-K live (seed {seed}, {len(rows)} weights)")
    fig.colorbar(im, ax=ax, label="Top-K weights (count)")
    return _save(fig, dest)


def plot_perturbation(out_dir: Path, dest: Path) -> Path | None:
    path = out_dir / "perturbation_results.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    names = list(res["conditions"])
    deltas = []
    for n in names:
        d = res["conditions"][n].get("delta_ppl")
        d = math.inf if d == "inf" else d
        deltas.append(d if isinstance(d, (int, float)) else math.nan)
    finite = [d for d in deltas if math.isfinite(d) and d > 0]
    floor = min(finite) / 10 if finite else 1e-6
    cap = max(finite) * 10 if finite else 1.0
    shown = [cap if d == math.inf else max(d, floor) if math.isfinite(d) else floor for d in deltas]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(names, shown, color=["tab:red"] + ["tab:gray"] * (len(names) - 1))
    for bar, d in zip(bars, deltas):
        label = "inf" if d == math.inf else ("n/a" if not math.isfinite(d) else f"{d:.3g}")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set_ylabel("ΔPPL = PPL − baseline (log scale)")
    ax.set_xlabel("condition (ΔPPL ≤ 0 drawn at the axis floor; labels give exact values)")
    ax.set_title(f"{res['perturb']} of k={res['k']} ({res['mode']}, {res['metric']}), "
                 f"baseline PPL {res['baseline']['ppl']:.3g}")
    return _save(fig, dest)


def make_plots(out_dir: Path) -> list[Path]:
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = [plot_topk_locations(out_dir, plots / "topk_locations.png"),
            plot_perturbation(out_dir, plots / "perturbation_effect.png")]
    return [p for p in made if p is not None]


if __name__ == "__main__":
    for p in make_plots(Path(sys.argv[1])):
        print(p)
