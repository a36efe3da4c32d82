"""What every plot shares: the headless backend, colours, axis units and the atomic PNG save."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display is ever needed
import matplotlib.pyplot as plt  # noqa: E402

from esa.naming import MODULE_TYPES  # noqa: E402
from esa.outdir.atomic import atomic_write_bytes  # noqa: E402

# one colour per module type, the same in every plot
TYPE_COLORS = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(MODULE_TYPES)}
# one colour per condition: the Top-K stands out, controls are muted
COND_COLORS = {"top_k": "tab:red", "random_k": "tab:blue", "bottom_k": "tab:gray", "random_mag_k": "tab:orange"}

def save(fig, dest: Path, dpi: int = 120) -> Path:
    """Render the PNG in memory, write it atomically and close the figure."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write_bytes(dest, buf.getvalue())


def score_unit(config: dict | None, metric: str) -> str:
    """What a score of ``metric`` measures, as recorded in config.json by the run (``metric_info``),
    so that this package never imports the metrics; older out-dirs fall back to the metric's name."""
    info = (config or {}).get("metric_info") or {}
    return info.get("unit") or f"{metric} score"


def layer_type_heatmap(shown, ylabels: list[str], cmap_name: str, cells: list[tuple[int, int, str, str]], *,
                       xlabel: str, title: str, bar_label: str, norm=None):
    """The layer x module-type grid both heatmaps use: ``shown`` ``[len(ylabels), len(MODULE_TYPES)]``
    (masked cells grey), ``cells`` = (row, col, text, text colour) labels.  Returns ``(fig, colorbar)``."""
    fig, ax = plt.subplots(figsize=(9, max(3.5, 0.26 * len(ylabels) + 1.8)))
    cmap = plt.get_cmap(cmap_name).with_extremes(bad="#f2f2f2")
    im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    small = len(ylabels) > 20
    for i, j, text, color in cells:
        ax.text(j, i, text, ha="center", va="center", fontsize=6 if small else 8, color=color)
    ax.set_xticks(range(len(MODULE_TYPES)), MODULE_TYPES, rotation=45, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7 if small else 9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer index (emb/head = outside the blocks)")
    ax.set_title(title, fontsize=10)
    return fig, fig.colorbar(im, ax=ax, label=bar_label)
