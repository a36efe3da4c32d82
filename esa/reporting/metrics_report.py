"""A multi-metric run (``--metric a,b,c``): its report.md, console summary and agreement heatmap.

Built only from the out-dir: the top-level ``config.json`` and ``metric_agreement.json``, and each
metric's own folder ``metrics/<name>/`` (a complete single-metric out-dir: its
``perturbation_results.json``, ``super_weights.json`` and report.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from esa.outdir.layout import METRICS_DIR
from esa.outdir.readers import leaf_dirs, read_json, read_top_rows
from esa.reporting import pruning, summary
from esa.reporting.format import ratio_text, run_text, sci
from esa.reporting.plotkit import plt, save

HEATMAP = "metric_agreement.png"


def is_multi(config: dict | None) -> bool:
    return len((config or {}).get("config", {}).get("metrics") or []) > 1


def metric_dirs(out_dir: Path, config: dict) -> dict[str, Path]:
    return {m: out_dir / METRICS_DIR / m for m in config["config"]["metrics"]}


def result_dirs(out_dir: Path, config: dict) -> dict[str, Path]:
    """Each metric's folder holding its results files: the first perturbation's with several (its
    Top-K, statistics and super weights are every perturbation's)."""
    out: dict[str, Path] = {}
    for (m, _), folder in leaf_dirs(out_dir, config["config"]).items():
        out.setdefault(m, folder)
    return out


def labelled_leaves(out_dir: Path, config: dict) -> dict[str, Path]:
    """Each single-metric, single-perturbation folder by its table label: `metric`, `perturbation` or
    `metric` / `perturbation` (whichever the run has several of)."""
    c = config["config"]
    several = len(c.get("metrics") or []) > 1
    return {" / ".join(f"`{x}`" for x in ((m,) if several else ()) + ((p,) if p else ()) or (m,)): folder
            for (m, p), folder in leaf_dirs(out_dir, c).items()}


def _ratio_cell(pert: dict, cond: str) -> str:
    """The condition's perplexity ratio to baseline: mean ± std over seeds (the one seed's ratio alone)."""
    s = (pert.get("summary") or {}).get(cond, {}).get("ratio")
    if s:
        return ratio_text(s["mean"]) + ("" if s.get("std") is None else f" ± {sci(s['std'])}")
    c = pert["conditions"].get(cond)
    if c is None and (pert.get("controls") or {}).get(cond, {}).get("skipped"):
        return "skipped"
    return ratio_text(c["ratio"]) if c else "–"


def condition_matrix(out_dir: Path, config: dict, what: str = "metric") -> summary.Table | None:
    """metric (or perturbation, ``what``) × condition → perplexity ratio (perturbed ÷ baseline), and top_k
    vs random_k's p-value."""
    perts = {m: read_json(d, "perturbation_results.json") for m, d in labelled_leaves(out_dir, config).items()}
    if any(p is None for p in perts.values()):
        return None
    # every metric's conditions, in order: a control skipped for one metric (random_mag_k under magnitude) is
    # still a column of the others
    conds = list(dict.fromkeys(c for p in perts.values() for c in p["conditions"]))
    head = [what, *conds]
    several = "tests" in next(iter(perts.values()))
    if several:
        head.append("p (top_k vs random_k, log ratio)")
    rows = []
    for m, p in perts.items():
        row = [m, *(_ratio_cell(p, c) for c in conds)]
        if several:
            t = p["tests"].get("top_k_vs_random_k")
            row.append(sci(t["log_ratio"].get("p_value")) if t else "–")
        rows.append(row)
    return head, rows


def quantization_matrix(out_dir: Path, config: dict) -> summary.Table | None:
    """metric × block size → perplexity ratio with its Top-K protected (and with as many random weights)."""
    res = {m: read_json(d, "quantization_results.json") for m, d in result_dirs(out_dir, config).items()}
    if any(r is None for r in res.values()):
        return None
    blocks = next(iter(res.values()))["block_sizes"]
    rows = []
    for m, r in res.items():
        cells = []
        for b in blocks:
            s = (r.get("summary") or {}).get(b, {})
            first = next(iter(r["per_seed"].values()))[b]
            top, rnd = ((s.get(c, {}).get("ratio") or {}).get("mean", first[c]["ratio"])
                        for c in ("protect_topk", "protect_random_k"))
            cells.append(f"{ratio_text(top)} ({ratio_text(rnd)})")
        none = [ratio_text(next(iter(r["per_seed"].values()))[b]["none"]["ratio"]) for b in blocks]
        rows.append([f"`{m}`", *cells])
    rows.append(["none (plain RTN)", *none])
    return ["metric", *blocks], rows


UNION_SPEARMAN = "Spearman on the union of the Top-Ks"
READING = ("Spearman on the union of the Top-Ks: the rank correlation of the two metrics' scores over every weight "
           "in either Top-K. Each Top-K is chosen by its own metric, so when the two barely overlap (Jaccard near "
           "0) the union holds each metric's top weights, which the other metric scores low, and the value is "
           "negative: a negative value means the metrics disagree about which weights are extreme, not that their "
           "scores are anti-correlated over all weights. It is not what `scripts/compute_overlap.py` reports "
           "(Spearman on the shared weights: the correlation over the weights both Top-Ks hold).")


def _union(record: dict, key: str):
    """``spearman_on_union<key>`` of an agreement record (``spearman<key>`` in out-dirs written before
    it was named for what it ranks, which esa.report still reads)."""
    return record.get(f"spearman_on_union{key}", record.get(f"spearman{key}"))


def agreement_table(agreement: dict) -> summary.Table:
    rows = [[f"`{p['a']}` vs `{p['b']}`", f"{p['jaccard_mean']:.3f}",
             "–" if _union(p, "_mean") is None else f"{_union(p, '_mean'):+.3f}"] for p in agreement["pairs"]]
    return ["pair", "Jaccard of Top-Ks", UNION_SPEARMAN], rows


TOP_SHOWN = 5  # weights per metric in the combined report and summary (all of them: each top_weights.csv)


def top_weights(out_dir: Path, config: dict) -> summary.Table | None:
    """The primary seed's highest-scoring weights of each metric (rank, parameter, coordinates, score)."""
    rows = []
    for m, folder in result_dirs(out_dir, config).items():
        top = read_top_rows(folder)
        primary = [r for r in top if r["seed"] == top[0]["seed"]][:TOP_SHOWN] if top else []
        rows += [[f"`{m}`", r["rank"], f"`{r['parameter']}`", f"({r['coords']})", r["score"]] for r in primary]
    return (["metric", "rank", "parameter", "coords", "score"], rows) if rows else None


def super_weight_ranks(out_dir: Path, config: dict) -> summary.Table | None:
    """Where the detector's candidates rank in each metric's Top-K (per seed; '-' = not in it)."""
    sws = {m: read_json(d, "super_weights.json") for m, d in result_dirs(out_dir, config).items()}
    if any(s is None for s in sws.values()):
        return None
    cands = next(iter(sws.values()))["candidates"]
    if not cands:
        return None
    head = ["metric", *(f"{c['param'].removeprefix('model.')}[{c['row']}, {c['col']}]" for c in cands)]
    rows = []
    for m, sw in sws.items():
        per_seed = sw["topk_overlap"]["per_seed"]
        rows.append([f"`{m}`", *(", ".join(str(rs[i]["rank"] or "-") for rs in per_seed.values())
                                  for i in range(len(cands)))])
    return head, rows


def agreement_heatmap(out_dir: Path) -> Path | None:
    """``metric_agreement.png``: Jaccard and Spearman matrices side by side (mean over seeds)."""
    ag = read_json(out_dir, "metric_agreement.json")
    if ag is None:
        return None
    names = ag["metrics"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.3 * len(names), 2.5 + 0.55 * len(names)))
    for ax, matrix, title, lo in ((axes[0], ag["jaccard_matrix"], "Jaccard of the Top-K sets", 0.0),
                                  (axes[1], _union(ag, "_matrix"), UNION_SPEARMAN, -1.0)):
        m = [[float("nan") if v is None else v for v in row] for row in matrix]
        im = ax.imshow(m, vmin=lo, vmax=1.0, cmap="viridis")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, "–" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v == v and v < lo + 0.6 * (1 - lo) else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [])  # the same rows: labelled once
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Do the metrics agree? {ag['mode']}, k = {ag['k']}, mean over seeds {ag['seeds']}", fontsize=10)
    return save(fig, out_dir / HEATMAP)


