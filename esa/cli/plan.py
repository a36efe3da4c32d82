"""``esa_runner.py --dry-run``: the resolved plan of a run, printed without loading the model or the data."""

from __future__ import annotations

import os
from pathlib import Path

from esa.cli.common import format_plan, plan_device
from esa.config import RunConfig, default_run_dir
from esa.data import WIKITEXT2_ENV, DataSpec
from esa.evaluators import EVALUATORS
from esa.experiment.registry import EXPERIMENTS
from esa.model import distributed
from esa.model.device import EMBEDDED_MODEL
from esa.outdir.layout import describe_run, run_files

OUTPUT_FILES = ("config.json", "experiment_manifest.json", "top_weights.csv", "sensitivity_stats.json",
                "score_distribution.npz", "report.md")
SUPER_WEIGHT_FILES = ("super_weights.json", "super_weights.txt", "super_weights.png")
# the figures of the experiments' and evaluators' own results files (always drawn: esa.reporting.parts)
FIGURES = {"quantization_results.json": ("quantization.png",), "pruning_results.json": ("pruning.png",),
           "task_results.json": ("task_accuracy.png",),
           "activations.json": ("activations.png",)}


def writable_dir(path: Path) -> bool:
    """Whether ``path`` exists writable or could be created (nearest existing parent writable)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def _scale_out(cfg: RunConfig) -> str:
    parts = []
    d = cfg.distributed
    if d.device_map:
        parts.append(f"device map {d.device_map}" + (" with CPU offload" if d.offload else ""))
    if d.gradient_checkpointing:
        parts.append("gradient checkpointing")
    if d.shard:
        parts.append(f"every weight sharded over {distributed.launched_world_size()} ranks (FSDP2)")
    elif distributed.requested():
        parts.append(f"data parallel over {distributed.launched_world_size()} ranks")
    return ("   (" + ", ".join(parts) + ")") if parts else ""


def data_plan(d: DataSpec) -> str:
    """Where the text will come from, as load_data will decide it."""
    if d.data_file:
        return f"file {d.data_file} (evaluation = first {d.eval_samples} windows, calibration drawn after them)"
    if d.dataset:
        env = os.environ.get(WIKITEXT2_ENV) if d.dataset == "wikitext2" else None
        source = (f"the raw files in {d.data_dir}" if d.data_dir else f"{WIKITEXT2_ENV}={env}" if env
                  else "the datasets library (cache or hub)")
        return f"dataset {d.dataset} (calibration = train split, evaluation = test split) from {source}"
    return f"WikiText-2 ({WIKITEXT2_ENV} if set, else the datasets cache or hub), else the bundled sample corpus"


def output_files(cfg: RunConfig) -> list[str]:
    """Every file the run will write, as the pipeline writes them (several metrics: the run's own
    files, then one single-metric out-dir per metric under metrics/<name>/)."""
    if cfg.multi_perturb and not cfg.multi:
        perts = cfg.perturbations
        each = [f for f in output_files(cfg.for_perturbation(perts[0])) if f != "experiment_manifest.json"]
        return ["config.json", "experiment_manifest.json", "report.md",
                f"perturbations/{{{','.join(perts)}}}/{{{','.join(each)}}}"]
    if cfg.multi:
        metrics = cfg.scoring.metrics
        each = [f for f in output_files(cfg.for_metric(metrics[0])) if f != "experiment_manifest.json"]
        own = ["pruning.png"] if cfg.experiment.options.prune or cfg.experiment.options.prune_pattern else []
        return ["config.json", "experiment_manifest.json", "metric_agreement.json", "metric_agreement.png", *own,
                "report.md", f"metrics/{{{','.join(metrics)}}}/{{{','.join(each)}}}"]
    files = list(OUTPUT_FILES)
    results = [EXPERIMENTS[name].results_file for name in cfg.experiment.enabled()]
    results += [EVALUATORS[name].results_file for name in cfg.evaluation.evaluate if EVALUATORS[name].results_file]
    for name in results:
        files += [name, *FIGURES.get(name, ())]
    if cfg.scoring.stability_check and len(cfg.scoring.seeds) >= 2:
        files.append("stability_summary.json")
    if cfg.super_weights.detect_super_weights:
        files += SUPER_WEIGHT_FILES
    if cfg.output.save_plots:
        files.append("plots/*.png")
    return files


def quantize_plan(cfg: RunConfig) -> str:
    """The quantization experiment's conditions and how many evaluations it takes: per block size,
    ``none`` and ``protect_super_weights`` once (they do not depend on the seed), protect_topk and
    protect_random_k per seed and metric; plus the unquantized baseline."""
    o, seeds, detect = cfg.experiment.options, cfg.scoring.seeds, cfg.super_weights.detect_super_weights
    conds = ["none", "protect_topk", "protect_random_k"] + (["protect_super_weights"] if detect else [])
    shared = 1 + int(detect)
    per_block = shared + 2 * len(seeds) * len(cfg.scoring.metrics)
    n = len(o.block_sizes) * per_block + 1
    return (f"{o.quantize} {o.bits}-bit" + (f", clip at {o.clip_z:g} std" if o.clip_z else "")
            + f"; conditions {', '.join(conds)} x block sizes {', '.join(map(str, o.block_sizes))} x seeds "
            f"{', '.join(map(str, seeds))}: at most {n} perplexity evaluations "
            f"({len(o.block_sizes)} x ({shared} + 2 x {len(seeds)} seed(s)"
            + (f" x {len(cfg.scoring.metrics)} metrics" if cfg.multi else "") + ") + the unquantized baseline)")


def prune_plan(cfg: RunConfig) -> str:
    """The pruning experiment's levels and conditions, and how many evaluations it takes: per level,
    ``magnitude`` once (it depends on neither seed nor metric), ``random`` per seed (the same for every
    metric), ``metric`` per seed and metric; plus the unpruned baseline."""
    o, seeds, metrics = cfg.experiment.options, cfg.scoring.seeds, cfg.scoring.metrics
    levels = [*o.prune, *o.prune_pattern]
    n = len(levels) * (1 + len(seeds) * (1 + len(metrics))) + 1
    return (f"{', '.join(levels)} ({cfg.scoring.mode}; N:M per row); conditions metric, magnitude, random x seeds "
            f"{', '.join(map(str, seeds))}: at most {n} evaluations ({len(levels)} x (1 + {len(seeds)} seed(s) x "
            f"(1 + {len(metrics)} metric(s))) + the unpruned baseline)")


def _perturb_row(cfg: RunConfig) -> str | None:
    """The perturbation, "none (scores and Top-K only)", or None (no row) when another experiment
    (--quantize) measures the run's conditions: it has its own row."""
    o = cfg.experiment.options
    if not o.perturb:
        return None if cfg.experiment.enabled() else "none (scores and Top-K only)"
    rows = []
    for name in cfg.perturbations:  # each with its own scale (and bit), as its folder's run
        p = cfg.for_perturbation(name).experiment.options
        bit = f" bit={p.bit_index if p.bit_index is not None else 'MSB of exponent'}" if name == "bit_flip" else ""
        rows.append(f"{name} scale={p.perturb_scale}{bit}")
    several = "; each in perturbations/<name>/, scored and selected once" if cfg.multi_perturb else ""
    return f"{'; '.join(rows)} prob={o.perturb_prob}{several}"


