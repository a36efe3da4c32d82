"""The massive activations (``activations.json``, the ``activations`` evaluator) in report.md, on the
console and as ``activations.png``: per-layer max |residual-stream value| of the baseline and of
each condition of the primary seed, massive ones marked."""

from __future__ import annotations

import math
from pathlib import Path

from esa.outdir.readers import read_json
from esa.reporting import summary
from esa.reporting.format import layer_span, num, ratio_text, sci
from esa.reporting.parts import Part, register
from esa.reporting.plotkit import plt, save

RESULTS = "activations.json"
PLOT = "activations.png"


def channels_text(groups: list[dict], n_channels: int) -> str:
    """"507 (layers 4–28), 123 (layer 3)" (and how many more channels the record did not list)."""
    text = ", ".join(f"{g['channel']} ({layer_span(g['layers'])})" for g in groups)
    return text + (f" and {n_channels - len(groups)} more" if n_channels > len(groups) else "")


def primary(res: dict) -> list[dict]:
    """The conditions of the primary seed (the first seed measured; seed-free conditions too)."""
    seeds = [c["seed"] for c in res["conditions"] if c["seed"] is not None]
    return [c for c in res["conditions"] if c["seed"] is None or not seeds or c["seed"] == seeds[0]]


def _times(value, median) -> str:
    """``value`` as a multiple of ``median`` ("4.1e3")."""
    m = num(median)
    return sci(num(value) / m) if m > 0 else "inf"


def _gone_text(cond: dict) -> str:
    gone = {c: g for c, g in (cond.get("gone_from_layer") or {}).items() if g is not None}
    return ", ".join(f"channel {c} gone from layer {g} on" for c, g in gone.items()) or "every channel still massive"


def _restored(res: dict, cond: dict) -> dict | None:
    return next((c for c in res["conditions"] if c["condition"] == f"{cond['condition']}+restored"
                 and c["seed"] == cond["seed"] and c["group"] == cond["group"]), None)


def sentence(res: dict) -> str:
    """One sentence computed from the data: the baseline's massive activations and, when a Top-K
    condition was measured, what it did to them (and the perplexity with them restored)."""
    base = res["baseline"]
    largest = max(base["layers"], key=lambda r: num(r["max"]))
    if not base["n_massive"]:
        text = (f"The unmodified model has no massive activation (|h| > {res['massive_min']:g} and > "
                f"{res['massive_ratio']:g}× its layer's median) on {res['windows']} windows; its largest |h| is "
                f"{sci(largest['max'])} (layer {largest['layer']}, channel {largest['channel']}, "
                f"{_times(largest['max'], largest['median'])}× its median)")
    else:
        text = (f"The unmodified model has {base['n_massive']} massive activations (|h| > {res['massive_min']:g} and > "
                f"{res['massive_ratio']:g}× its layer's median) on {res['windows']} windows, at channel "
                f"{channels_text(base['massive'], base['n_channels'])}; the largest is {sci(largest['max'])} "
                f"(layer {largest['layer']}, token {largest['position']}, "
                f"{_times(largest['max'], largest['median'])}× its median)")
    top = next((c for c in primary(res) if c["condition"] == "top_k"), None)
    if top is not None and base["n_massive"]:
        text += (f"; perturbing the Top-K ({_label(top).split(', ', 1)[-1]}, seed {top['seed']}) leaves "
                 f"{top['still_massive']} of "
                 f"them massive ({_gone_text(top)}) and multiplies perplexity by {ratio_text(top['ppl_ratio'])}")
        back = _restored(res, top)
        if back is not None:
            text += f", {ratio_text(back['ppl_ratio'])} with the massive activations restored"
    return text + "."


