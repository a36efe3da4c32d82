"""The super-weight files from the results dict alone: ``super_weights.json``, the table
(``super_weights.txt``, also printed) and the spike plot (``super_weights.png``).

``python -m esa.report OUT_DIR`` redraws the plot and rewrites the table of an old run (an ESA run's
or a find_super_weights.py out-dir) from its JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from esa.outdir.atomic import atomic_write_text, write_json
from esa.reporting.format import layer_span, num, ratio_text, sci
from esa.reporting.parts import Part, register
from esa.reporting.plotkit import save

JSON_NAME = "super_weights.json"
TABLE_NAME = "super_weights.txt"
PLOT_NAME = "super_weights.png"


def _label(pass_layer: Mapping) -> str:
    return str(pass_layer["layer"]) if pass_layer.get("layer") is not None else pass_layer["module"]


def format_table(results: Mapping) -> str:
    """Candidates (layer, parameter, row, col, value, activations, spike ratio) and ablation ratios."""
    cands = results.get("candidates") or []
    abl = results.get("ablation") or {}
    each = abl.get("each") or []
    s = results.get("settings", {})
    lines = [f"super-weight search: threshold {s.get('threshold')}x the median max |down-proj output|, "
             f"{len(cands)} candidate(s); stopped: {results.get('stopped')}"]
    if cands:
        head = (f"{'#':>2} {'layer':>5} {'parameter':<40} {'row':>6} {'col':>6} {'weight':>9} {'|x_in|':>9} "
                f"{'|y_out|':>9} {'spike':>8} {'tok':>4} {'ppl zeroed':>11} {'ratio':>9}  feeds")
        lines += [head, "-" * len(head)]
        for i, c in enumerate(cands):
            ev = each[i] if i < len(each) else {}
            param = c["param"] + (f"[expert {c['expert']}]" if c.get("expert") is not None else "")
            lines.append(f"{i + 1:>2} {str(c['layer']):>5} {param[-40:]:<40} {c['row']:>6} {c['col']:>6} "
                         f"{c['weight']:>9.4g} {abs(num(c['input_activation'])):>9.4g} "
                         f"{abs(num(c['output_activation'])):>9.4g} {sci(c['output_ratio']) + 'x':>8} "
                         f"{c['position']:>4} {sci(ev.get('ppl')) if ev else '-':>11} "
                         f"{ratio_text(ev['ratio']) if ev else '-':>9}  {feeds_text(c.get('feeds'))}")
        lines.append("row, col: indices in the weight tensor's own layout (Linear [out, in]; Conv1D [in, out]); "
                     "|x_in|, |y_out|: input and output activation at token position 'tok'; spike: max |output| "
                     "/ median over layers; ratio: perplexity with that weight alone zeroed / baseline; feeds: the "
                     "residual channel it writes and the layers where that channel holds a massive activation "
                     "(|h| > massive_min and > massive_ratio x the layer median) on the detection input")
    else:
        lines.append("no down-projection output exceeded the threshold: no super-weight candidate")
    if abl:
        base = abl["baseline"]["ppl"]
        lines.append(f"ablation on {abl['windows']} windows x {abl['seq_len']} tokens: baseline ppl {sci(base)}")
        if abl.get("all"):
            lines.append(f"  all {len(cands)} candidates zeroed: ppl {sci(abl['all']['ppl'])} "
                         f"({ratio_text(abl['all']['ratio'])})")
            lines.append(f"  {len(cands)} random weight(s) of the same matrices zeroed (seed {abl['seed']}): ppl "
                         f"{sci(abl['random']['ppl'])} ({ratio_text(abl['random']['ratio'])})")
    lines += _overlap_lines(results.get("topk_overlap"))
    return "\n".join(lines)


def feeds_text(feeds: Mapping | None) -> str:
    """"ch 507: massive in layers 4–28 (max 1.2e3)", "ch 507: not massive", or "-" (an older file)."""
    if not feeds:
        return "-"
    if not feeds["massive"]:
        return f"ch {feeds['channel']}: not massive"
    return f"ch {feeds['channel']}: massive in {layer_span(feeds['layers'])} (max {sci(feeds['max'])})"


def _overlap_lines(overlap: Mapping | None) -> list[str]:
    """One line per seed: which candidates are in the metric's Top-K (esa_runner --detect-super-weights)."""
    if not overlap:
        return []
    out = [f"overlap with the {overlap['metric']} Top-K ({overlap['mode']}, k={overlap['k']}):"]
    for seed, rows in overlap["per_seed"].items():
        hits = [f"#{i + 1} at rank {r['rank']}" for i, r in enumerate(rows) if r["in_topk"]]
        out.append(f"  seed {seed}: {len(hits)} of {len(rows)} candidates in the Top-K"
                   + (f" ({', '.join(hits)})" if hits else ""))
    return out