def figures(out_dir: Path) -> list[Path]:
    """The run's own pictures: the agreement heatmap and (with --prune) every metric's pruning curve."""
    config = read_json(out_dir, "config.json")
    drawn = [agreement_heatmap(out_dir), pruning.multi_figure(out_dir, config) if config else None]
    return [p for p in drawn if p is not None]


class Section(NamedTuple):
    """One part of the combined report: a heading, the table's caption, the table and what to know to
    read it (``note``, printed after the table)."""

    heading: str
    caption: str
    table: summary.Table
    note: str = ""


def markdown_sections(secs: list[Section]) -> list[str]:
    """The report.md lines of ``secs``: each a heading, its caption, its table and its note."""
    lines: list[str] = []
    for s in secs:
        lines += ["", f"## {s.heading}", "", s.caption[0].upper() + s.caption[1:] + ":", "", *summary.markdown(s.table)]
        lines += ["", s.note] if s.note else []
    return lines


def console_sections(secs: list[Section]) -> list[str]:
    """The console summary lines of ``secs``."""
    return [line for s in secs for line in (f"{s.heading} ({s.caption}):", *summary.text(s.table),
                                            *([s.note] if s.note else []))]


def ratio_section(out_dir: Path, config: dict, what: str) -> list[Section]:
    """The ``what`` (metric or perturbation) × condition table of perplexity ratios, if the run measured them."""
    table = condition_matrix(out_dir, config, what)
    if table is None:
        return []
    notes = dict.fromkeys(f"{name} was {block['reason']}." for d in labelled_leaves(out_dir, config).values()
                          for name, block in ((read_json(d, "perturbation_results.json") or {}).get("controls")
                                              or {}).items() if isinstance(block, dict) and block.get("skipped"))
    return [Section(f"{what.capitalize()} × condition → perplexity ratio",
                    "perturbed ÷ baseline perplexity, mean ± sample std over seeds; a single seed: its ratio", table,
                    " ".join(notes))]


