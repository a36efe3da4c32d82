"""Zero-shot task accuracy (the ``tasks`` evaluator) in report.md, on the console and in
``task_accuracy.png``, from ``task_results.json`` only.

The table is condition × task: ``acc`` (and ``acc_norm`` where the task defines it), mean ± sample
std over seeds where there are several, with each task's chance level; the Welch tests of the
experiments' compared conditions follow.  A task scored on another split than the one lm-eval
evaluates (a local copy without ARC's test split) is said loudly, above the table and on the console.
"""

from __future__ import annotations

from pathlib import Path

from esa.outdir.readers import read_json
from esa.reporting import summary
from esa.reporting.format import sci
from esa.reporting.parts import Part, register
from esa.reporting.plotkit import COND_COLORS, plt, save

RESULTS = "task_results.json"
PLOT = "task_accuracy.png"


def conditions(res: dict) -> list[tuple[str, dict[str, dict]]]:
    """``(label, {task: {metric: (mean, std or None)}})`` for the baseline and every condition, in the
    order measured (mean ± std over seeds where the experiment has several)."""
    out = [("baseline", {t: {m: (v, None) for m, v in rec.items() if m in ("acc", "acc_norm")}
                         for t, rec in res["baseline"].items()})]
    for exp, block in res["experiments"].items():
        first = next(iter(block["per_seed"].values()))
        for group, conds in first.items():
            for cond, tasks in conds.items():
                label = cond + (f", {block['group_by']} = {group}" if block["group_by"] else "")
                stats = (block.get("summary") or {}).get(group, {}).get(cond)
                cells = {}
                for task, rec in tasks.items():
                    cells[task] = {m: ((stats[task][m]["mean"], stats[task][m]["std"]) if stats else (rec[m], None))
                                   for m in ("acc", "acc_norm") if m in rec and (not stats or m in stats[task])}
                out.append((label if len(res["experiments"]) == 1 else f"{exp}: {label}", cells))
    return out


def _pm(cell: tuple[float, float | None] | None) -> str:
    if cell is None or cell[0] is None:
        return "–"
    return f"{cell[0]:.3f}" + ("" if cell[1] is None else f" ± {cell[1]:.3f}")


def table(res: dict) -> summary.Table:
    """Condition × task: acc (/ acc_norm), then the chance row."""
    tasks = list(res["tasks"])
    head = ["condition"] + [f"{t} acc" + (" / acc_norm" if "acc_norm" in res["baseline"].get(t, {}) else "")
                            for t in tasks]
    rows = []
    for label, cells in conditions(res):
        row = [f"**{label}**" if label.startswith("top_k") else label]
        for t in tasks:
            c = cells.get(t, {})
            row.append(_pm(c.get("acc")) + (f" / {_pm(c.get('acc_norm'))}" if "acc_norm" in c else ""))
        rows.append(row)
    rows.append(["chance"] + [sci(res["tasks"][t]["chance"], 3) if res["tasks"][t]["chance"] is not None else "–"
                              for t in tasks])
    return head, rows


def tests_table(res: dict) -> summary.Table | None:
    """Welch's test on acc over seeds of each compared pair: p-value (Cohen's d) per task."""
    tasks = list(res["tasks"])
    rows = []
    for exp, block in res["experiments"].items():
        for group, pairs in (block.get("tests") or {}).items():
            for pair, by_task in pairs.items():
                where = f"{exp}, {block['group_by']} = {group}" if block["group_by"] else exp
                cells = []
                for t in tasks:
                    test = by_task.get(t, {}).get("acc")
                    cells.append("–" if not test else f"{sci(test.get('p_value'))} (d {sci(test.get('cohens_d'))})")
                rows.append([f"{pair.replace('_vs_', ' vs ')} ({where})", *cells])
    return (["Welch test on acc: p (Cohen's d)", *tasks], rows) if rows else None


def split_notes(res: dict) -> list[str]:
    """One sentence per task scored on another split than lm-eval's own."""
    return [f"{t} is scored on its {f['split']} split: lm-eval evaluates {f['registered_split']}, which the task "
            f"data ({f['data']}) lacks; not comparable with published {f['registered_split']}-split numbers."
            for t, f in res["tasks"].items() if f.get("registered_split") not in (None, f["split"])]


