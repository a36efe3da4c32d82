"""The summary table of a run, built once and shown twice: as Markdown in report.md and as aligned
text on the console at the end of a run.

:func:`condition_table` and :func:`sweep_rows` turn ``perturbation_results.json`` into a header and
rows of formatted cells (one set of number formatters, :mod:`esa.reporting.format`); the
renderers only lay them out.
"""

from __future__ import annotations

from pathlib import Path

from esa.reporting.format import prune_levels, ratio_text, sci

Table = tuple[list[str], list[list[str]]]


def _pm(block: dict | None, ratio: bool = False) -> str:
    """"mean ± std" of a summary block; a ratio near 1 keeps 4 decimals (×1.0002 ± 3.1e-4)."""
    if not block:
        return "–"
    mean = ratio_text(block["mean"]) if ratio else sci(block["mean"])
    return mean if block.get("std") is None else f"{mean} ± {sci(block['std'])}"


def condition_table(pert: dict) -> Table:
    """Baseline and each condition of the primary seed; with >= 2 seeds, mean ± std and the tests."""
    multi = "summary" in pert
    head = ["condition", "perturbed", "changed", "PPL", "ΔPPL", "ratio"]
    if multi:
        head += ["ΔPPL mean ± std", "ratio mean ± std", "p (ΔPPL)", "p (log ratio)", "Cohen's d"]
    rows = [["baseline", "–", "–", sci(pert["baseline"]["ppl"], 4), "–", "1"] + (["–"] * 5 if multi else [])]
    for name, c in pert["conditions"].items():
        row = [f"**{name}**" if name == "top_k" else name, str(c["n_perturbed"]), str(c["n_changed"]),
               sci(c["ppl"], 4), sci(c["delta_ppl"]), ratio_text(c["ratio"])]
        if multi:
            s = pert["summary"].get(name, {})
            t = pert["tests"].get(f"top_k_vs_{name}")
            row += [_pm(s.get("delta_ppl")), _pm(s.get("ratio"), ratio=True)]
            row += [sci(t.get("p_value")), sci(t["log_ratio"].get("p_value")), sci(t.get("cohens_d"))] if t else \
                ["–", "–", "–"]
        rows.append(row)
    return head, rows


def sweep_rows(pert: dict) -> Table | None:
    """Dose–response: per k, each condition's ΔPPL mean ± std over seeds and the mean ratio."""
    sw = pert.get("sweep")
    if not sw:
        return None
    conds = list(sw["conditions"])
    rows = []
    for i, k in enumerate(sw["k"]):
        cells = []
        for c in conds:
            b = sw["conditions"][c]
            std = b["delta_ppl_std"][i]
            m = sci(b["delta_ppl_mean"][i]) + (f" ± {sci(std)}" if std is not None else "")
            cells.append(f"{m} ({ratio_text(b['ratio_mean'][i])})")
        rows.append([f"{k}{' (main)' if k == sw.get('main_k') else ''}"] + cells)
    return ["k", *conds], rows


