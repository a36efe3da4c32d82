"""``esa_runner.py --dry-run``: the resolved plan of a run, printed without loading the model or the data."""

from __future__ import annotations

import os
from pathlib import Path

from esa.cli.common import format_plan, plan_device
from esa.config import RunConfig, default_run_dir
from esa.data import WIKITEXT2_ENV
from esa.model import distributed
from esa.model.device import EMBEDDED_MODEL
from esa.outdir.layout import describe_run, run_files

OUTPUT_FILES = ("config.json", "experiment_manifest.json", "top_weights.csv", "sensitivity_stats.json",
                "score_distribution.npz", "report.md")
SUPER_WEIGHT_FILES = ("super_weights.json", "super_weights.txt", "super_weights.png")


def writable_dir(path: Path) -> bool:
    """Whether ``path`` exists writable or could be created (nearest existing parent writable)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def _scale_out(cfg: RunConfig) -> str:
    parts = []
    if cfg.device_map:
        parts.append(f"device map {cfg.device_map}" + (" with CPU offload" if cfg.offload else ""))
    if cfg.gradient_checkpointing:
        parts.append("gradient checkpointing")
    if distributed.requested():
        parts.append(f"data parallel over {distributed.launched_world_size()} ranks")
    return ("   (" + ", ".join(parts) + ")") if parts else ""


def data_plan(cfg: RunConfig) -> str:
    """Where the text will come from, as load_data will decide it."""
    if cfg.data_file:
        return f"file {cfg.data_file} (evaluation = first {cfg.eval_samples} windows, calibration drawn after them)"
    if cfg.dataset:
        env = os.environ.get(WIKITEXT2_ENV) if cfg.dataset == "wikitext2" else None
        source = (f"the raw files in {cfg.data_dir}" if cfg.data_dir else f"{WIKITEXT2_ENV}={env}" if env
                  else "the datasets library (cache or hub)")
        return f"dataset {cfg.dataset} (calibration = train split, evaluation = test split) from {source}"
    return f"WikiText-2 ({WIKITEXT2_ENV} if set, else the datasets cache or hub), else the bundled sample corpus"


def output_files(cfg: RunConfig) -> list[str]:
    """Every file the run will write, as the pipeline writes them (several metrics: the run's own
    files, then one single-metric out-dir per metric under metrics/<name>/)."""
    if cfg.multi:
        each = [f for f in output_files(cfg.for_metric(cfg.metrics[0])) if f != "experiment_manifest.json"]
        return ["config.json", "experiment_manifest.json", "metric_agreement.json", "metric_agreement.png",
                "report.md", f"metrics/{{{','.join(cfg.metrics)}}}/{{{','.join(each)}}}"]
    files = list(OUTPUT_FILES)
    if cfg.perturb:
        files.append("perturbation_results.json")
    if cfg.stability_check and len(cfg.seeds) >= 2:
        files.append("stability_summary.json")
    if cfg.quantize:
        files += ["quantization_results.json", "quantization.png"]
    if cfg.detect_super_weights:
        files += SUPER_WEIGHT_FILES
    if cfg.save_plots:
        files.append("plots/*.png")
    return files


def quantize_plan(cfg: RunConfig) -> str:
    """The quantization experiment's conditions and how many perplexity evaluations it takes: per block
    size, ``none`` and ``protect_super_weights`` once (they do not depend on the seed), protect_topk
    and protect_random_k per seed and metric; plus the unquantized baseline."""
    conds = ["none", "protect_topk", "protect_random_k"] + (["protect_super_weights"] if cfg.detect_super_weights
                                                            else [])
    shared = 1 + int(cfg.detect_super_weights)
    per_block = shared + 2 * len(cfg.seeds) * len(cfg.metrics)
    n = len(cfg.block_sizes) * per_block + 1
    return (f"{cfg.quantize} {cfg.bits}-bit" + (f", clip at {cfg.clip_z:g} std" if cfg.clip_z else "")
            + f"; conditions {', '.join(conds)} x block sizes {', '.join(map(str, cfg.block_sizes))} x seeds "
            f"{', '.join(map(str, cfg.seeds))}: at most {n} perplexity evaluations "
            f"({len(cfg.block_sizes)} x ({shared} + 2 x {len(cfg.seeds)} seed(s)"
            + (f" x {len(cfg.metrics)} metrics" if cfg.multi else "") + ") + the unquantized baseline)")


def runner_plan(cfg: RunConfig) -> str:
    """The plan as text.  Machine-dependent facts (CUDA missing) are reported, not raised: the
    configuration is valid, this machine just could not run it."""
    choice = plan_device(cfg.device, cfg.device_explicit, cfg.dtype, cfg.dtype_explicit)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_run_dir(cfg)
    model = cfg.model + (" (embedded SmolLM2-135M-Instruct)" if cfg.model == EMBEDDED_MODEL else "")
    conditions = ["top_k", *cfg.controls] if cfg.perturb else []
    perturb = "none (scores and Top-K only)" if not cfg.perturb else (
        f"{cfg.perturb} scale={cfg.perturb_scale} prob={cfg.perturb_prob}"
        + (f" bit={cfg.bit_index if cfg.bit_index is not None else 'MSB of exponent'}" if cfg.perturb == "bit_flip"
           else ""))
    rows = [
        ("model", model),
        ("device", f"{choice.device}   dtype: {choice.dtype}" + _scale_out(cfg)),
        ("data", f"{data_plan(cfg)}; windows of {cfg.max_length} tokens, batch {cfg.batch_size}"),
        ("metric" if not cfg.multi else "metrics", f"{', '.join(cfg.metrics)}   mode: {cfg.mode}   k: {cfg.topk}"),
        ("seeds", f"{', '.join(map(str, cfg.seeds))} (primary {cfg.seeds[0]})"
         + ("; stability check" if cfg.stability_check else "")),
        ("perturb", perturb),
        ("conditions", (', '.join(conditions) if conditions else 'see quantize' if cfg.quantize else '-')
         + (f"; dose-response over k = {', '.join(map(str, cfg.topk_sweep))}" if cfg.topk_sweep else "")),
        *([("quantize", quantize_plan(cfg))] if cfg.quantize else []),
        ("super weights", "detect, ablate and rank in each seed's Top-K" if cfg.detect_super_weights else "-"),
        ("outputs", f"{out_dir} -> {', '.join(output_files(cfg))}"
         + ("" if writable_dir(out_dir) else "  (NOT writable: a real run would stop)")
         + (f"  (holds another run: {describe_run(out_dir)}; a real run would stop; --overwrite replaces it)"
            if not (cfg.resume or cfg.overwrite) and run_files(out_dir) else "")
         + ("  (resumed: finished seeds and conditions are skipped)" if cfg.resume else "")),
    ]
    return format_plan("ESA dry run: configuration valid; nothing loaded, nothing written", rows, choice.warnings)