def table(res: dict) -> summary.Table:
    """Condition (primary seed) → perplexity ratio, baseline massive activations still massive, where
    each channel is gone, and the largest |h| of the last layer."""
    head = ["condition", "ppl ratio", "still massive", "gone", "largest abs value, last layer"]
    rows = [["baseline", "×1", f"{res['baseline']['n_massive']} of {res['baseline']['n_massive']}", "-",
             sci(res["baseline"]["layers"][-1]["max"])]]
    for c in primary(res):
        rows.append([_label(c), ratio_text(c["ppl_ratio"]), f"{c['still_massive']} of {c['baseline_massive']}",
                     _gone_text(c) if c["baseline_massive"] else "-", sci(c["layers"][-1]["max"])])
    return head, rows


def markdown_section(out_dir: Path) -> list[str]:
    res = read_json(out_dir, RESULTS)
    if res is None:
        return []
    lines = ["", "## Massive activations", "", sentence(res), "",
             f"Rule: {res['rule']}. Per condition: each baseline massive activation's value at the same layer, "
             "window, token and channel; 'gone' = the first of its layers from which it is massive at none of the "
             "later ones.", "", *summary.markdown(table(res))]
    if (out_dir / PLOT).is_file():
        lines += ["", f"![massive activations]({PLOT})"]
    return lines


def console_lines(out_dir: Path) -> list[str]:
    res = read_json(out_dir, RESULTS)
    if res is None:
        return []
    base = res["baseline"]
    head = (f"massive activations: {base['n_massive']} at channels {channels_text(base['massive'], base['n_channels'])}"
            if base["n_massive"] else f"massive activations: none (|h| > {res['massive_min']:g} and > "
            f"{res['massive_ratio']:g}x the layer median)")
    return [head, sentence(res)]


def _label(cond: dict) -> str:
    """"top_k+restored, k=10" / "none, block channel" / "super weights: zero every candidate"."""
    if cond["experiment"] == "super_weights":
        return f"super weights: {cond['condition']}"
    group = {"perturbation": "k=", "quantization": "block "}.get(cond["experiment"], "") + cond["group"]
    return f"{cond['condition']}, {group}" if cond["group"] else cond["condition"]


def _marked(rec: dict) -> set[int]:
    return {layer for g in rec["massive"] for layer in g["layers"]}


def plot(out_dir: Path) -> Path | None:
    """Max |h| per layer (log), baseline and each primary-seed condition; massive layers marked."""
    res = read_json(out_dir, RESULTS)
    if res is None:
        return None
    base = res["baseline"]
    xs = [r["layer"] for r in base["layers"]]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.22 * len(xs) + 3), 4.5))

    def draw(rec: dict, label: str, **style) -> None:
        ys = [num(r["max"]) for r in rec["layers"]]
        line, = ax.plot(xs, [y if math.isfinite(y) and y > 0 else math.nan for y in ys], label=label, **style)
        hot = sorted(_marked(rec))
        ax.scatter(hot, [ys[i] for i in hot], s=36, marker="*", color=line.get_color(), zorder=3)

    draw(base, "baseline", color="black", lw=2.4, zorder=4)  # on top: most conditions leave it unchanged
    thr = [max(res["massive_min"], res["massive_ratio"] * num(r["median"])) for r in base["layers"]]
    ax.plot(xs, thr, ":", color="gray", lw=1, label="massive threshold (baseline)")
    palette = plt.get_cmap("tab20")
    plain = [c for c in primary(res) if not c["condition"].endswith("+restored")]
    for c in primary(res):  # a condition and its +restored twin share a colour; the twin is dashed
        twin = c["condition"].endswith("+restored")
        mate = next((i for i, p in enumerate(plain) if _label(p) == _label(c).replace("+restored", "")), 0)
        draw(c, _label(c), color=palette((2 * mate + twin) % 20), lw=1.2, ls="--" if twin else "-")
    ax.set_yscale("log")
    ax.set_xlabel("layer (decoder block output = residual stream)")
    ax.set_ylabel("max |activation| over windows and tokens (log)")
    ax.set_title(f"Massive activations (★ = |h| > {res['massive_min']:g} and > {res['massive_ratio']:g}× the layer "
                 f"median) on {res['windows']} windows", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, out_dir / PLOT)


register(Part(RESULTS, figure=plot, section=markdown_section, console=console_lines))