def runner_plan(cfg: RunConfig) -> str:
    """The plan as text.  Machine-dependent facts (CUDA missing) are reported, not raised: the
    configuration is valid, this machine just could not run it."""
    m, s, o, out = cfg.model, cfg.scoring, cfg.experiment.options, cfg.output
    choice = plan_device(m.device, m.device_explicit, m.dtype, m.dtype_explicit)
    out_dir = Path(out.out_dir) if out.out_dir else default_run_dir(cfg)
    model = m.model + (" (embedded SmolLM2-135M-Instruct)" if m.model == EMBEDDED_MODEL else "")
    conditions = ["top_k", *o.controls] if o.perturb else []
    if o.restore_activations:
        conditions = [c for name in conditions for c in (name, f"{name}+restored")]
    perturb = _perturb_row(cfg)
    rows = [
        ("model", model),
        ("device", f"{choice.device}   dtype: {choice.dtype}" + _scale_out(cfg)),
        ("data", f"{data_plan(cfg.data)}; windows of {cfg.data.max_length} tokens, batch {cfg.data.batch_size}"),
        ("metric" if not cfg.multi else "metrics", f"{', '.join(s.metrics)}   mode: {s.mode}   k: {s.topk}"),
        ("seeds", f"{', '.join(map(str, s.seeds))} (primary {s.seeds[0]})"
         + ("; stability check" if s.stability_check else "")),
        *([("perturb", perturb)] if perturb else []),
        ("conditions", (', '.join(conditions) if conditions else 'see quantize' if o.quantize
                        else 'see prune' if o.prune or o.prune_pattern else '-')
         + (f"; dose-response over k = {', '.join(map(str, o.topk_sweep))}" if o.topk_sweep else "")),
        *([("quantize", quantize_plan(cfg))] if o.quantize else []),
        *([("prune", prune_plan(cfg))] if o.prune or o.prune_pattern else []),
        ("super weights", "detect, ablate and rank in each seed's Top-K" if cfg.super_weights.detect_super_weights
         else "-"),
        ("evaluate", cfg.evaluation.describe()),
        ("outputs", f"{out_dir} -> {', '.join(output_files(cfg))}"
         + ("" if writable_dir(out_dir) else "  (NOT writable: a real run would stop)")
         + (f"  (holds another run: {describe_run(out_dir)}; a real run would stop; --overwrite replaces it)"
            if not (out.resume or out.overwrite) and run_files(out_dir) else "")
         + ("  (resumed: finished seeds and conditions are skipped)" if out.resume else "")),
    ]
    return format_plan("ESA dry run: configuration valid; nothing loaded, nothing written", rows, choice.warnings)
