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

from esa.outputs import atomic_write_text
from esa.plotkit import count_text, num, ratio_text, read_json, sci, verb
from esa.plots import PLOTS

FILE_NOTES = {
    "config.json": "resolved configuration, device, library versions, targets, data source, seed semantics",
    "experiment_manifest.json": "status, timings per phase, peak memory, file list",
    "top_weights.csv": "the Top-K of every seed: rank, parameter, flat index, coordinates, score",
    "sensitivity_stats.json": "per-tensor score statistics of the primary seed (quantiles, top shares)",
    "score_distribution.npz": "exact top scores and a weighted sample of all scores per module type (primary seed)",
    "perturbation_results.json": "baseline and every condition's perplexity, per seed, summary, tests, sweep",
    "stability_summary.json": "Jaccard overlap of the Top-K across seeds",
    "report.md": "this report",
    "super_weights.json": "super-weight candidates (data-free detector), every search pass, ablation, Top-K overlap",
    "super_weights.txt": "the super-weight table as printed",
    "super_weights.png": "max |down-projection input| and |output| per layer, spikes marked (PNG)",
}


def _question(cfg: dict, pert: dict | None) -> str:
    c = cfg["config"]
    sel = f"{c['topk']} weights per tensor" if c["mode"] == "per_layer" else f"{c['topk']} weights"
    controls = " or ".join(f"`{x}`" for x in c["controls"]) or "no control"
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
    perturb = (f"{c['perturb']} (scale {c['perturb_scale']}, prob {c['perturb_prob']})" if c.get("perturb")
               else "none")
    status = f"; run {manifest['status']} in {manifest.get('wall_time_s', 0):.0f} s" if manifest else ""
    return (f"**Configuration.** {count_text(cfg['targets']['weights'])} weights in {cfg['targets']['count']} "
            f"target tensors; {c['mode']} Top-K; data {d['data_source']}: {c['max_samples']} calibration windows "
            f"per seed, {d['eval_windows']} evaluation windows of {d['window_tokens']} tokens; seeds {seeds} "
            f"(primary {seeds.split(',')[0]}); perturbation {perturb}; {r['device']} {r['dtype']}{status}.")


def _pm(block: dict | None, ratio: bool = False) -> str:
    """"mean ± std" of a summary block; a ratio near 1 keeps 4 decimals (×1.0002 ± 3.1e-4)."""
    if not block:
        return "–"
    mean = ratio_text(block["mean"]) if ratio else sci(block["mean"])
    return mean if block.get("std") is None else f"{mean} ± {sci(block['std'])}"


def summary_table(pert: dict, stab: dict | None) -> list[str]:
    """Markdown lines: baseline and each condition (primary seed), with >= 2 seeds mean ± std and tests."""
    multi = "summary" in pert
    head = ["condition", "perturbed", "changed", "PPL", "ΔPPL", "ratio"]
    if multi:
        head += ["ΔPPL mean ± std", "ratio mean ± std", "p (ΔPPL)", "p (log ratio)", "Cohen's d"]
    lines = [f"Primary seed {pert['seed']}" + (f"; mean ± sample std over {len(pert['seeds'])} seeds, Welch "
             "t-tests of top_k vs each control" if multi else "") + ":", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = ["baseline", "–", "–", sci(pert["baseline"]["ppl"], 4), "–", "1"] + (["–"] * 5 if multi else [])
    lines.append("| " + " | ".join(base) + " |")
    for name, c in pert["conditions"].items():
        row = [f"**{name}**" if name == "top_k" else name, str(c["n_perturbed"]), str(c["n_changed"]),
               sci(c["ppl"], 4), sci(c["delta_ppl"]), ratio_text(c["ratio"])]
        if multi:
            s = pert["summary"].get(name, {})
            t = pert["tests"].get(f"top_k_vs_{name}")
            row += [_pm(s.get("delta_ppl")), _pm(s.get("ratio"), ratio=True)]
            row += [sci(t.get("p_value")), sci(t["log_ratio"].get("p_value")), sci(t.get("cohens_d"))] if t else \
                ["–", "–", "–"]
        lines.append("| " + " | ".join(row) + " |")
    for name, c in pert["conditions"].items():
        if c["n_changed"] < c["n_perturbed"]:
            lines += ["", f"Note: only {c['n_changed']} of the {c['n_perturbed']} {name} weights changed value "
                      f"(the others are exactly 0, which `{pert['perturb']}` leaves unchanged), so {name} is "
                      "not a real control at this k."]
    if stab is not None:
        lines += ["", f"Top-K stability: mean Jaccard {stab['jaccard_mean']:.3f} ± {stab['jaccard_std']:.3f} over "
                  f"consecutive seed pairs ({', '.join(f'{j:.3f}' for j in stab['jaccard_all'])})."]
    return lines


def sweep_table(pert: dict) -> list[str]:
    sw = pert.get("sweep")
    if not sw:
        return []
    conds = list(sw["conditions"])
    n = len(next(iter(sw["conditions"].values()))["per_seed"])
    lines = ["", f"Dose–response (ΔPPL, mean ± std over {n} seed{'s' if n > 1 else ''}; ratio = mean PPL ÷ baseline):",
             "", "| k | " + " | ".join(conds) + " |", "|---|" + "---|" * len(conds)]
    for i, k in enumerate(sw["k"]):
        cells = []
        for c in conds:
            b = sw["conditions"][c]
            std = b["delta_ppl_std"][i]
            m = sci(b["delta_ppl_mean"][i]) + (f" ± {sci(std)}" if std is not None else "")
            cells.append(f"{m} ({ratio_text(b['ratio_mean'][i])})")
        lines.append(f"| {k}{' (main)' if k == sw.get('main_k') else ''} | " + " | ".join(cells) + " |")
    return lines


def file_list(out_dir: Path, manifest: dict | None) -> list[str]:
    """Every file of the out-dir (manifest order first, then anything else found, e.g. re-made plots)."""
    names = list((manifest or {}).get("files", []))
    found = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out_dir).parts))
    order = {f"plots/{s.file}": i for i, s in enumerate(PLOTS)}
    names += sorted((n for n in found if n not in names), key=lambda n: (order.get(n, len(order)), n))
    names += [n for n in ("experiment_manifest.json", "report.md") if n not in names]
    titles = {f"plots/{s.file}": s.title for s in PLOTS}
    out = ["| file | content |", "|---|---|"]
    for n in names:
        if n == "report.md" or (out_dir / n).is_file():
            out.append(f"| `{n}` | {FILE_NOTES.get(n) or (titles.get(n, 'plot') + ' (PNG)')} |")
    return out