def markdown(table: Table) -> list[str]:
    head, rows = table
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def text(table: Table) -> list[str]:
    """Aligned plain-text columns (Markdown emphasis and code marks dropped)."""
    head, rows = table
    cells = [head] + [[c.replace("**", "").replace("`", "") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]


def _caption(pert: dict) -> str:
    multi = "summary" in pert
    return f"Primary seed {pert['seed']}" + (f"; mean ± sample std over {len(pert['seeds'])} seeds, Welch "
                                            "t-tests of top_k vs each control" if multi else "") + ":"


WHICH_P = ("Which p to read: p (log ratio), Welch's t-test on log(PPL / baseline), the scale on which perplexity "
           "effects multiply. ΔPPL is heavy-tailed across seeds (a Top-K that multiplies perplexity by 10^5 on one "
           "seed and 10^3 on another has a huge ΔPPL variance), so p (ΔPPL) is weak; it is kept for reference.")


def _which_p(pert: dict) -> list[str]:
    """The one sentence that says which of the two p-value columns answers the question (with tests only)."""
    return [WHICH_P] if pert.get("tests") else []


def _no_op_notes(pert: dict) -> list[str]:
    return [f"Note: only {c['n_changed']} of the {c['n_perturbed']} {name} weights changed value (the others are "
            f"exactly 0, which `{pert['perturb']}` leaves unchanged), so {name} is not a real control at this k."
            for name, c in pert["conditions"].items() if c["n_changed"] < c["n_perturbed"]]


def control_notes(pert: dict) -> list[str]:
    """What the controls could not do: a control skipped for this metric (with why), and random_mag_k's
    |w| match to the Top-K per seed (control ÷ Top-K at each quantile) with the warning when it is off."""
    notes = []
    for name, block in (pert.get("controls") or {}).items():
        if block.get("skipped"):
            notes.append(f"Note: {name} was {block['reason']}.")
        mq = block.get("match_quality")
        if mq:
            at = "/".join(f"{100 * q:g}" for q in mq["quantiles"])
            per = "; ".join(f"seed {s} " + " / ".join("–" if r is None else f"{r:.3f}" for r in q["ratio"])
                            for s, q in mq["per_seed"].items())
            notes.append(f"Note: {name}'s |w| ÷ the Top-K's |w| at the {at} % quantiles: {per} (matched within "
                         f"{100 * mq['tolerance']:g} % when every ratio is within 1 ± {mq['tolerance']:g}).")
            if mq.get("warning"):
                notes.append(f"Warning: {mq['warning']}.")
    return notes


def _stability_line(stab: dict) -> str:
    return (f"Top-K stability: mean Jaccard {stab['jaccard_mean']:.3f} ± {stab['jaccard_std']:.3f} over "
            f"consecutive seed pairs ({', '.join(f'{j:.3f}' for j in stab['jaccard_all'])}).")


def _sweep_caption(pert: dict) -> str:
    n = len(next(iter(pert["sweep"]["conditions"].values()))["per_seed"])
    return f"Dose–response (ΔPPL, mean ± std over {n} seed{'s' if n > 1 else ''}; ratio = mean PPL ÷ baseline):"


def markdown_summary(pert: dict, stab: dict | None) -> list[str]:
    """report.md's summary: caption, table, no-op control notes, stability."""
    lines = [_caption(pert), "", *markdown(condition_table(pert))]
    for note in _which_p(pert) + _no_op_notes(pert) + control_notes(pert):
        lines += ["", note]
    if stab is not None:
        lines += ["", _stability_line(stab)]
    return lines


def markdown_sweep(pert: dict) -> list[str]:
    table = sweep_rows(pert)
    return [] if table is None else ["", _sweep_caption(pert), "", *markdown(table)]


def console_summary(config: dict, pert: dict | None, stab: dict | None, top_rows: list[list],
                    coverage: dict | None = None) -> str:
    """The end-of-run text: the same tables as report.md, then the top weights of the primary seed.

    ``config``: the run's resolved configuration (``RunConfig.to_json()``); ``top_rows``: rows of
    top_weights.csv (rank, parameter, index, coords, score, seed).
    """
    c = config
    change = f"quantize={c['quantize']} {c['bits']}-bit" if c.get("quantize") else f"perturb={c['perturb'] or 'none'}"
    if prune_levels(c):
        change += f"  prune={','.join(prune_levels(c))}"
    lines = [f"ESA summary  model={c['model']}  metric={c['metric']}  mode={c['mode']}  k={c['topk']}  "
             f"seeds={','.join(map(str, c['seeds']))}  {change}"]
    if coverage:
        lines.append(f"scored {coverage['scored_weights']:,} of the model's {coverage['matrix_weights']:,} matrix "
                     f"weights ({100 * coverage['scored_share_of_matrix_weights']:.1f} %); not scored: "
                     f"{len(coverage['excluded'])} tensor(s), listed in config.json")
    if pert is not None:
        lines += [_caption(pert), *text(condition_table(pert)), *_which_p(pert), *_no_op_notes(pert),
                  *control_notes(pert)]
        sweep = sweep_rows(pert)
        if sweep is not None:
            lines += [_sweep_caption(pert), *text(sweep)]
    elif not (c.get("quantize") or prune_levels(c)):  # those print their own tables
        lines.append("(no --perturb given: scores and Top-K only)")
    if stab is not None:
        lines.append(_stability_line(stab))
    lines.append(f"top-{len(top_rows)} weights (primary seed):")
    lines += text((["rank", "parameter", "coords", "score"],
                   [[str(row[0]), row[1], f"({row[3]})", row[4]] for row in top_rows]))
    return "\n".join(lines)


def files_footer(out_dir: Path, plot_paths: list[Path]) -> str:
    """The last lines of a run: where the report and each picture are, so a new user opens them
    instead of reading JSON."""
    lines = [f"outputs: {out_dir}", f"  report: {out_dir / 'report.md'}"]
    lines += [f"  plot:   {p}" for p in plot_paths]
    if not plot_paths:
        lines.append("  (no plots: add --save-plots, or run: python -m esa.report OUT_DIR --save-plots)")
    return "\n".join(lines)
