"""A run of several perturbations (``--perturb zero,sign_flip,...``): the report.md and console summary
of the folder holding ``perturbations/<name>/`` (the run's out-dir, or a metric's folder of a
multi-metric run).

Built only from the out-dir: the folder's ``config.json`` and each perturbation's folder (a complete
single-perturbation out-dir: its ``perturbation_results.json``, ``top_weights.csv`` and report.md).
"""

from __future__ import annotations

from pathlib import Path

from esa.outdir.layout import PERTURBATIONS_DIR
from esa.outdir.readers import perturbation_names, read_json
from esa.reporting.format import run_text
from esa.reporting.metrics_report import (
    Section,
    console_sections,
    index_lines,
    markdown_sections,
    ratio_section,
    top_weights,
)


def is_multi(config: dict | None) -> bool:
    """Whether ``config`` (a config.json) records several perturbations."""
    return len(perturbation_names((config or {}).get("config", {}))) > 1


def sections(folder: Path, config: dict) -> list[Section]:
    """The perturbation × condition table, and the primary seed's top weights (one Top-K for every
    perturbation: scored and selected once)."""
    out = ratio_section(folder, config, "perturbation")
    top = top_weights(folder, config)
    if top is not None:
        out.append(Section("Top weights", "the primary seed's highest-scoring weights, the same Top-K for every "
                                          f"perturbation (each {PERTURBATIONS_DIR}/<name>/top_weights.csv)", top))
    return out


def build_report(folder: Path) -> str:
    folder = Path(folder)
    cfg = read_json(folder, "config.json")
    manifest = read_json(folder, "experiment_manifest.json")
    c = cfg["config"]
    names = perturbation_names(c)
    status = f" Whole run: {run_text(manifest)}." if manifest else ""
    lines = [f"# ESA report: `{c['model']}`, {c['metric']}, {len(names)} perturbations, {c['mode']}, "
             f"k = {c['topk']}", "",
             f"**Question.** Which of {', '.join(f'`{p}`' for p in names)} of the Top-K (by `{c['metric']}`) hurts "
             f"perplexity more than its controls ({', '.join(c['controls']) or 'none'})?", "",
             f"**Configuration.** Scored and selected once per seed (seeds {', '.join(map(str, c['seeds']))}); every "
             f"perturbation has its own folder `{PERTURBATIONS_DIR}/<name>/` with the files and report of a "
             f"single-perturbation run.{status}"]
    lines += markdown_sections(sections(folder, cfg))
    lines += index_lines("Per-perturbation reports", {p: f"{PERTURBATIONS_DIR}/{p}/report.md" for p in names}, {
        "config.json": "the configuration (all perturbations)",
        **({"experiment_manifest.json": "status, timings per phase, peak memory, every file"} if manifest else {}),
        f"{PERTURBATIONS_DIR}/<name>/": "each perturbation's single-perturbation out-dir"})
    return "\n".join(lines) + "\n"


def console_summary(folder: Path) -> str:
    cfg = read_json(folder, "config.json")
    c = cfg["config"]
    lines = [f"ESA summary  model={c['model']}  metric={c['metric']}  mode={c['mode']}  k={c['topk']}  "
             f"seeds={','.join(map(str, c['seeds']))}  perturb={c['perturb']}"]
    return "\n".join(lines + console_sections(sections(folder, cfg)))