def super_weights_section(sw: dict | None) -> list[str]:
    """Candidates with their ablation ratio and rank in each seed's Top-K (``--detect-super-weights``)."""
    if sw is None:
        return []
    cands = sw.get("candidates") or []
    lines = ["", "## Super weights", "", f"Data-free detector (threshold {sw['settings']['threshold']:g}x the median "
             f"max |down-projection output|): {count_text(len(cands))} candidate(s); search stopped: {sw['stopped']}."]
    if not cands:
        return lines
    abl = sw.get("ablation") or {}
    each = abl.get("each") or [{}] * len(cands)
    per_seed = (sw.get("topk_overlap") or {}).get("per_seed", {})
    lines += ["", "| # | weight | value | spike | ppl ratio zeroed | Top-K rank per seed |",
              "|---|---|---|---|---|---|"]
    for i, (c, ev) in enumerate(zip(cands, each)):
        ranks = ", ".join(f"{seed}: {rows[i]['rank'] or '-'}" for seed, rows in per_seed.items()) or "-"
        lines.append(f"| {i + 1} | `{c['param']}`[{c['row']}, {c['col']}] | {c['weight']:.4g} | "
                     f"{c['output_ratio']:.0f}x | {ratio_text(ev['ratio']) if ev else '-'} | {ranks} |")
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
        lines += summary_table(pert, stab) + sweep_table(pert)
        top = num(pert["conditions"]["top_k"]["ppl"])
        if math.isinf(top):
            lines += ["", "`inf` = the perturbed model's loss overflowed (perplexity infinite)."]
    else:
        lines.append("No perturbation was run (no `--perturb`): scores and Top-K only.")
        if stab is not None:
            lines += [f"Top-K stability: mean Jaccard {stab['jaccard_mean']:.3f}."]
    lines += super_weights_section(read_json(out_dir, "super_weights.json"))
    shown = [s for s in PLOTS if (out_dir / "plots" / s.file).is_file()]
    if shown:
        lines += ["", "## Plots"]
        for s in shown:
            reading = s.read(out_dir) or "(its data file is missing from this out-dir)"
            lines += ["", f"### {s.title}", "", f"![{s.title}](plots/{s.file})", "", reading]
    else:
        lines += ["", "(No plots: run with `--save-plots`, or `python -m esa.report OUT_DIR` to draw them.)"]
    lines += ["", "## Files", ""] + file_list(out_dir, manifest)
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path) -> Path:
    """Write ``OUT_DIR/report.md`` atomically from the out-dir's files; returns its path."""
    out_dir = Path(out_dir)
    dest = out_dir / "report.md"
    atomic_write_text(dest, build_report(out_dir))
    return dest