def spike_notes(results: Mapping) -> dict[int, str]:
    """Why each spike of the first pass (by projection index) that holds no candidate is not one: it
    vanished once earlier candidates were zeroed (a consequence of their super activation), or it
    still spikes when the search stopped."""
    passes = results["passes"]
    held = {_where(passes[0]["layers"], c) for c in results.get("candidates") or []}
    notes = {}
    for i, r in enumerate(passes[0]["layers"]):
        if not r["spike"] or i in held:
            continue
        gone = next((p for p in passes[1:] if not p["layers"][i]["spike"]), None)
        if gone is not None:
            n = len(gone["zeroed"])
            notes[i] = f"gone once {'#1' if n == 1 else f'#1-#{n}'} {'was' if n == 1 else 'were'} zeroed"
        elif str(results.get("stopped", "")).startswith("max_super_weights"):
            notes[i] = "still spiking when the search stopped (--max-super-weights reached)"
        else:
            notes[i] = "still spiking, but no weight not yet a candidate explains it"
    return notes


def _where(layers: list[Mapping], cand: Mapping) -> int:
    """The index of the candidate's projection among the first pass's projections."""
    return next(i for i, r in enumerate(layers) if r["module"] == cand["module"]
                and r.get("expert") == cand.get("expert"))


def _label_levels(xs: list[float]) -> list[int]:
    """A height level per label (in ``xs`` order) so that labels of neighbouring layers stack
    instead of overlapping."""
    levels: list[int] = []
    for i, x in enumerate(xs):
        near = [levels[j] for j in range(i) if abs(xs[j] - x) < 2.5]
        levels.append(next(lv for lv in range(len(xs) + 1) if lv not in near))
    return levels


