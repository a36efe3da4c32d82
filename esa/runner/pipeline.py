"""The ESA run: load -> score -> Top-K (+ controls) -> perturb -> perplexity -> outputs -> report.md.

``run(cfg)`` is the whole job; the CLI only builds ``cfg``.  Nothing in here sees argparse.  The
steps live in :mod:`esa.runner.seeds` (scoring and selection per seed, every metric at once),
:mod:`esa.runner.perturbation` and :mod:`esa.runner.quantization` (conditions and statistics),
:mod:`esa.runner.records` (files) and :mod:`esa.runner.checkpoint` (what ``--resume`` skips: each
seed's selections, each evaluated condition, the super-weight search).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from esa.analysis.agreement import agreement_summary
from esa.analysis.stability import stability_summary
from esa.config import RunConfig, default_run_dir
from esa.data import load_data
from esa.errors import UsageError
from esa.experiment.perturb import resolve_bit
from esa.metrics import METRICS
from esa.model import distributed, loading
from esa.model.device import DeviceChoice, resolve_device
from esa.model.fingerprint import data_fingerprint, file_fingerprint, weights_fingerprint
from esa.model.targets import Target, coverage, find_targets
from esa.outdir.journal import Journal, fault_point
from esa.outdir.layout import claim_out_dir, describe_run
from esa.outdir.manifest import Manifest
from esa.reporting import metrics_report, plots, quantization, report_md, summary
from esa.reporting.superweights import format_table, write_super_weights
from esa.runner import checkpoint, records
from esa.runner.context import RunContext
from esa.runner.perturbation import baseline_perplexity, evaluate_conditions, evaluate_sweep, perturbation_results
from esa.runner.quantization import quantizable, quantization_results
from esa.runner.seeds import SeedResult, SeedScores, check_sizes, control_context, score_seed
from esa.superweights.ablation import detection_input, overlap_with_topk, run_super_weights
from esa.superweights.detect import DEFAULT_PROMPT

log = logging.getLogger("esa")


def run(cfg: RunConfig) -> dict:
    """Run the whole job described by ``cfg``; returns ``{"out_dir", "perturbation"}``.

    Under torchrun (see :mod:`esa.model.distributed`) every rank runs this; the ranks share scoring and
    evaluation, and only rank 0 creates the out-dir, writes files and prints.
    """
    choice = resolve_device(cfg.device, cfg.device_explicit, cfg.dtype, cfg.dtype_explicit)
    device = distributed.local_device(choice.device)
    with distributed.process_group(device):
        is_main = distributed.is_main()
        out_dir = Path(cfg.out_dir) if cfg.out_dir else default_run_dir(cfg)
        if cfg.resume and checkpoint.finished(out_dir):
            if is_main:
                print(f"{out_dir}: this run already finished ({describe_run(out_dir)}); nothing to resume", flush=True)
            return {"out_dir": str(out_dir), "finished": True}
        if is_main:
            claim_out_dir(out_dir, cfg.resume, cfg.overwrite)
            for w in choice.warnings:
                log.warning(w)
        if cfg.stability_check and len(cfg.seeds) < 2:
            log.warning("--stability-check needs at least two --seeds: no stability_summary.json is written")
        skips = checkpoint.resumable(out_dir, cfg.seeds) if cfg.resume else None
        if skips is not None and is_main:
            log.info("resuming %s: %s", out_dir, skips)
        try:
            return _run(cfg, choice, device, out_dir, Manifest(out_dir, write=is_main, resume=skips), is_main)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _load(cfg: RunConfig, choice: DeviceChoice, device: str, out_dir: Path, manifest: Manifest,
          is_main: bool) -> RunContext:
    """Model, targets and data, checked before any scoring (a bad k or bit fails in seconds)."""
    with manifest.phase("load_model"):
        log.info("loading model %s on %s in %s", cfg.model, device, choice.dtype)
        if distributed.active():  # rank 0 converts the embedded model once; the others wait for it
            if is_main:
                loading.prepare_source(cfg.model)
            distributed.barrier()
        model, tok = loading.load_model(cfg.model, device, choice.dtype, cfg.device_map, cfg.offload)
    targets, excluded = scorable_targets(cfg, model)
    if cfg.quantize:  # the Top-K is chosen among the weights being quantized
        targets, skipped = quantizable(model, targets, bool(cfg.include))
        excluded.update(skipped)
        if not targets:
            raise UsageError("--quantize: none of the selected weights is a linear weight to quantize")
    check_sizes(cfg, targets)
    if cfg.perturb == "bit_flip":
        resolve_bit(targets[0].param.dtype, cfg.bit_index)  # fail before hours of scoring
    with manifest.phase("load_data"):
        data = load_data(tok, cfg.data_file, cfg.dataset, cfg.max_length, cfg.eval_samples, cfg.max_samples,
                         cfg.data_dir)
    ctx = RunContext(cfg, choice, model, tok, targets, data, out_dir, manifest, is_main,
                     journal=Journal(out_dir, write=is_main))
    ctx.coverage = coverage(model, targets, excluded)
    ctx.fingerprints = {"model_weights": weights_fingerprint(model),
                        "data": data_fingerprint(data.eval_windows, data.calib_pool, data.data_source),
                        **({"data_file": file_fingerprint(cfg.data_file)} if cfg.data_file else {})}
    if cfg.resume:
        checkpoint.check_fingerprints(out_dir, ctx.fingerprints)
        ctx.evaluated.update(ctx.journal.load())
    if is_main:
        warn_partial_coverage(cfg, ctx.coverage)
    return ctx


def warn_partial_coverage(cfg: RunConfig, cov: dict) -> bool:
    """Warn (naming the largest missing tensors) when the run scores less than every matrix weight
    although the user filtered nothing; returns whether it warned."""
    if cov["scored_share_of_matrix_weights"] >= 1.0 or cfg.include or cfg.exclude or cfg.quantize:
        return False  # (--quantize leaves embeddings and the head out on purpose; coverage lists them)
    missing = sorted(((n, e["numel"]) for n, e in cov["excluded"].items()), key=lambda x: -x[1])
    log.warning("scoring %.1f %% of the model's matrix weights; the largest tensors not scored: %s",
                100 * cov["scored_share_of_matrix_weights"], ", ".join(f"{n} ({c:,})" for n, c in missing[:5]))
    return True


def scorable_targets(cfg: RunConfig, model) -> tuple[list[Target], dict[str, str]]:
    """The targets of ``--targets``/``--include``/``--exclude`` that every metric of the run can score,
    and the ones some metric cannot (name -> reason, warned about and recorded, never dropped
    silently).  Several metrics score the same weights, so that their Top-Ks can be compared."""
    found = find_targets(model, cfg.include, cfg.exclude, cfg.targets)
    excluded: dict[str, str] = {}
    for m in cfg.metrics:
        can = METRICS[m].can_score or (lambda t: None)
        for t in found:
            if t.name not in excluded and (why := can(t)) is not None:
                excluded[t.name] = f"{m}: {why}"
    if excluded:
        log.warning("%s cannot score %d tensor(s), excluded: %s", ", ".join(cfg.metrics), len(excluded),
                    ", ".join(list(excluded)[:5]) + (" ..." if len(excluded) > 5 else ""))
    targets = [t for t in found if t.name not in excluded]
    if not targets:
        raise UsageError(f"{', '.join(cfg.metrics)} can score none of the selected weights "
                         f"({next(iter(excluded.values()))})")
    return targets, excluded


def _run(cfg: RunConfig, choice: DeviceChoice, device: str, out_dir: Path, manifest: Manifest, is_main: bool) -> dict:
    with manifest.recording():
        ctx = _load(cfg, choice, device, out_dir, manifest, is_main)
        views = {m: ctx.view(m) for m in cfg.metrics}
        if is_main:  # a resumed run keeps the config.json (and the primary seed's statistics) it started with
            for view in ({ctx.out_dir: ctx} | {v.out_dir: v for v in views.values()}).values():
                if not cfg.resume:
                    view.out_dir.mkdir(parents=True, exist_ok=True)
                    records.write_config(view)
                for name in ("config.json", "sensitivity_stats.json", "score_distribution.npz"):
                    if (view.out_dir / name).is_file():
                        view.manifest.add_file(name)
        seeds = [_seed(ctx, s, primary=(i == 0)) for i, s in enumerate(cfg.seeds)]
        results = {m: [s.results[m] for s in seeds] for m in cfg.metrics}
        stab = {m: _stability(views[m], results[m]) for m in cfg.metrics}
        rows = {m: _write_selections(views[m], results[m], stab[m]) if is_main else [] for m in cfg.metrics}
        agreement = None
        if cfg.multi:
            agreement = agreement_summary(list(cfg.metrics), list(cfg.seeds), cfg.topk, cfg.mode,
                                          {str(s): r.agreement for s, r in zip(cfg.seeds, seeds)})
            if is_main:
                records.write_json(out_dir / "metric_agreement.json", agreement)
                manifest.add_file("metric_agreement.json")
        sw = None
        if cfg.detect_super_weights:
            with manifest.phase("super_weights"):
                detected = detect_super_weights(ctx)
            sw = {m: with_overlap(views[m], detected, results[m]) for m in cfg.metrics}
            if is_main:
                for m, view in views.items():
                    for name in write_super_weights(sw[m], view.out_dir):
                        view.manifest.add_file(name)
        perturbation = {m: None for m in cfg.metrics}
        quant = {m: None for m in cfg.metrics}
        if cfg.perturb or cfg.quantize:
            base = baseline_perplexity(ctx)
            for m, view in views.items():
                if cfg.perturb:
                    perturbation[m] = _perturb(view, results[m], base)
                else:
                    quant[m] = quantization_results(view, results[m], base, sw[m] if sw else None)
        if not is_main:
            return {"out_dir": str(out_dir), "perturbation": perturbation[cfg.metrics[0]] if not cfg.multi
                    else perturbation}
        return _write_results(ctx, views, rows, stab, perturbation, sw, agreement, quant)


def _seed(ctx: RunContext, seed: int, primary: bool) -> SeedScores:
    """One seed's selections: from its checkpoint when resuming a run that finished it, else scored
    and selected now, then checkpointed (rank 0) before anything else happens."""
    if ctx.cfg.resume and (done := checkpoint.load_seed(ctx.out_dir, seed)) is not None:
        log.info("seed %d: selections read from its checkpoint (not scored again)", seed)
        return done
    scored = score_seed(ctx, seed, write_stats=primary and ctx.is_main)
    if ctx.is_main:
        checkpoint.save_seed(ctx.out_dir, seed, scored)
    fault_point(f"seed_done:{seed}")  # tests: killed right after a seed's checkpoint
    return scored


def _stability(view: RunContext, results: list[SeedResult]) -> dict | None:
    cfg = view.cfg
    if not (cfg.stability_check and len(results) >= 2):
        return None
    stab = stability_summary([r.top.indices for r in results], list(cfg.seeds), cfg.topk, cfg.metric, cfg.mode)
    log.info("Mean Jaccard overlap: %.3f (%s)", stab["jaccard_mean"], cfg.metric)
    return stab


def _perturb(view: RunContext, results: list[SeedResult], base: dict) -> dict:
    """One metric's conditions (Top-K and controls) and sweep for every seed, and their statistics."""
    cfg = view.cfg
    blocks = [evaluate_conditions(view, r, base) for r in results]
    sweeps = [evaluate_sweep(view, r, base, b) for r, b in zip(results, blocks)] if cfg.topk_sweep else None
    bit = resolve_bit(view.targets[0].param.dtype, cfg.bit_index) if cfg.perturb == "bit_flip" else None
    return perturbation_results(cfg, view.data, blocks, bit, sweeps, controls_info(view))


