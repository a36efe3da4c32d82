"""The ESA run: load -> score -> Top-K (+ controls) -> perturb -> perplexity -> outputs -> report.md.

``run(cfg)`` is the whole job; the CLI only builds ``cfg``.  Nothing in here sees argparse.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from esa import distributed, models, outputs, plots, report, report_md, selection, significance
from esa.bigmodel import checkpointed_blocks
from esa.config import RunConfig, default_out_dir
from esa.data import TokenData, load_data
from esa.evaluate import NaNLossError, perplexity
from esa.outputs import Manifest, prepare_out_dir
from esa.perturb import perturbed, resolve_bit
from esa.score_sample import write_score_sample
from esa.seeding import numpy_rng, torch_generator
from esa.sensitivity import MetricContext, compute_scores
from esa.stability import stability_summary
from esa.stats import all_stats
from esa.superweights import DEFAULT_PROMPT
from esa.superweights_report import (
    detection_input,
    format_table,
    overlap_with_topk,
    run_super_weights,
    write_super_weights,
)
from esa.sweep import sweep_curve
from esa.targets import Target, find_targets

log = logging.getLogger("esa")


@dataclass
class SeedResult:
    """What one seed leaves behind: its selections and small summaries (never full scores)."""

    seed: int
    top: selection.Selection
    controls: dict[str, selection.Selection]
    calibration_windows: list[int]  # pool indices of the windows this seed scored on
    sweep: dict[int, tuple[selection.Selection, dict[str, selection.Selection]]]  # --topk-sweep k != --topk


def release_memory() -> None:
    """Give freed score buffers back to the OS between seeds.

    Without this, glibc keeps the freed heap of one seed's fp32 scores fragmented and the next
    seed's allocations grow the peak RSS although the live memory is the same.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def score_seed(cfg: RunConfig, seed: int, model, targets: list[Target], data: TokenData,
               out_dir: Path, manifest: Manifest, write_stats: bool) -> SeedResult:
    """Score with this seed's calibration windows, select Top-K and controls (for --topk and every
    --topk-sweep k), write the primary seed's statistics and score sample, drop the scores."""
    chosen = data.calibration_indices(numpy_rng(seed, "calibration"), cfg.max_samples)
    windows = data.calib_pool[torch.from_numpy(chosen)]
    names = [t.name for t in targets]
    log.info("seed %d: scoring %d target tensors with %s on %d calibration windows", seed, len(targets),
             cfg.metric, len(windows))
    ctx = MetricContext(seed=seed, hutchinson_samples=cfg.hutchinson_samples, curvature_samples=cfg.curvature_samples)
    with manifest.phase("scoring"), (checkpointed_blocks(model) if cfg.gradient_checkpointing
                                      else contextlib.nullcontext()):
        scores = compute_scores(cfg.metric, model, targets, windows, cfg.batch_size, ctx)
    with manifest.phase("selection"):
        chosen_k = select_all(cfg, scores, names, seed)
        top, controls = chosen_k[cfg.topk]
        sweep = {k: v for k, v in chosen_k.items() if k != cfg.topk}
        if distributed.active():  # the payload is O(k) Python objects: only built when there are ranks
            distributed.check_same(f"the selections of seed {seed}", repr(
                [(k, top_k.ranked(names), {c: s.ranked(names) for c, s in ctl.items()})
                 for k, (top_k, ctl) in sorted(chosen_k.items())]).encode())
    if write_stats:
        with manifest.phase("stats"):
            stats = all_stats(scores, {t.name: t.shape for t in targets})
            for name, extra in ctx.extra_stats.items():
                stats[name].update(extra)
            write_score_sample(out_dir / "score_distribution.npz", scores, names, top, numpy_rng(seed, "score_sample"),
                               {"metric": cfg.metric, "mode": cfg.mode, "k": cfg.topk, "seed": seed})
        outputs.write_json(out_dir / "sensitivity_stats.json", {"metric": cfg.metric, "seed": seed, "tensors": stats})
        manifest.add_file("sensitivity_stats.json")
        manifest.add_file("score_distribution.npz")
    del scores  # only the selections outlive this function: memory stays flat in the number of seeds
    release_memory()
    return SeedResult(seed, top, controls, chosen.tolist(), sweep)


