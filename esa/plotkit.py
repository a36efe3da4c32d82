"""Shared helpers of the plots and the report: reading out-dir files, number formatting, saving PNGs.

Everything here reads only the files of an out-dir, never a model.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display is ever needed
import matplotlib.pyplot as plt  # noqa: E402

from esa.modtypes import MODULE_TYPES  # noqa: E402
from esa.targets import layer_index  # noqa: E402

# one colour per module type, the same in every plot
TYPE_COLORS = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(MODULE_TYPES)}
# one colour per condition: the Top-K stands out, controls are muted
COND_COLORS = {"top_k": "tab:red", "random_k": "tab:blue", "bottom_k": "tab:gray"}

# what a score means, per metric (axis labels say the unit)
SCORE_UNITS = {
    "grad_x_weight": "|w·∂L/∂w| (nats; first-order loss change)",
    "grad_squared": "mean (∂L/∂w)² (nats² / weight unit²; empirical Fisher)",
    "hessian_diag": "Gauss–Newton diag (nats / weight unit²)",
    "hutchinson_diag": "|diag H| (nats / weight unit²; Hutchinson)",
    "magnitude": "|w| (weight units)",
    "act_mag": "|w|·‖x‖₂ (weight × activation units; Wanda)",
}


def read_json(out_dir: Path, name: str) -> dict | None:
    path = out_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def read_top_rows(out_dir: Path) -> list[dict]:
    """Rows of ``top_weights.csv`` (every seed; ``seed`` column as str), [] when absent."""
    path = out_dir / "top_weights.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(x) -> float:
    """A JSON number, or the strict-JSON strings "inf"/"-inf"/"nan", or None -> float (None -> nan)."""
    if x is None:
        return math.nan
    return float(x)  # float("inf") parses the strings written by esa.outputs


def sci(x: float, digits: int = 2) -> str:
    """Compact number: 3.2e4, 1.002, 0.031, 5.1e-7, inf (``digits`` significant digits for large/small)."""
    x = num(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 100 <= abs(x) < 1e4:
        return f"{x:.0f}"
    if 1e-2 <= abs(x) < 100:
        return f"{x:.{max(digits + 1, 3)}g}"
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mant}e{int(exp)}"


def count_text(n: int) -> str:
    """A weight count: 1024 -> "1,024", 786432 -> "786k", 134515008 -> "134.5M"."""
    n = int(n)
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1e3:.0f}k"
    if n < 1_000_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e9:.2f}B"


def ratio_text(r: float) -> str:
    """A perplexity ratio as a multiplier: ×1.002 near 1, ×3.2e4 when large."""
    r = num(r)
    if math.isfinite(r) and abs(r - 1) < 0.1:
        return f"×{r:.4f}"  # 4 decimals: ×1.0000 says "no change at this precision", not a rounded ×1
    if math.isfinite(r) and r < 10:
        return f"×{r:.2f}"
    return f"×{sci(r)}"


VERBS = {"zero": "Zeroing", "sign_flip": "Sign-flipping", "gauss_noise": "Adding Gaussian noise to",
         "bit_flip": "Flipping one bit of"}


def verb(perturb: str | None) -> str:
    """The perturbation as a sentence opening: ``zero`` -> "Zeroing"."""
    return VERBS.get(perturb or "", f"Perturbing ({perturb})")


def short_name(name: str) -> str:
    """A long parameter name shortened for labels: ``model.layers.12.mlp.down_proj.weight`` -> ``L12 down_proj``."""
    parts = [p for p in name.split(".") if p not in ("weight", "model", "transformer")]
    i = layer_index(name)
    leaf = parts[-1] if parts else name
    return f"L{i} {leaf}" if i is not None else leaf


def save(fig, dest: Path, dpi: int = 120) -> Path:
    """Write the PNG atomically (temporary sibling + rename) and close the figure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, dest)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return dest