def caption(res: dict) -> str:
    s = res["settings"]
    items = ", ".join(f"{t} {res['baseline'][t]['items']} of {f['docs']} ({f['split']})"
                      for t, f in res["tasks"].items() if t in res["baseline"])
    seeds = {len(b["seeds"]) for b in res["experiments"].values()}
    return (f"lm-eval {res['lm_eval']}, {res['protocol']}. Items: {items}; batch {s['batch_size']}; data "
            f"{s['data']}" + ("; mean ± sample std over seeds" if max(seeds, default=1) > 1 else ""))


def markdown_section(out_dir: Path) -> list[str]:
    res = read_json(out_dir, RESULTS)
    if res is None:
        return []
    lines = ["", "## Zero-shot tasks", "", caption(res) + ":", ""]
    lines += [f"**Split.** {n}" for n in split_notes(res)] + ([""] if split_notes(res) else [])
    lines += summary.markdown(table(res))
    if (tests := tests_table(res)) is not None:
        lines += ["", *summary.markdown(tests)]
    if (out_dir / PLOT).is_file():
        lines += ["", f"![zero-shot task accuracy]({PLOT})"]
    return lines


def console_lines(out_dir: Path) -> list[str]:
    """One line per task: its accuracy for the baseline and every condition, and its chance level."""
    res = read_json(out_dir, RESULTS)
    if res is None:
        return []
    conds = conditions(res)
    lines = [f"Zero-shot tasks (lm-eval {res['lm_eval']}, acc; first {res['settings']['limit'] or 'all'} items; "
             f"data {res['settings']['data']}):"]
    for t, f in res["tasks"].items():
        split = f"{f['split']} split" + (f", NOT lm-eval's {f['registered_split']}"
                                         if f.get("registered_split") not in (None, f["split"]) else "")
        values = "; ".join(f"{label} {_pm(cells.get(t, {}).get('acc'))}" for label, cells in conds)
        chance = "–" if f["chance"] is None else f"{f['chance']:.3f}"
        lines.append(f"  {t} [{split}]: {values}; chance {chance}")
    return lines


def plot(out_dir: Path) -> Path | None:
    """Grouped bars: per condition one bar per task (acc; mean over seeds, error bar = std), each
    task's chance level as a dashed line in its colour."""
    res = read_json(out_dir, RESULTS)
    if res is None:
        return None
    tasks, conds = list(res["tasks"]), conditions(res)
    width = 0.8 / max(1, len(tasks))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(conds) * max(1, len(tasks)) * 0.45), 4.8))
    for j, t in enumerate(tasks):
        color = f"C{j}"
        xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(conds))]
        cells = [cells.get(t, {}).get("acc") or (float("nan"), None) for _, cells in conds]
        ax.bar(xs, [c[0] for c in cells], width, color=color, label=t,
               yerr=[c[1] or 0.0 for c in cells], capsize=2)
        if res["tasks"][t]["chance"] is not None:
            ax.axhline(res["tasks"][t]["chance"], color=color, ls="--", lw=1, alpha=0.8)
    ax.set_xticks(range(len(conds)), [label for label, _ in conds], rotation=30, ha="right", fontsize=8)
    for tick, (label, _) in zip(ax.get_xticklabels(), conds):
        tick.set_color(COND_COLORS.get(label.split(",")[0], "black"))
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (acc); dashed = chance level of the task in its colour")
    ax.set_title(f"Zero-shot accuracy per condition (lm-eval {res['lm_eval']}, first "
                 f"{res['settings']['limit'] or 'all'} items per task)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(tasks)))
    return save(fig, out_dir / PLOT)


register(Part(RESULTS, figure=plot, section=markdown_section, console=console_lines, notes=(
    (RESULTS, "zero-shot lm-eval tasks (--eval-tasks): each task's split, chance level and config hash; the "
              "baseline's and every condition's acc and acc_norm per seed; mean ± std and Welch tests over seeds"),
    (PLOT, "zero-shot task accuracy per condition, chance levels dashed (PNG)"))))