def select_all(cfg: RunConfig, scores: dict[str, torch.Tensor], names: list[str], seed: int
               ) -> dict[int, tuple[selection.Selection, dict[str, selection.Selection]]]:
    """Top-K and each control for --topk and every --topk-sweep k, from one pass at the largest k.

    Top-K and bottom_k of a smaller k are prefixes of the largest k's (nested under the total
    order), so the scores are ranked once; random_k is drawn per k, from the stream ``random_k`` for
    --topk (as without a sweep) and ``random_k:k<k>`` for the others, disjoint from that k's Top-K.
    """
    ks = sorted({cfg.topk, *cfg.topk_sweep})
    need = 2 if "random_k" in cfg.controls else 1  # random_k is drawn disjoint from the Top-K: room for 2k
    top_max = selection.top_k(scores, names, ks[-1], cfg.mode, need=need)
    nested = {c: selection.control(c, scores, names, ks[-1], cfg.mode, top_max, None)  # deterministic: no rng
              for c in cfg.controls if c in selection.NESTED}
    out = {}
    for k in ks:
        top = top_max.prefix(k, cfg.mode, names)
        rng = numpy_rng(seed, "random_k" if k == cfg.topk else f"random_k:k{k}")
        out[k] = (top, {c: nested[c].prefix(k, cfg.mode, names) if c in nested
                        else selection.control(c, scores, names, k, cfg.mode, top, rng) for c in cfg.controls})
    return out


def check_sizes(cfg: RunConfig, targets: list[Target]) -> None:
    """Fail before scoring when --topk or a --topk-sweep k does not fit the weight count."""
    sizes = {t.name: t.numel for t in targets}
    need = 2 if "random_k" in cfg.controls else 1
    selection.check_k(cfg.mode, cfg.topk, sizes, need)
    for k in cfg.topk_sweep:
        selection.check_k(cfg.mode, k, sizes, need, flag="--topk-sweep")


def baseline_perplexity(cfg: RunConfig, model, data: TokenData, manifest: Manifest) -> dict:
    with manifest.phase("evaluation"):
        log.info("baseline perplexity on %d evaluation windows", len(data.eval_windows))
        base = perplexity(model, data.eval_windows, cfg.batch_size)
    log.info("baseline perplexity %.4f", base["ppl"])
    return base


def evaluate_conditions(cfg: RunConfig, model, targets: list[Target], data: TokenData, result: SeedResult,
                        manifest: Manifest, base: dict | None = None) -> dict:
    """Each condition of one seed perturbed in place, evaluated and restored (baseline if not given)."""
    if base is None:
        base = baseline_perplexity(cfg, model, data, manifest)
    conditions = _evaluate(cfg, model, targets, data, result.seed, [("top_k", result.top), *result.controls.items()],
                           base, manifest)
    return {"seed": result.seed, "baseline": base, "conditions": conditions}


def evaluate_sweep(cfg: RunConfig, model, targets: list[Target], data: TokenData, result: SeedResult, base: dict,
                   main: dict, manifest: Manifest) -> dict[int, dict[str, dict]]:
    """``{k: {condition: row}}`` of one seed for every --topk-sweep k (the main k reuses ``main``)."""
    out = {}
    for k in cfg.topk_sweep:
        if k == cfg.topk:
            out[k] = main["conditions"]
            continue
        top, controls = result.sweep[k]
        log.info("seed %d: sweep k=%d", result.seed, k)
        out[k] = _evaluate(cfg, model, targets, data, result.seed, [("top_k", top), *controls.items()], base,
                           manifest, stream_suffix=f":k{k}")
    return out


def _evaluate(cfg: RunConfig, model, targets: list[Target], data: TokenData, seed: int,
              conds: list[tuple[str, selection.Selection]], base: dict, manifest: Manifest,
              stream_suffix: str = "") -> dict:
    """Perturb each selection in place, measure perplexity, restore; rows keyed by condition name."""
    by_name = {t.name: t for t in targets}
    with manifest.phase("evaluation"):
        conditions = {}
        for name, sel in conds:
            gen = torch_generator(seed, f"perturb:{name}{stream_suffix}")
            with perturbed(by_name, sel, cfg.perturb, cfg.perturb_scale, cfg.perturb_prob, gen,
                           cfg.bit_index) as info:
                try:
                    ev = perplexity(model, data.eval_windows, cfg.batch_size)
                    row = {**ev, "delta_ppl": ev["ppl"] - base["ppl"], "ratio": ev["ppl"] / base["ppl"]}
                except NaNLossError:
                    # the perturbed model's loss is NaN (e.g. an exponent bit flip overflowed to inf):
                    # the model no longer predicts anything, which is infinite perplexity, not a crash
                    log.warning("seed %d %s: NaN loss after perturbation; perplexity reported as inf",
                                seed, name)
                    row = {"ppl": math.inf, "mean_nll": math.nan, "delta_ppl": math.inf, "ratio": math.inf,
                           "non_finite_loss": "nan"}
            conditions[name] = {**row, **info}
            if info["n_changed"] < info["n_perturbed"]:
                log.warning("%s: only %d of %d perturbed weights changed value (the others are exactly 0, "
                            "which %s leaves unchanged)", name, info["n_changed"], info["n_perturbed"], cfg.perturb)
            log.info("seed %d %s: perplexity %s (%d weights perturbed)", seed, name, row.get("ppl"),
                     info["n_perturbed"])
    return conditions