def controls_info(ctx: RunContext) -> dict | None:
    """bottom_k's ineligible weights: the exact zeros, when the perturbation leaves them unchanged."""
    if "bottom_k" not in ctx.cfg.controls or not control_context(ctx.cfg, []).zeros_unchanged:
        return None
    zeros = sum(int((t.param == 0).sum()) for t in ctx.targets)
    return {"bottom_k": {"ineligible_weights": zeros,
                         "reason": f"exact zeros, which {ctx.cfg.perturb} leaves unchanged, are not drawn"}}


def detect_super_weights(ctx: RunContext) -> dict:
    """The data-free detector of :mod:`esa.superweights.detect` (on the prompt or the first calibration
    windows) and its ablation on the evaluation windows (once per run, whatever the metrics)."""
    cfg, data = ctx.cfg, ctx.data
    if cfg.resume and (done := checkpoint.load_json(ctx.out_dir, "super_weights.json")) is not None:
        log.info("super weights: read from the checkpoint (not detected again)")
        return done
    input_ids = detection_input(ctx.tokenizer, cfg.super_weight_prompt, data.calib_pool, cfg.detect_on_data)
    settings = {"model": cfg.model, "detect_on": "data" if cfg.detect_on_data else "prompt",
                "prompt": None if cfg.detect_on_data else cfg.super_weight_prompt or DEFAULT_PROMPT,
                "data_source": data.data_source, "eval_windows": len(data.eval_windows), "max_length": cfg.max_length}
    sw = run_super_weights(ctx.model, input_ids, data.eval_windows, threshold=cfg.super_weight_threshold,
                           max_super_weights=cfg.max_super_weights, batch_size=cfg.batch_size, seed=cfg.seeds[0],
                           tokenizer=ctx.tokenizer, settings=settings)
    if ctx.is_main:
        checkpoint.save_json(ctx.out_dir, "super_weights.json", sw)
    return sw


