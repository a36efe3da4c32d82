"""``summary.md`` of esa-compare: per group of runs on the same evaluation data, per model, each metric
and perturbation's Top-K against its controls at ``--topk`` (mean ± sample std over seeds, Welch
p-values from :func:`esa.analysis.significance.top_vs_controls`), computed from the table's rows."""

from __future__ import annotations

from pathlib import Path

from esa.analysis import significance
from esa.compare.table import Run
from esa.reporting.format import ratio_text, sci
from esa.reporting.summary import markdown


def _pm(values: list[float], ratio: bool) -> str:
    d = significance.describe(values)
    mean = ratio_text(d["mean"]) if ratio else sci(d["mean"])
    return mean if d["std"] is None or len(values) < 2 else f"{mean} ± {sci(d['std'])}"


def _block(rows: list[dict]) -> list[str]:
    """One run × metric × perturbation at its --topk: a table of conditions and the tests."""
    per_seed: dict[str, dict] = {}
    for r in rows:
        per_seed.setdefault(str(r["seed"]), {})[r["condition"]] = r
    conds = list(next(iter(per_seed.values())))
    tests = significance.top_vs_controls(per_seed) if len(per_seed) >= 2 else {}
    head = ["condition", "ratio mean ± std", "ΔPPL mean ± std", "p (log ratio, vs top_k)", "p (ΔPPL, vs top_k)"]
    table = []
    for c in conds:
        vals = [per_seed[s][c] for s in per_seed if c in per_seed[s]]
        t = tests.get(f"top_k_vs_{c}")
        table.append([f"**{c}**" if c == "top_k" else c, _pm([v["ratio"] for v in vals], True),
                      _pm([v["delta_ppl"] for v in vals], False),
                      sci(t["log_ratio"]["p_value"]) if t else "–", sci(t["p_value"]) if t else "–"])
    return markdown((head, table))


def _why_apart(runs: list[Run]) -> list[str]:
    """Why the groups are apart: each group's data fingerprint, source and windows."""
    lines = ["The runs were evaluated on different data, so their numbers are not comparable: they are reported in "
             "separate groups, with separate figures (`*_group<N>.png`). A group holds runs with the same data "
             "source, number and length of evaluation windows and BOS policy, and runs of one model in a group "
             "have the same `data` fingerprint in config.json (the very same token windows):", ""]
    for g in sorted({r.group for r in runs}):
        mine = [r for r in runs if r.group == g]
        d = mine[0].config["data"]
        prints = ", ".join(dict.fromkeys(f"`{r.fingerprint[:12]}`" for r in mine))
        lines.append(f"- group {g}: {d['data_source']}, {d['eval_windows']} evaluation windows of "
                     f"{d['window_tokens']} tokens, BOS {d.get('bos_policy')}, data fingerprint(s) {prints}: "
                     + ", ".join(f"`{r.path}`" for r in mine))
    return lines


def build_summary(runs: list[Run], table: list[dict]) -> str:
    lines = ["# esa-compare summary", "", f"{len(runs)} runs: " + ", ".join(f"`{r.path}`" for r in runs) + ".",
             "Ratio = perplexity ÷ the run's unperturbed baseline; mean ± sample std over seeds; p: Welch two-sided "
             "t-test of the Top-K against each control over seeds (on log ratio, and on ΔPPL).", ""]
    unfinished = [r for r in runs if r.status != "success"]
    if unfinished:
        lines += ["Unfinished runs (--include-unfinished; what they hold so far): "
                  + ", ".join(f"`{r.path}` ({r.status})" for r in unfinished), ""]
    groups = sorted({r.group for r in runs})
    if len(groups) > 1:
        lines += _why_apart(runs) + [""]
    for g in groups:
        if len(groups) > 1:
            lines += [f"## Group {g}", ""]
        main = [r for r in table if r["group"] == g and r["k"] == r["main_k"]]
        for model in dict.fromkeys(r["model"] for r in main):
            mine = [r for r in main if r["model"] == model]
            lines += [f"{'###' if len(groups) > 1 else '##'} {model} ({mine[0]['parameters']:,} parameters, "
                      f"{mine[0]['dtype']})", ""]
            for key in dict.fromkeys((r["run"], r["metric"], r["perturbation"]) for r in mine):
                rows = [r for r in mine if (r["run"], r["metric"], r["perturbation"]) == key]
                lines += [f"**{key[1]}**, {key[2]} (k = {rows[0]['k']}, {rows[0]['mode']}, "
                          f"seeds {', '.join(sorted({str(r['seed']) for r in rows}))}; run `{key[0]}`)", "",
                          *_block(rows), ""]
    return "\n".join(lines)


def write_summary(runs: list[Run], table: list[dict], out: Path) -> Path:
    from esa.outdir.atomic import atomic_write_text

    return atomic_write_text(out / "summary.md", build_summary(runs, table))