def perturbation_results(cfg: RunConfig, data: TokenData, blocks: list[dict], bit_index: int | None,
                         sweeps: list[dict[int, dict]] | None = None) -> dict:
    """The primary seed's block where single-seed users expect it, every seed's, and statistics.

    ``summary`` and ``tests`` exist only with >= 2 seeds (absent, never zero, otherwise); ``sweep``
    (see :mod:`esa.sweep`) only with --topk-sweep.
    """
    per_seed = {str(b["seed"]): b["conditions"] for b in blocks}
    out = {"seed": blocks[0]["seed"], "metric": cfg.metric, "mode": cfg.mode, "k": cfg.topk,
           "perturb": cfg.perturb, "perturb_scale": cfg.perturb_scale, "perturb_prob": cfg.perturb_prob,
           "bit_index": bit_index,
           "eval_windows": len(data.eval_windows), "baseline": blocks[0]["baseline"],
           "conditions": blocks[0]["conditions"], "seeds": [b["seed"] for b in blocks], "per_seed": per_seed}
    if len(blocks) >= 2:
        out["summary"] = significance.condition_summary(per_seed)
        out["tests"] = significance.top_vs_controls(per_seed)
    if sweeps:
        out["sweep"] = sweep_curve(list(cfg.topk_sweep), cfg.topk,
                                   {str(b["seed"]): sw for b, sw in zip(blocks, sweeps)})
    return out


def write_top_weights(out_dir: Path, results: list[SeedResult], targets: list[Target]) -> list[list]:
    names = [t.name for t in targets]
    shapes = {t.name: t.shape for t in targets}
    rows = []
    for res in results:
        for rank, (name, idx, score) in enumerate(res.top.ranked(names), start=1):
            coords = ",".join(str(int(c)) for c in np.unravel_index(idx, shapes[name]))
            rows.append([rank, name, idx, coords, f"{score:.9g}", res.seed])
    outputs.write_csv(out_dir / "top_weights.csv", ["rank", "parameter", "index", "coords", "score", "seed"], rows)
    return rows


def run(cfg: RunConfig) -> dict:
    """Run the whole job described by ``cfg``; returns the summary that was printed.

    Under torchrun (see :mod:`esa.distributed`) every rank runs this; the ranks share scoring and
    evaluation, and only rank 0 creates the out-dir, writes files and prints.
    """
    choice = models.resolve_device(cfg.device, cfg.device_explicit, cfg.dtype, cfg.dtype_explicit)
    device = distributed.local_device(choice.device)
    with distributed.process_group(device):
        main = distributed.is_main()
        out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
        if main:
            prepare_out_dir(out_dir)
            for w in choice.warnings:
                log.warning(w)
        if cfg.stability_check and len(cfg.seeds) < 2:
            log.warning("--stability-check needs at least two --seeds: no stability_summary.json is written")
        try:
            return _run(cfg, choice, device, out_dir, Manifest(out_dir, write=main), main)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _run(cfg: RunConfig, choice: models.DeviceChoice, device: str, out_dir: Path, manifest: Manifest,
         main: bool) -> dict:
    seeds = cfg.seeds
    with manifest.recording():
        with manifest.phase("load_model"):
            log.info("loading model %s on %s in %s", cfg.model, device, choice.dtype)
            if distributed.active():  # rank 0 converts the embedded model once; the others wait for it
                if main:
                    models.prepare_source(cfg.model)
                distributed.barrier()
            model, tok = models.load_model(cfg.model, device, choice.dtype, cfg.device_map, cfg.offload)
        targets = find_targets(model, cfg.include, cfg.exclude)
        check_sizes(cfg, targets)
        if cfg.perturb == "bit_flip":
            resolve_bit(targets[0].param.dtype, cfg.bit_index)  # fail before hours of scoring
        with manifest.phase("load_data"):
            data = load_data(tok, cfg.data_file, cfg.dataset, cfg.max_length, cfg.eval_samples, cfg.max_samples,
                             cfg.data_dir)
        if main:
            report.write_config(out_dir, cfg, choice, model, targets, data, seeds)
            manifest.add_file("config.json")
        results = [score_seed(cfg, s, model, targets, data, out_dir, manifest, write_stats=(i == 0 and main))
                   for i, s in enumerate(seeds)]
        stab = None
        if cfg.stability_check and len(results) >= 2:
            stab = stability_summary([r.top for r in results], list(seeds), cfg.topk, cfg.metric, cfg.mode)
            log.info("Mean Jaccard overlap: %.3f", stab["jaccard_mean"])
        rows = _write_selections(out_dir, manifest, results, targets, stab) if main else []
        sw = None
        if cfg.detect_super_weights:
            with manifest.phase("super_weights"):
                sw = super_weights(cfg, model, tok, data, results, [t.name for t in targets])
            if main:
                for name in write_super_weights(sw, out_dir):
                    manifest.add_file(name)
        perturbation = None
        if cfg.perturb:
            base = baseline_perplexity(cfg, model, data, manifest)
            blocks = [evaluate_conditions(cfg, model, targets, data, r, manifest, base) for r in results]
            sweeps = [evaluate_sweep(cfg, model, targets, data, r, base, b, manifest)
                      for r, b in zip(results, blocks)] if cfg.topk_sweep else None
            bit = resolve_bit(targets[0].param.dtype, cfg.bit_index) if cfg.perturb == "bit_flip" else None
            perturbation = perturbation_results(cfg, data, blocks, bit, sweeps)
        if not main:
            return {"out_dir": str(out_dir), "perturbation": perturbation}
        return _write_results(cfg, out_dir, manifest, rows, stab, perturbation, sw)