def sections(out_dir: Path, config: dict, agreement: dict | None) -> list[Section]:
    """Each part the out-dir has data for."""
    out = []
    top = top_weights(out_dir, config)
    if top is not None:
        out.append(Section("Top weights of each metric",
                           f"the primary seed's {TOP_SHOWN} highest-scoring weights of each metric; every seed's "
                           f"Top-K is in {METRICS_DIR}/<name>/top_weights.csv", top))
    out += ratio_section(out_dir, config, "metric")
    quant = quantization_matrix(out_dir, config)
    if quant is not None:
        out.append(Section("Metric × block size → quantized perplexity ratio",
                           "perplexity ÷ unquantized with each metric's Top-K kept in full precision (with as many "
                           "random weights kept instead), mean over seeds", quant))
    pruned = pruning.multi_table(out_dir, config)
    if pruned is not None:
        out.append(Section("Metric × sparsity → pruned perplexity",
                           "perplexity with each metric's lowest scores removed (per group of the run's mode; N:M "
                           "per row), and with as many removed by |w| or at random, mean over seeds", pruned))
    if agreement is not None:
        out.append(Section("Agreement between metrics", "mean over seeds", agreement_table(agreement), READING))
    ranks = super_weight_ranks(out_dir, config)
    if ranks is not None:
        out.append(Section("Super-weight candidates in each metric's Top-K",
                           "rank of each detector candidate in the metric's Top-K, per seed; - = not in it", ranks))
    return out


def build_report(out_dir: Path) -> str:
    out_dir = Path(out_dir)
    cfg = read_json(out_dir, "config.json")
    ag = read_json(out_dir, "metric_agreement.json")
    manifest = read_json(out_dir, "experiment_manifest.json")
    c = cfg["config"]
    metrics = c["metrics"]
    status = f" Whole run: {run_text(manifest)}." if manifest else ""
    lines = [f"# ESA report: `{c['model']}`, {len(metrics)} metrics, {c['mode']}, k = {c['topk']}", "",
             f"**Question.** Do {', '.join(f'`{m}`' for m in metrics)} pick the same weights of `{c['model']}`"
             + (f", and does {c['perturb']} of each metric's Top-K hurt perplexity more than its controls "
                f"({', '.join(c['controls']) or 'none'})?" if c.get("perturb") else "?"), "",
             f"**Configuration.** All metrics scored in one pass per seed on the same calibration windows "
             f"(seeds {', '.join(map(str, c['seeds']))}); every metric has its own folder `metrics/<name>/` with "
             f"the files and report of a single-metric run.{status}"]
    lines += markdown_sections(sections(out_dir, cfg, ag))
    if (out_dir / HEATMAP).is_file():
        lines += ["", f"![metric agreement]({HEATMAP})"]
    if (out_dir / pruning.PLOT).is_file():
        lines += ["", f"![pruning]({pruning.PLOT})"]
    lines += index_lines("Per-metric reports", {m: f"{METRICS_DIR}/{m}/report.md" for m in metrics}, {
        "config.json": "the run's configuration (all metrics)",
        "experiment_manifest.json": "status, timings per phase, peak memory, every file",
        "metric_agreement.json": "per pair of metrics and seed: Jaccard of the Top-Ks, Spearman on the union of the "
                                 "Top-Ks", HEATMAP: "the agreement matrices (PNG)",
        **({pruning.PLOT: "every metric's pruning curve, controls dashed (PNG)"}
           if (out_dir / pruning.PLOT).is_file() else {}),
        f"{METRICS_DIR}/<name>/": "each metric's single-metric out-dir"})
    return "\n".join(lines) + "\n"


def index_lines(heading: str, reports: dict[str, str], files: dict[str, str]) -> list[str]:
    """The end of a report over several folders: a link to each folder's report (name -> path), then
    the file table (file -> content) ending with this report."""
    return ["", f"## {heading}", "", *(f"- [`{n}`]({p})" for n, p in reports.items()), "", "## Files", "",
            "| file | content |", "|---|---|", *(f"| `{f}` | {what} |" for f, what in files.items()),
            "| `report.md` | this report |"]


def console_summary(out_dir: Path) -> str:
    cfg = read_json(out_dir, "config.json")
    c = cfg["config"]
    lines = [f"ESA summary  model={c['model']}  metrics={','.join(c['metrics'])}  mode={c['mode']}  "
             f"k={c['topk']}  seeds={','.join(map(str, c['seeds']))}  perturb={c['perturb'] or 'none'}"]
    return "\n".join(lines + console_sections(sections(out_dir, cfg, read_json(out_dir, "metric_agreement.json"))))
