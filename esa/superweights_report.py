"""Super-weight validation and outputs: ablation, the ``super_weights.json`` dict, table, plot, Top-K overlap.

:func:`run_super_weights` is the one call for a pipeline: detection (:mod:`esa.superweights`) plus
:func:`ablate`, which validates the candidates by perplexity on evaluation windows with each one
zeroed alone, all zeroed, and as many seeded random weights of the same matrices zeroed (the
control), always restoring the model bit-exactly.  :func:`write_super_weights` writes the JSON,
the table and the plot; :func:`format_table` and :func:`plot_spikes` read only the results dict
(or the JSON file), never a model, so an old run can be re-plotted:

    python -m esa.superweights_report OUT_DIR     (re-draws super_weights.png and prints the table)
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from esa.config import UsageError
from esa.evaluate import NaNLossError, perplexity
from esa.outputs import atomic_write_text, write_json
from esa.plotkit import num, ratio_text, save, sci
from esa.seeding import numpy_rng
from esa.superweights import (
    DEFAULT_MAX_SUPER_WEIGHTS,
    DEFAULT_PROMPT,
    DEFAULT_THRESHOLD,
    DETECT_WINDOWS,
    SPIKE_RULE,
    Candidate,
    Projection,
    detect_super_weights,
    find_mlp_output_projections,
    zeroed,
)

log = logging.getLogger("esa")

JSON_NAME = "super_weights.json"
TABLE_NAME = "super_weights.txt"
PLOT_NAME = "super_weights.png"


def _ppl(model: nn.Module, windows: torch.Tensor, batch_size: int, base: float | None) -> dict:
    try:
        ev = perplexity(model, windows, batch_size)
        row = {"ppl": ev["ppl"], "mean_nll": ev["mean_nll"]}
    except NaNLossError:  # no prediction left: infinite perplexity, as esa.pipeline reports it
        log.warning("NaN loss during super-weight ablation; perplexity reported as inf")
        row = {"ppl": math.inf, "mean_nll": math.nan, "non_finite_loss": "nan"}
    if base is not None:
        row["ratio"] = row["ppl"] / base if base > 0 else math.nan
    return row


def random_control(projections: Sequence[Projection], candidates: Sequence[Candidate], seed: int
                   ) -> list[tuple[str, int]]:
    """As many random weights as candidates, each from its candidate's matrix, disjoint from every
    candidate and from each other; stream ``superweights:random`` of ``seed``."""
    rng = numpy_rng(seed, "superweights:random")
    numel = {p.param_name: p.weight.numel() for p in projections}
    taken = {c.key for c in candidates}
    out = []
    for c in candidates:
        if numel[c.param] <= sum(k[0] == c.param for k in taken):
            raise ValueError(f"{c.param} has no weight left for the random control")
        while True:
            key = (c.param, int(rng.integers(0, numel[c.param])))
            if key not in taken:
                break
        taken.add(key)
        out.append(key)
    return out


def ablate(model: nn.Module, candidates: Sequence[Candidate], windows: torch.Tensor, batch_size: int,
           seed: int = 0, projections: Sequence[Projection] | None = None) -> dict:
    """Perplexity on ``windows`` ``[W, L]`` int64: baseline, each candidate zeroed alone, all zeroed, and
    the seeded random control (same count, same matrices); ``ratio`` = ppl / baseline.  Restores the model."""
    projs = list(projections) if projections is not None else find_mlp_output_projections(model)
    base = _ppl(model, windows, batch_size, None)
    out: dict = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "batch_size": batch_size,
                 "seed": seed, "baseline": base, "each": [], "all": None, "random": None}
    if not candidates:
        return out
    for c in candidates:
        with zeroed(projs, [c.key]) as info:
            row = _ppl(model, windows, batch_size, base["ppl"])
        out["each"].append({"param": c.param, "row": c.row, "col": c.col, "flat_index": c.flat_index, **row,
                            "n_changed": info["n_changed"]})
        log.info("zeroing %s[%d, %d]: perplexity %.4g (x%.3g)", c.param, c.row, c.col, row["ppl"], row["ratio"])
    with zeroed(projs, [c.key for c in candidates]) as info:
        out["all"] = {**_ppl(model, windows, batch_size, base["ppl"]), "n_changed": info["n_changed"]}
    rand = random_control(projs, candidates, seed)
    with zeroed(projs, rand) as info:
        out["random"] = {**_ppl(model, windows, batch_size, base["ppl"]), "n_changed": info["n_changed"],
                         "weights": [[n, i] for n, i in rand]}
    return out


def prompt_input_ids(tokenizer, prompt: str) -> torch.Tensor:
    """``[1, T]`` int64 ids of ``prompt`` as the model sees text (BOS added when the tokenizer adds it)."""
    ids = tokenizer(prompt).input_ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long)


def detection_input(tokenizer, prompt: str | None, calib_pool: torch.Tensor, on_data: bool) -> torch.Tensor:
    """What the detector reads, for both command lines: the first :data:`DETECT_WINDOWS` calibration
    windows (``on_data``) or ``[1, T]`` ids of ``prompt`` (default :data:`DEFAULT_PROMPT`).  A prompt
    that encodes to no tokens is a usage error."""
    if on_data:
        return calib_pool[:DETECT_WINDOWS]
    try:
        return prompt_input_ids(tokenizer, prompt or DEFAULT_PROMPT)
    except ValueError as exc:
        raise UsageError(f"prompt: {exc}") from None


def run_super_weights(model: nn.Module, input_ids: torch.Tensor, windows: torch.Tensor | None, *,
                      threshold: float = DEFAULT_THRESHOLD, max_super_weights: int = DEFAULT_MAX_SUPER_WEIGHTS,
                      batch_size: int = 4, seed: int = 0, tokenizer=None, settings: Mapping | None = None) -> dict:
    """Detection on ``input_ids`` ``[B, T]`` plus ablation on ``windows`` ``[W, L]`` (None: skipped).

    Returns the JSON-able ``super_weights.json`` dict; ``settings`` (prompt, model id, ...) is
    recorded as given, next to threshold, max_super_weights, batch_size and seed.  ``tokenizer``
    (optional) decodes the spike tokens.  The model is bit-identical afterwards.
    """
    projs = find_mlp_output_projections(model)
    det = detect_super_weights(model, input_ids, threshold, max_super_weights, projs)
    cands: list[Candidate] = det["candidates"]
    rows = [asdict(c) for c in cands]
    if tokenizer is not None:
        for r in rows:
            r["token"] = None if r["token_id"] is None else tokenizer.decode([r["token_id"]])
    return {"tool": "find_super_weights",
            "settings": {**(settings or {}), "threshold": threshold, "max_super_weights": max_super_weights,
                         "batch_size": batch_size, "seed": seed},
            "rule": SPIKE_RULE,
            "detection_input": {"sequences": int(input_ids.shape[0]), "tokens_per_sequence": int(input_ids.shape[1])},
            "projections": det["projections"], "passes": det["passes"], "stopped": det["stopped"],
            "candidates": rows,
            "ablation": None if windows is None else ablate(model, cands, windows, batch_size, seed, projs)}


def overlap_with_topk(candidates: Iterable[Candidate | Mapping], top_rows: Iterable[Sequence]) -> list[dict]:
    """For each candidate, whether it is in the Top-K and at which 1-based rank.

    ``top_rows``: the Top-K in rank order as ``(parameter name, flat index[, score, ...])`` rows, e.g.
    ``Selection.ranked(names)``; a weight ``W[r, c]`` of a 2-D tensor has flat index ``r * W.shape[1] + c``.
    """
    rank: dict[tuple[str, int], int] = {}
    for i, row in enumerate(top_rows, start=1):
        rank.setdefault((str(row[0]), int(row[1])), i)
    out = []
    for c in candidates:
        d = asdict(c) if isinstance(c, Candidate) else dict(c)
        key = (d["param"], int(d["flat_index"]))
        out.append({"param": key[0], "layer": d.get("layer"), "row": d.get("row"), "col": d.get("col"),
                    "flat_index": key[1], "in_topk": key in rank, "rank": rank.get(key)})
    return out


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
                f"{'|y_out|':>9} {'spike':>8} {'tok':>4} {'ppl zeroed':>11} {'ratio':>9}")
        lines += [head, "-" * len(head)]
        for i, c in enumerate(cands):
            ev = each[i] if i < len(each) else {}
            lines.append(f"{i + 1:>2} {str(c['layer']):>5} {c['param'][-40:]:<40} {c['row']:>6} {c['col']:>6} "
                         f"{c['weight']:>9.4g} {abs(num(c['input_activation'])):>9.4g} "
                         f"{abs(num(c['output_activation'])):>9.4g} {sci(c['output_ratio']) + 'x':>8} "
                         f"{c['position']:>4} {sci(ev.get('ppl')) if ev else '-':>11} "
                         f"{ratio_text(ev['ratio']) if ev else '-':>9}")
        lines.append("row, col: indices in the weight tensor's own layout (Linear [out, in]; Conv1D [in, out]); "
                     "|x_in|, |y_out|: input and output activation at token position 'tok'; spike: max |output| "
                     "/ median over layers; ratio: perplexity with that weight alone zeroed / baseline")
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


def plot_spikes(source: Mapping | str | Path, dest: str | Path) -> Path:
    """Max |down-proj input| and |output| per layer on a log axis, spikes marked; from the JSON only.

    ``source``: the results dict, a ``super_weights.json`` path or the out-dir holding it.  The first
    pass (the unmodified model) is drawn solid; when candidates were zeroed, the last pass (with them
    zeroed) is drawn dashed, so the plot shows whether the spikes vanish.
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
    for i, r in enumerate(first):
        if r["spike"]:
            ax.annotate(f"L{_label(r)} ch {r['out_channel']}", (i, num(r["out_max"])), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8, color="tab:red")
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 4)  # headroom for the spike labels
    ax.set_xticks(xs)
    ax.set_xticklabels([_label(r) for r in first], fontsize=7, rotation=90 if len(xs) > 40 else 0)
    ax.set_xlabel("layer (MLP output projection)")
    ax.set_ylabel("max |activation| over tokens (log)")
    ax.set_title("Super-activation search: down-projection maxima per layer", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return save(fig, Path(dest))


def write_super_weights(results: Mapping, out_dir: str | Path) -> list[str]:
    """Write ``super_weights.json``, ``super_weights.txt`` (the table) and ``super_weights.png`` into
    ``out_dir`` (atomically); return the file names written."""
    out = Path(out_dir)
    write_json(out / JSON_NAME, results)
    atomic_write_text(out / TABLE_NAME, format_table(results) + "\n")
    plot_spikes(results, out / PLOT_NAME)
    return [JSON_NAME, TABLE_NAME, PLOT_NAME]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / JSON_NAME).is_file():
        print(f"usage: python -m esa.superweights_report OUT_DIR (a directory holding {JSON_NAME})", file=sys.stderr)
        return 2
    results = json.loads((Path(args[0]) / JSON_NAME).read_text())
    plot_spikes(results, Path(args[0]) / PLOT_NAME)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
