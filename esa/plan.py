"""``--dry-run``: the resolved plan of a run, printed without loading the model or the data."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from esa.config import EMBEDDED_MODEL, RunConfig
from esa.data import WIKITEXT2_ENV
from esa.models import resolve_device

OUTPUT_FILES = ("config.json", "experiment_manifest.json", "top_weights.csv", "sensitivity_stats.json",
                "score_distribution.npz", "report.md")


def _writable_dir(path: Path) -> bool:
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        parts.append(f"data parallel over {world} ranks")
    return ("   (" + ", ".join(parts) + ")") if parts else ""


def describe(cfg: RunConfig, out_dir: Path) -> str:
    """The plan as text.  Machine-dependent facts (CUDA missing) are reported, not raised: the
    configuration is valid, this machine just could not run it."""
    cuda = torch.cuda.is_available()
    lines = ["ESA dry run: configuration valid; nothing loaded, nothing written"]
    if cfg.device == "cuda" and cfg.device_explicit and not cuda:
        lines.append("device: cuda requested; CUDA is not available on this machine, so a real run here "
                     "would stop with an error")
        device, dtype = "cuda", cfg.dtype
    else:
        choice = resolve_device(cfg.device, cfg.device_explicit, cfg.dtype, cfg.dtype_explicit, cuda)
        device, dtype = choice.device, choice.dtype
        lines += [f"note: {w}" for w in choice.warnings]
    model = cfg.model + (" (embedded SmolLM2-135M-Instruct)" if cfg.model == EMBEDDED_MODEL else "")
    if cfg.data_file:
        data = f"file {cfg.data_file} (evaluation = first {cfg.eval_samples} windows, calibration drawn after them)"
    elif cfg.dataset:
        env = os.environ.get(WIKITEXT2_ENV) if cfg.dataset == "wikitext2" else None
        source = (f"the raw files in {cfg.data_dir}" if cfg.data_dir else f"{WIKITEXT2_ENV}={env}" if env
                  else "the datasets library (cache or hub)")
        data = f"dataset {cfg.dataset} (calibration = train split, evaluation = test split) from {source}"
    else:
        data = (f"WikiText-2 ({WIKITEXT2_ENV} if set, else the datasets cache or hub), else the bundled sample "
                "corpus")
    conditions = ["top_k", *cfg.controls] if cfg.perturb else []
    files = list(OUTPUT_FILES)
    if cfg.perturb:
        files.append("perturbation_results.json")
    if cfg.stability_check and len(cfg.seeds) >= 2:
        files.append("stability_summary.json")
    if cfg.save_plots:
        files.append("plots/*.png")
    perturb = "none (scores and Top-K only)" if not cfg.perturb else (
        f"{cfg.perturb} scale={cfg.perturb_scale} prob={cfg.perturb_prob}"
        + (f" bit={cfg.bit_index if cfg.bit_index is not None else 'MSB of exponent'}" if cfg.perturb == "bit_flip"
           else ""))
    lines += [
        f"model:       {model}",
        f"device:      {device}   dtype: {dtype}" + _scale_out(cfg),
        f"data:        {data}; windows of {cfg.max_length} tokens, batch {cfg.batch_size}",
        f"metric:      {cfg.metric}   mode: {cfg.mode}   k: {cfg.topk}",
        f"seeds:       {', '.join(map(str, cfg.seeds))} (primary {cfg.seeds[0]})"
        + ("; stability check" if cfg.stability_check else ""),
        f"perturb:     {perturb}",
        f"conditions:  {', '.join(conditions) if conditions else '-'}"
        + (f"; dose-response over k = {', '.join(map(str, cfg.topk_sweep))}" if cfg.topk_sweep else ""),
        f"outputs:     {out_dir} -> {', '.join(files)}"
        + ("" if _writable_dir(out_dir) else "  (NOT writable: a real run would stop)"),
    ]
    return "\n".join(lines)