def super_weights(cfg: RunConfig, model, tok, data: TokenData, results: list[SeedResult], names: list[str]) -> dict:
    """The data-free detector of :mod:`esa.superweights` (on the prompt or the first calibration
    windows), its ablation on the evaluation windows, and the candidates' ranks in each seed's Top-K."""
    input_ids = detection_input(tok, cfg.super_weight_prompt, data.calib_pool, cfg.detect_on_data)
    settings = {"model": cfg.model, "detect_on": "data" if cfg.detect_on_data else "prompt",
                "prompt": None if cfg.detect_on_data else cfg.super_weight_prompt or DEFAULT_PROMPT,
                "data_source": data.data_source, "eval_windows": len(data.eval_windows), "max_length": cfg.max_length}
    sw = run_super_weights(model, input_ids, data.eval_windows, threshold=cfg.super_weight_threshold,
                           max_super_weights=cfg.max_super_weights, batch_size=cfg.batch_size, seed=cfg.seeds[0],
                           tokenizer=tok, settings=settings)
    sw["topk_overlap"] = {"metric": cfg.metric, "mode": cfg.mode, "k": cfg.topk, "per_seed": {
        str(r.seed): overlap_with_topk(sw["candidates"], r.top.ranked(names)) for r in results}}
    return sw


def _write_selections(out_dir: Path, manifest: Manifest, results: list[SeedResult], targets: list[Target],
                      stab: dict | None) -> list[list]:
    """Rank 0, before any evaluation (so a crash there loses nothing): Top-K table and stability."""
    rows = write_top_weights(out_dir, results, targets)
    manifest.add_file("top_weights.csv")
    manifest.data["calibration_windows"] = {str(r.seed): r.calibration_windows for r in results}
    manifest.data["world_size"] = distributed.world_size()
    if stab is not None:
        outputs.write_json(out_dir / "stability_summary.json", stab)
        manifest.add_file("stability_summary.json")
    manifest.save()
    return rows


def _write_results(cfg: RunConfig, out_dir: Path, manifest: Manifest, rows: list[list], stab: dict | None,
                   perturbation: dict | None, sw: dict | None) -> dict:
    """Rank 0's remaining files: perturbation results, plots, report.md; then print the summary."""
    if perturbation is not None:
        outputs.write_json(out_dir / "perturbation_results.json", perturbation)
        manifest.add_file("perturbation_results.json")
    plot_paths: list[Path] = []
    if cfg.save_plots:
        with manifest.phase("plots"):
            plot_paths = plots.make_plots(out_dir)
            for path in plot_paths:
                manifest.add_file(str(path.relative_to(out_dir)))
    summary = report.summary_table(cfg, perturbation, stab, rows[:5])
    # report.md is always written (text, cheap; plot sections only with --save-plots), after the
    # manifest says success so that the report quotes the final status; if it fails, the
    # recording() block turns the manifest to failed
    manifest.add_file("report.md")
    manifest.finish("success")
    report_md.write_report(out_dir)
    print(summary + (f"\n{format_table(sw)}" if sw is not None else ""), flush=True)
    print(report.files_footer(out_dir, plot_paths), flush=True)
    return {"out_dir": str(out_dir), "perturbation": perturbation}
