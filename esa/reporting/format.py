"""Numbers and names as a reader wants them: 3.2e4, ×1.0002, 134.5M, "Sign-flipping", "L12 down_proj"."""

from __future__ import annotations

import math

from esa.outdir.process import sessions


def num(x) -> float:
    """A JSON number, or the strict-JSON strings "inf"/"-inf"/"nan", or None -> float (None -> nan)."""
    if x is None:
        return math.nan
    return float(x)  # float("inf") parses the strings written by esa.outdir.atomic


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


def layer_span(layers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> "layers 3–5, 9"; ``[7]`` -> "layer 7"."""
    if not layers:
        return "no layer"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, [*layers[1:], None]):
        if cur is None or cur != prev + 1:
            runs.append(str(start) if start == prev else f"{start}–{prev}")
            start = cur
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(runs)


def run_text(manifest: dict) -> str:
    """How the run went, for report.md: ``success after 95 s``; a resumed run names each session and
    sums them: ``success after 95 s over 2 sessions (started T0, killed after 40 s; resumed T1,
    success after 55 s)``; a ``running`` manifest whose process is gone reads ``killed``."""
    each = sessions(manifest)
    total = sum(s["seconds"] or 0.0 for s in each)
    text = f"{each[-1]['status']} after {total:.0f} s"
    if len(each) == 1:
        return text
    parts = [f"{'started' if i == 0 else 'resumed'} {s['started_at']}, {s['status']} after {s['seconds'] or 0:.0f} s"
             for i, s in enumerate(each)]
    return f"{text} over {len(each)} sessions ({'; '.join(parts)})"


def prune_levels(c: dict) -> list[str]:
    """A run configuration's pruning levels (``--prune`` sparsities, then ``--prune-pattern`` N:M), or []."""
    return [*(c.get("prune") or []), *(c.get("prune_pattern") or [])]