def with_overlap(view: RunContext, sw: dict, results: list[SeedResult]) -> dict:
    """The detector's result with the candidates' ranks in each seed's Top-K of this metric."""
    cfg = view.cfg
    return {**sw, "topk_overlap": {"metric": cfg.metric, "mode": cfg.mode, "k": cfg.topk, "per_seed": {
        str(r.seed): overlap_with_topk(sw["candidates"], r.top.ranked(view.names)) for r in results}}}


def _write_selections(ctx: RunContext, results: list[SeedResult], stab: dict | None) -> list[list]:
    """Rank 0, before any evaluation (so a crash there loses nothing): Top-K table and stability."""
    rows = records.write_top_weights(ctx, results)
    ctx.manifest.add_file("top_weights.csv")
    ctx.manifest.data["calibration_windows"] = {str(r.seed): r.calibration_windows for r in results}
    ctx.manifest.data["world_size"] = distributed.world_size()
    if stab is not None:
        records.write_json(ctx.out_dir / "stability_summary.json", stab)
        ctx.manifest.add_file("stability_summary.json")
    ctx.manifest.save()
    return rows


def _write_results(ctx: RunContext, views: dict[str, RunContext], rows: dict[str, list[list]],
                   stab: dict[str, dict | None], perturbation: dict[str, dict | None], sw: dict[str, dict] | None,
                   agreement: dict | None, quant: dict[str, dict | None]) -> dict:
    """Rank 0's remaining files: each metric's perturbation results and plots, (several metrics) the
    agreement heatmap, then every report.md; then print the summary."""
    cfg, out_dir, manifest = ctx.cfg, ctx.out_dir, ctx.manifest
    plot_paths: list[Path] = []
    for m, view in views.items():
        if perturbation[m] is not None:
            records.write_json(view.out_dir / "perturbation_results.json", perturbation[m])
            view.manifest.add_file("perturbation_results.json")
        if quant[m] is not None:  # the experiment's own picture: drawn with or without --save-plots
            records.write_json(view.out_dir / quantization.RESULTS, quant[m])
            view.manifest.add_file(quantization.RESULTS)
            with manifest.phase("plots"):
                plot_paths.append(quantization.plot(view.out_dir))
            view.manifest.add_file(quantization.PLOT)
        if cfg.save_plots:
            with manifest.phase("plots"):
                for path in plots.make_plots(view.out_dir):
                    view.manifest.add_file(str(path.relative_to(view.out_dir)))
                    plot_paths.append(path)
    if agreement is not None:  # the comparison's own picture: drawn with or without --save-plots
        with manifest.phase("plots"):
            heatmap = metrics_report.agreement_heatmap(out_dir)
        manifest.add_file(heatmap.name)
        plot_paths.append(heatmap)
    # report.md is always written (text, cheap; plot sections only with --save-plots), after the
    # manifest says success so that the report quotes the final status; if it fails, the
    # recording() block turns the manifest to failed
    for view in views.values():
        view.manifest.add_file("report.md")
    manifest.add_file("report.md")
    fault_point("report")  # tests: killed while the outputs are being written
    manifest.finish("success")
    for view in views.values():
        report_md.write_report(view.out_dir)
    if cfg.multi:
        report_md.write_report(out_dir)
        print(metrics_report.console_summary(out_dir), flush=True)
    else:
        m = cfg.metric
        text = summary.console_summary(cfg.to_json(), perturbation[m], stab[m], rows[m][:5], ctx.coverage)
        text += "".join(f"\n{line}" for line in quantization.console_lines(out_dir))
        print(text + (f"\n{format_table(sw[m])}" if sw is not None else ""), flush=True)
    print(summary.files_footer(out_dir, plot_paths), flush=True)
    return {"out_dir": str(out_dir), "perturbation": perturbation if cfg.multi else perturbation[cfg.metric],
            "agreement": agreement, "quantization": quant if cfg.multi else quant[cfg.metric]}
