"""The quantization experiment in report.md and on the console, and its plot (from
``quantization_results.json`` only)."""

from __future__ import annotations

import math
from pathlib import Path

from esa.outdir.readers import read_json
from esa.reporting import summary
from esa.reporting.format import num, ratio_text, sci
from esa.reporting.parts import Part, register
from esa.reporting.plotkit import COND_COLORS, plt, save

RESULTS = "quantization_results.json"
PLOT = "quantization.png"
COLORS = {"none": "black", "protect_topk": COND_COLORS["top_k"], "protect_random_k": COND_COLORS["random_k"],
          "protect_super_weights": "tab:purple"}


def _cell(res: dict, block: str, cond: str) -> str:
    """The ratio's mean ± std over seeds; a condition evaluated once (the same change on every seed)
    has no spread to show, so its one value alone."""
    s = (res.get("summary") or {}).get(block, {}).get(cond, {}).get("ratio")
    if s and cond not in res.get("evaluated_once", ()):
        return ratio_text(s["mean"]) + ("" if s.get("std") is None else f" ± {sci(s['std'])}")
    first = next(iter(res["per_seed"].values()))[block][cond]
    return ratio_text(first["ratio"])


def table(res: dict) -> summary.Table:
    """block size × condition → perplexity ratio to the unquantized model (mean ± std over seeds),
    the weights protected, and the p-value of protect_topk vs protect_random_k."""
    first = next(iter(res["per_seed"].values()))
    conds = list(first[res["block_sizes"][0]])
    head = ["block size", *conds, "protected (topk / random / super)"]
    if "tests" in res:
        head.append("p (topk vs random, log ratio)")
    rows = []
    for b in res["block_sizes"]:
        row = [b, *(_cell(res, b, c) for c in conds),
               " / ".join(str(first[b][c]["protected"]) for c in conds if c != "none")]
        if "tests" in res:
            t = res["tests"][b]["protect_topk_vs_protect_random_k"]["log_ratio"]
            row.append(sci(t.get("p_value")))
        rows.append(row)
    return head, rows


def caption(res: dict) -> str:
    q = res["quantizer"]
    seeds = res["seeds"]
    return (f"RTN {q['bits']}-bit of {q['quantized_weights']:,} weights in {q['quantized_tensors']} tensors"
            + (f", clipped at {q['clip_z']:g} std" if q.get("clip_z") else "")
            + f"; perplexity ÷ unquantized baseline {sci(res['baseline']['ppl'], 4)} on {res['eval_windows']} "
            f"evaluation windows; Top-K = {res['k']} by {res['metric']} ({res['mode']}); "
            + (f"mean ± sample std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}")
            + _once(res))


def _once(res: dict) -> str:
    once = res.get("evaluated_once") or []
    return f"; evaluated once, the same change on every seed, so no ±: {', '.join(once)}" if once else ""


def markdown_section(out_dir: Path) -> list[str]:
    res = read_json(out_dir, RESULTS)
    if res is None:
        return []
    lines = ["", "## Quantization", "", caption(res) + ":", "", *summary.markdown(table(res))]
    if (out_dir / PLOT).is_file():
        lines += ["", f"![quantization]({PLOT})"]
    return lines


def console_lines(out_dir: Path) -> list[str]:
    res = read_json(out_dir, RESULTS)
    return [] if res is None else [caption(res) + ":", *summary.text(table(res))]


def ratios_to_none(res: dict) -> dict[str, dict[str, list[float]]]:
    """Per block size, each protecting condition's perplexity ÷ that of plain RTN (``none``) of the same
    seed and block size, one value per seed: the question's answer (below 1 = the protection helps)."""
    out: dict[str, dict[str, list[float]]] = {}
    for b in res["block_sizes"]:
        seeds = list(res["per_seed"].values())
        conds = [c for c in seeds[0][b] if c != "none"]
        out[b] = {c: [num(s[b][c]["ppl"]) / num(s[b]["none"]["ppl"]) for s in seeds] for c in conds}
    return out


def plot(out_dir: Path) -> Path | None:
    """One panel per block size: each protection's perplexity change against plain RTN in % (the
    ratio to ``none`` − 1; dots = seeds, diamond = mean), on a linear axis of its own, so a 10 %
    rescue is as visible in a block size where RTN costs ×1.01 as in one where it costs ×100 (that
    cost is in each panel's title)."""
    res = read_json(out_dir, RESULTS)
    if res is None:
        return None
    ratios = ratios_to_none(res)
    first = next(iter(res["per_seed"].values()))
    fig, axes = plt.subplots(1, len(ratios), figsize=(1.2 + 2.7 * len(ratios), 4.2), squeeze=False)
    for ax, (b, by_cond) in zip(axes[0], ratios.items()):
        for i, (c, ratios_) in enumerate(by_cond.items()):
            values = [100 * (r - 1) for r in ratios_]
            color = COLORS.get(c, f"C{i}")
            ax.scatter([i] * len(values), values, s=14, color=color, alpha=0.5)
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                ax.scatter([i], [sum(finite) / len(finite)], marker="D", s=40, color=color, zorder=3)
        ax.axhline(0.0, color="black", lw=1, ls="--")
        ax.ticklabel_format(axis="y", useOffset=False)  # the values themselves, never "+1" and offsets
        ax.set_xticks(range(len(by_cond)), [c.removeprefix("protect_") for c in by_cond], rotation=30, ha="right")
        ax.set_xlim(-0.6, len(by_cond) - 0.4)
        ax.set_title(f"block {b}\nplain RTN {ratio_text(first[b]['none']['ratio'])} vs unquantized", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("perplexity vs plain RTN (%)")
    q = res["quantizer"]
    fig.suptitle(f"RTN {q['bits']}-bit: keeping weights in full precision, {res['metric']} Top-{res['k']} "
                 f"(below 0 = better than plain RTN; dots = seeds, diamond = mean)", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir / PLOT)


# The quantization table sits in report.md's Summary (report_md), so the part adds no section of its own.
register(Part(RESULTS, figure=plot, console=console_lines))
