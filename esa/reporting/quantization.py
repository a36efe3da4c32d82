"""The quantization experiment in report.md and on the console, and its plot (from
``quantization_results.json`` only)."""

from __future__ import annotations

import math
from pathlib import Path

from esa.outdir.readers import read_json
from esa.reporting import summary
from esa.reporting.format import ratio_text, sci
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


def plot(out_dir: Path) -> Path | None:
    """Perplexity vs block size, one line per condition (mean over seeds, dots = seeds)."""
    res = read_json(out_dir, RESULTS)
    if res is None:
        return None
    blocks = res["block_sizes"]
    conds = list(next(iter(res["per_seed"].values()))[blocks[0]])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = list(range(len(blocks)))
    for i, c in enumerate(conds):
        per_seed = [[s[b][c]["ppl"] for b in blocks] for s in res["per_seed"].values()]
        mean = [math.exp(sum(math.log(v) for v in col) / len(col)) if all(0 < v < math.inf for v in col)
                else math.inf for col in zip(*per_seed)]
        shift = (i - (len(conds) - 1) / 2) * 0.04
        ax.plot([v + shift for v in x], mean, marker="o", color=COLORS.get(c, f"C{i}"), label=c)
        for ys in per_seed:
            ax.scatter([v + shift for v in x], ys, s=10, color=COLORS.get(c, f"C{i}"), alpha=0.5)
    ax.axhline(res["baseline"]["ppl"], color="gray", ls=":", label=f"unquantized ({sci(res['baseline']['ppl'], 4)})")
    ax.set_yscale("log")
    ax.set_xticks(x, blocks)
    ax.set_xlabel("block size (channel = one output row; integer = contiguous weights; tensor = whole tensor)")
    ax.set_ylabel("perplexity (log scale; line = geometric mean over seeds, dots = seeds)")
    q = res["quantizer"]
    ax.set_title(f"RTN {q['bits']}-bit: keeping weights in full precision, {res['metric']} Top-{res['k']}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out_dir / PLOT)


# The quantization table sits in report.md's Summary (report_md), so the part adds no section of its own.
register(Part(RESULTS, figure=plot, console=console_lines))
