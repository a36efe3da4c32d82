"""``report.md``: the run's question, configuration, summary table, plots with readings, file list.

Built only from the files of an out-dir (``config.json``, ``perturbation_results.json``,
``stability_summary.json``, ``experiment_manifest.json``, ``plots/*.png`` and what the plot readings
read), so ``python -m esa.report OUT_DIR`` rebuilds it for an old run without the model.  The
pipeline writes it at the end of every run; plot sections appear for the PNGs present in
``plots/`` (i.e. with ``--save-plots``).  Written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

from esa.outdir.atomic import atomic_write_text
from esa.outdir.layout import CHECKPOINT_DIR
from esa.outdir.readers import read_json
from esa.reporting import metrics_report, parts, perturbations_report, quantization, summary
from esa.reporting.format import count_text, num, prune_levels, ratio_text, run_text, sci, verb
from esa.reporting.plots import PLOTS
from esa.reporting.superweights import feeds_text

FILE_NOTES = {
    "config.json": "resolved configuration, device, library versions, targets, data source, seed semantics",
    "experiment_manifest.json": "status, timings per phase, peak memory, file list",
    "top_weights.csv": "the Top-K of every seed: rank (across all tensors), parameter, flat index, coordinates, score, "
                       "rank within its tensor",
    "sensitivity_stats.json": "per-tensor score statistics of the primary seed (quantiles, top shares)",
    "score_distribution.npz": "exact top scores and a weighted sample of all scores per module type (primary seed)",
    "perturbation_results.json": "baseline and every condition's perplexity, per seed, summary, tests, sweep",
    "stability_summary.json": "Jaccard overlap of the Top-K across seeds",
    "quantization_results.json": "per seed, block size and condition: perplexity, ratio to the unquantized model, "
                                 "weights protected, mean squared error of the unprotected weights; statistics",
    "quantization.png": "per block size, each protection's perplexity change against plain RTN (PNG)",
    "report.md": "this report",
    "super_weights.json": "super-weight candidates (data-free detector), every search pass, ablation, Top-K overlap",
    "super_weights.txt": "the super-weight table as printed",
    "super_weights.png": "max |down-projection input| and |output| per layer; each candidate numbered as in the "
                         "table, each other spike with why it is not one (PNG)",
    "activations.json": "per layer the largest |residual-stream value| and the median; the massive activations of the "
                        "baseline and of every condition, and what became of each baseline one",
    "activations.png": "max |residual-stream value| per layer, baseline vs each condition, massive ones marked (PNG)",
}


def _question(cfg: dict, pert: dict | None) -> str:
    c = cfg["config"]
    sel = {"per_layer": f"{c['topk']} weights per tensor", "per_row": f"{c['topk']} weights per output row"}.get(
        c["mode"], f"{c['topk']} weights")
    controls = " or ".join(f"`{x}`" for x in c["controls"]) or "no control"
    if c.get("quantize"):
        supers = ", or the super-weight candidates," if c.get("detect_super_weights") else ""
        return (f"**Question.** Does keeping the {sel} of `{c['model']}` with the highest `{c['metric']}` scores "
                f"(Top-K) in full precision rescue {c['bits']}-bit round-to-nearest quantization, more than keeping "
                f"as many random weights{supers} (block sizes {', '.join(map(str, c['block_sizes']))})?")
    if prune_levels(c):
        levels = ", ".join(prune_levels(c))
        return (f"**Question.** How much does removing the weights of `{c['model']}` with the lowest `{c['metric']}` "
                f"scores ({c['mode']}; sparsities and N:M patterns {levels}) hurt the model, against removing as many "
                f"by magnitude or at random?")
    if not c.get("perturb"):
        return (f"**Question.** Which weights of `{c['model']}` score highest under `{c['metric']}` "
                f"(Top-K, the {sel}), and how concentrated are the scores? (no perturbation run)")
    sweep = (f" And how many weights does it take (dose–response over k = {', '.join(map(str, c['topk_sweep']))})?"
             if c.get("topk_sweep") else "")
    return (f"**Question.** Does {verb(c['perturb']).lower()} the {sel} of `{c['model']}` with the highest "
            f"`{c['metric']}` scores (Top-K) hurt perplexity more than the same number of {controls} weights?{sweep}")


def _configuration(cfg: dict, pert: dict | None, manifest: dict | None) -> str:
    c, r, d = cfg["config"], cfg["resolved"], cfg["data"]
    seeds = ", ".join(map(str, r.get("seeds_run") or c["seeds"]))
    status = f"; run: {run_text(manifest)}" if manifest else ""
    return (f"**Configuration.** {count_text(cfg['targets']['weights'])} weights in {cfg['targets']['count']} "
            f"target tensors; {c['mode']} Top-K; data {d['data_source']}: {c['max_samples']} calibration windows "
            f"per seed, {d['eval_windows']} evaluation windows of {d['window_tokens']} tokens; seeds {seeds} "
            f"(primary {seeds.split(',')[0]}); {_change(c)}; {r['device']} {r['dtype']}{status}."
            + _caveats(c))


def _change(c: dict) -> str:
    """What the run does to the model: its perturbation, its quantization, or nothing."""
    if c.get("perturb"):
        return f"perturbation {c['perturb']} (scale {c['perturb_scale']}, prob {c['perturb_prob']})"
    if c.get("quantize"):
        return (f"quantization {c['quantize'].upper()} {c['bits']}-bit, block sizes "
                f"{', '.join(map(str, c['block_sizes']))}" + (f", clipped at {c['clip_z']:g} std" if c.get("clip_z")
                                                               else ""))
    if prune_levels(c):
        return f"pruning {', '.join(prune_levels(c))} ({c['mode']})"
    return "no perturbation (scores and Top-K only)"


def _caveats(c: dict) -> str:
    """What a reader must know to read the scores and top_weights.csv right."""
    notes = []
    if c["metric"] == "act_mag":
        notes.append("act_mag scores are not comparable across layers: the input norms ‖x‖ grow with depth, so a "
                     "global Top-K favours the layers with the largest activations")
    if c["mode"] in ("per_layer", "per_row"):
        notes.append(f"under {c['mode']}, `rank` in top_weights.csv orders the whole Top-K across tensors; "
                     "`tensor_rank` is the rank within the weight's own tensor")
    return "".join(f"\n\nNote: {n}." for n in notes)


def file_list(out_dir: Path, manifest: dict | None) -> list[str]:
    """Every file of the out-dir (manifest order first, then anything else found, e.g. re-made plots)."""
    names = list((manifest or {}).get("files", []))
    found = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out_dir).parts)
                   and p.relative_to(out_dir).parts[0] != CHECKPOINT_DIR)
    order = {f"plots/{s.file}": i for i, s in enumerate(PLOTS)}
    names += sorted((n for n in found if n not in names), key=lambda n: (order.get(n, len(order)), n))
    names += [n for n in ("experiment_manifest.json", "report.md") if n not in names]
    titles = {f"plots/{s.file}": s.title for s in PLOTS}
    notes = {**FILE_NOTES, **parts.file_notes()}
    out = ["| file | content |", "|---|---|"]
    for n in names:
        if n == "report.md" or (out_dir / n).is_file():
            out.append(f"| `{n}` | {notes.get(n) or (titles.get(n, 'plot') + ' (PNG)')} |")
    if (out_dir / CHECKPOINT_DIR).is_dir():
        out.append(f"| `{CHECKPOINT_DIR}/` | resume state: each seed's selections, every evaluated condition, the "
                   "super-weight search (`--resume OUT_DIR`) |")
    return out


def super_weights_section(out_dir: Path) -> list[str]:
    """Candidates with their ablation ratio and rank in each seed's Top-K, and the spike plot
    (``--detect-super-weights``)."""
    sw = read_json(out_dir, "super_weights.json")
    if sw is None:
        return []
    cands = sw.get("candidates") or []
    lines = ["", "## Super weights", "", f"Data-free detector (threshold {sw['settings']['threshold']:g}x the median "
             f"max |down-projection output|): {count_text(len(cands))} candidate(s); search stopped: {sw['stopped']}."]
    if (out_dir / "super_weights.png").is_file():
        lines += ["", "![super weights](super_weights.png)"]
    if not cands:
        return lines
    abl = sw.get("ablation") or {}
    each = abl.get("each") or [{}] * len(cands)
    per_seed = (sw.get("topk_overlap") or {}).get("per_seed", {})
    lines += ["", "| # | weight | value | spike | ppl ratio zeroed | Top-K rank per seed | feeds |",
              "|---|---|---|---|---|---|---|"]
    for i, (c, ev) in enumerate(zip(cands, each)):
        ranks = ", ".join(f"{seed}: {rows[i]['rank'] or '-'}" for seed, rows in per_seed.items()) or "-"
        where = f"{c['expert']}, {c['row']}, {c['col']}" if c.get("expert") is not None else f"{c['row']}, {c['col']}"
        lines.append(f"| {i + 1} | `{c['param']}`[{where}] | {c['weight']:.4g} | "
                     f"{c['output_ratio']:.0f}x | {ratio_text(ev['ratio']) if ev else '-'} | {ranks} | "
                     f"{feeds_text(c.get('feeds'))} |")
    if abl.get("all"):
        lines += ["", f"All {len(cands)} zeroed: perplexity {ratio_text(abl['all']['ratio'])}; as many random weights "
                      f"of the same matrices zeroed: {ratio_text(abl['random']['ratio'])} (baseline "
                      f"{sci(abl['baseline']['ppl'])} on {abl['windows']} windows)."]
    return lines


def build_report(out_dir: Path) -> str:
    out_dir = Path(out_dir)
    cfg = read_json(out_dir, "config.json")
    if cfg is None:
        raise FileNotFoundError(f"{out_dir}/config.json is missing: not an ESA out-dir")
    pert = read_json(out_dir, "perturbation_results.json")
    stab = read_json(out_dir, "stability_summary.json")
    manifest = read_json(out_dir, "experiment_manifest.json")
    c = cfg["config"]
    lines = [f"# ESA report: `{c['model']}`, {c['metric']}, {c['mode']}, k = {c['topk']}", "",
             _question(cfg, pert), "", _configuration(cfg, pert, manifest), "", "## Summary", ""]
    if pert is not None:
        lines += summary.markdown_summary(pert, stab) + summary.markdown_sweep(pert)
        top = num(pert["conditions"]["top_k"]["ppl"])
        if math.isinf(top):
            lines += ["", "`inf` = the perturbed model's loss overflowed (perplexity infinite)."]
    elif (out_dir / quantization.RESULTS).is_file():
        lines += quantization.markdown_section(out_dir)[3:]  # under this Summary heading
    else:
        lines.append("No perturbation was run (no `--perturb`): scores and Top-K only.")
        if stab is not None:
            lines += [f"Top-K stability: mean Jaccard {stab['jaccard_mean']:.3f} over consecutive seed pairs."]
    lines += super_weights_section(out_dir)
    lines += parts.sections(out_dir)
    shown = [s for s in PLOTS if (out_dir / "plots" / s.file).is_file()]
    if shown:
        lines += ["", "## Plots"]
        for s in shown:
            reading = s.read(out_dir) or "(its data file is missing from this out-dir)"
            lines += ["", f"### {s.title}", "", f"![{s.title}](plots/{s.file})", "", reading]
    else:
        lines += ["", "(No score plots: run with `--save-plots`, or `python -m esa.report OUT_DIR --save-plots` "
                  "to draw them.)"]
    lines += ["", "## Files", ""] + file_list(out_dir, manifest)
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path) -> Path:
    """Write ``OUT_DIR/report.md`` atomically from the out-dir's files (a multi-metric run's combined
    report: :mod:`esa.reporting.metrics_report`; the folder of several perturbations:
    :mod:`esa.reporting.perturbations_report`); returns its path."""
    out_dir = Path(out_dir)
    dest = out_dir / "report.md"
    config = read_json(out_dir, "config.json")
    build = (metrics_report.build_report if metrics_report.is_multi(config)
             else perturbations_report.build_report if perturbations_report.is_multi(config) else build_report)
    atomic_write_text(dest, build(out_dir))
    return dest