def plot_spikes(source: Mapping | str | Path, dest: str | Path) -> Path:
    """Max |down-proj input| and |output| per layer on a log axis, every candidate and every other
    spike marked; from the JSON only.

    ``source``: the results dict, a ``super_weights.json`` path or the out-dir holding it.  The first
    pass (the unmodified model) is drawn solid; when candidates were zeroed, the last pass (with them
    zeroed) is drawn dashed, so the plot shows whether the spikes vanish.  Each candidate has its own
    star, numbered as in the table (two candidates of one layer sit side by side), at its |output| in
    the pass that found it; a spike that is not a candidate is an ``x`` whose note (below the axes)
    says why.  Labels of neighbouring layers are stacked so they never overlap.
    """
    import matplotlib.pyplot as plt

    if not isinstance(source, Mapping):
        path = Path(source)
        source = json.loads((path / JSON_NAME if path.is_dir() else path).read_text())
    passes = source["passes"]
    first = passes[0]["layers"]
    xs = list(range(len(first)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(xs) + 3), 4.2))
    ax.plot(xs, [num(r["out_max"]) for r in first], "o-", color="tab:red", ms=4, label="max |output| (down-proj)")
    ax.plot(xs, [num(r["in_max"]) for r in first], "s-", color="tab:blue", ms=3, label="max |input| (down-proj)")
    if len(passes) > 1:
        last = passes[-1]["layers"]
        n = len(passes[-1]["zeroed"])
        ax.plot(xs, [num(r["out_max"]) for r in last], "--", color="tab:red", alpha=0.6,
                label=f"max |output|, {n} candidate(s) zeroed")
        ax.plot(xs, [num(r["in_max"]) for r in last], "--", color="tab:blue", alpha=0.6,
                label=f"max |input|, {n} candidate(s) zeroed")
    thr = num(source["settings"]["threshold"]) * num(passes[0]["median_out_max"])
    ax.axhline(thr, color="gray", lw=0.8, ls=":", label=f"spike threshold ({sci(source['settings']['threshold'])}x "
                                                          "median max |output|)")
    labels: list[tuple[float, float, str]] = []  # (x, y, text) of every marked point
    cands = source.get("candidates") or []
    per_layer: dict[int, list[int]] = {}
    for n, c in enumerate(cands):
        per_layer.setdefault(_where(first, c), []).append(n)
    for i, numbers in per_layer.items():
        for j, n in enumerate(numbers):  # side by side within the layer
            labels.append((i + 0.3 * (j - (len(numbers) - 1) / 2), abs(num(cands[n]["output_activation"])),
                           f"#{n + 1}"))
    if cands:
        ax.scatter([x for x, _, _ in labels], [y for _, y, _ in labels], marker="*", s=110, color="gold",
                   edgecolors="black", linewidths=0.6, zorder=4, label="candidate #n (as in the table), at its "
                   "|output| when found")
    notes = spike_notes(source)
    if notes:
        ax.scatter(list(notes), [num(first[i]["out_max"]) for i in notes], marker="x", s=60, color="black",
                   zorder=4, label="spike that is not a candidate (why: below)")
        labels += [(i, num(first[i]["out_max"]), f"L{_label(first[i])}") for i in notes]
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, 10 ** (math.log10(lo) + (math.log10(hi) - math.log10(lo)) / 0.72))  # a band for the labels
    order = sorted(range(len(labels)), key=lambda k: labels[k][0])
    for k, level in zip(order, _label_levels([labels[k][0] for k in order])):
        x, y, text = labels[k]  # in the band above the data, stacked where layers are close, a line to the point
        ax.annotate(text, (x, y), xytext=(x, 0.97 - 0.075 * level), textcoords=("data", "axes fraction"),
                    ha="center", va="top", fontsize=8, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"})
    ax.set_xticks(xs)
    ax.set_xticklabels([_label(r) for r in first], fontsize=7, rotation=90 if len(xs) > 40 else 0)
    ax.set_xlabel("layer (MLP output projection)")
    ax.set_ylabel("max |activation| over tokens (log)")
    ax.set_title("Super-activation search: down-projection maxima per layer", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a spike
    text = [f"#{n + 1}: L{c['layer']} [{c['row']}, {c['col']}] = {c['weight']:.4g}, spike {sci(c['output_ratio'])}x"
            for n, c in enumerate(cands)]
    text += [f"L{_label(first[i])} ch {first[i]['out_channel']}: spike, not a candidate: {why}"
             for i, why in notes.items()]
    if text:
        ax.text(0.0, -0.17, "\n".join(text), ha="left", va="top", fontsize=8, transform=ax.transAxes)
    return save(fig, Path(dest))


def write_super_weights(results: Mapping, out_dir: str | Path) -> list[str]:
    """Write ``super_weights.json``, ``super_weights.txt`` (the table) and ``super_weights.png`` into
    ``out_dir`` (atomically); return the file names written."""
    out = Path(out_dir)
    write_json(out / JSON_NAME, results)
    atomic_write_text(out / TABLE_NAME, format_table(results) + "\n")
    plot_spikes(results, out / PLOT_NAME)
    return [JSON_NAME, TABLE_NAME, PLOT_NAME]


def redraw(out_dir: Path) -> Path:
    """``super_weights.png`` again from the out-dir's ``super_weights.json``."""
    return plot_spikes(Path(out_dir) / JSON_NAME, Path(out_dir) / PLOT_NAME)


# report.md's super-weight section is built by report_md (it also reads the Top-K overlap).
register(Part(JSON_NAME, figure=redraw))
