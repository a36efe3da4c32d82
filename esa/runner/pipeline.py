"""The ESA run: load -> score and select per seed -> measure every condition with every evaluator ->
outputs -> report.md.

``run(cfg)`` is the whole job; the CLI only builds ``cfg``.  Nothing in here sees argparse.  The
steps live in :mod:`esa.runner.seeds` (scoring and selection per seed, every metric at once),
:mod:`esa.runner.experiments` (each enabled experiment's conditions and the super-weight search,
measured by the run's :class:`~esa.evaluators.measure.Measurer`), :mod:`esa.runner.results` (one
:class:`~esa.runner.results.MetricResult` per metric, and the files) and :mod:`esa.runner.checkpoint`
(what ``--resume`` skips: each seed's selections, each measured record, the super-weight search).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from esa.analysis.agreement import agreement_summary
from esa.analysis.stability import stability_summary
from esa.config import RunConfig, default_run_dir
from esa.data import load_spec
from esa.errors import UsageError
from esa.evaluators import EvalInputs, activations
from esa.evaluators.measure import Measurer
from esa.experiment.registry import EXPERIMENTS
from esa.metrics import METRICS
from esa.model import distributed, loading
from esa.model.device import DeviceChoice, resolve_device
from esa.model.fingerprint import data_fingerprint, file_fingerprint, weights_fingerprint
from esa.model.targets import Target, coverage, find_targets
from esa.model.weight_inputs import read_layouts
from esa.outdir.journal import Journal, fault_point
from esa.outdir.layout import claim_out_dir, describe_run
from esa.outdir.manifest import Manifest
from esa.outdir.process import ended
from esa.outdir.readers import read_json
from esa.runner import checkpoint, records
from esa.runner.context import RunContext
from esa.runner.experiments import detect_super_weights, experiments, measure_all, with_overlap
from esa.runner.results import MetricResult, RunResult, write_outputs, write_selections
from esa.runner.seeds import SeedScores, check_sizes, score_seed
from esa.superweights.ablation import ablation_measured

log = logging.getLogger("esa")


def run(cfg: RunConfig) -> RunResult:
    """Run the whole job described by ``cfg``.

    Under torchrun (see :mod:`esa.model.distributed`) every rank runs this; the ranks share scoring and
    evaluation, and only rank 0 creates the out-dir, writes files and prints.
    """
    m = cfg.model
    choice = resolve_device(m.device, m.device_explicit, m.dtype, m.dtype_explicit)
    device = distributed.local_device(choice.device)
    # --shard fsdp: a device mesh of every rank (FSDP2); otherwise plain data parallelism (or one process)
    with _group(cfg, device) as mesh:
        is_main = distributed.is_main()
        out = cfg.output
        out_dir = Path(out.out_dir) if out.out_dir else default_run_dir(cfg)
        if out.resume and checkpoint.finished(out_dir):
            if is_main:
                print(f"{out_dir}: this run already finished ({describe_run(out_dir)}); nothing to resume", flush=True)
            return RunResult(out_dir, finished_before=True)
        if is_main:
            claim_out_dir(out_dir, out.resume, out.overwrite)
            for w in choice.warnings:
                log.warning(w)
        if cfg.scoring.stability_check and len(cfg.scoring.seeds) < 2:
            log.warning("--stability-check needs at least two --seeds: no stability_summary.json is written")
        skips = checkpoint.resumable(out_dir, cfg.scoring.seeds) if out.resume else None
        if skips is not None and is_main:
            log.info("resuming %s: the run %s; skipping %s", out_dir,
                     ended(read_json(out_dir, "experiment_manifest.json") or {}), skips)
        manifest = Manifest(out_dir, write=is_main, resume=skips)
        try:
            with manifest.recording():
                ctx = load(cfg, choice, device, out_dir, manifest, mesh)
                return _run(ctx)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _group(cfg: RunConfig, device: str):
    """The process group of the run: a device mesh of every rank for ``--shard fsdp`` (yields the mesh),
    plain data parallelism under torchrun, or nothing in one process (yields None)."""
    if cfg.distributed.shard:
        from esa.model import fsdp

        return fsdp.process_mesh(device)
    return distributed.process_group(device)


def load(cfg: RunConfig, choice: DeviceChoice, device: str, out_dir: Path, manifest: Manifest, mesh=None
         ) -> RunContext:
    """Model, targets, data and evaluators, checked before any scoring (a bad k or bit fails in seconds);
    ``mesh``: the device mesh of ``--shard fsdp`` (the model is then loaded shard by shard)."""
    is_main = distributed.is_main()
    with manifest.phase("load_model"):
        log.info("loading model %s on %s in %s%s", cfg.model.model, device, choice.dtype,
                 f", sharded over {distributed.world_size()} ranks" if cfg.distributed.shard else "")
        if distributed.active():  # rank 0 converts the embedded model once; the others wait for it
            if is_main:
                loading.prepare_source(cfg.model.model)
            distributed.barrier()
        if cfg.distributed.shard:
            from esa.model.fsdp_load import load_sharded  # torch.distributed's FSDP only for a sharded run

            model, tok = load_sharded(cfg.model.model, device, choice.dtype, mesh)
        else:
            model, tok = loading.load_model(cfg.model.model, device, choice.dtype, cfg.distributed.device_map,
                                            cfg.distributed.offload)
    targets, excluded = scorable_targets(cfg, model)
    for name in cfg.experiment.enabled():  # e.g. quantization: the Top-K is chosen among the quantized weights
        targets, skipped = EXPERIMENTS[name].restrict(model, targets, bool(cfg.scoring.include))
        excluded.update(skipped)
    check_sizes(cfg, targets)
    with manifest.phase("load_data"):
        data = load_spec(tok, cfg.data)
    journal = Journal(out_dir, write=is_main)
    done = journal.load() if cfg.output.resume else None
    evaluators = cfg.evaluation.build(EvalInputs(data.eval_windows, cfg.data.batch_size, tok, model))
    measurer = Measurer(model, evaluators, journal, done)
    ctx = RunContext(cfg, choice, model, tok, targets, data, out_dir, manifest, is_main,
                     measurer=measurer, restoring=restorer(cfg, model, data.eval_windows, measurer))
    for leaf in ctx.leaves(cfg.scoring.metrics[0]).values():  # each perturbation's own experiment
        for exp in experiments(leaf):
            exp.check()  # e.g. the bit of --bit-index in the model's dtype: fail before hours of scoring
    ctx.coverage = coverage(model, targets, excluded)
    ctx.fingerprints = {"model_weights": weights_fingerprint(model),
                        "data": data_fingerprint(data.eval_windows, data.calib_pool, data.data_source),
                        **({"data_file": file_fingerprint(cfg.data.data_file)} if cfg.data.data_file else {})}
    if cfg.output.resume:
        checkpoint.check_fingerprints(out_dir, ctx.fingerprints)
    if is_main:
        warn_partial_coverage(cfg, ctx.coverage)
    return ctx


def restorer(cfg: RunConfig, model: torch.nn.Module, windows: torch.Tensor, measurer: Measurer
             ) -> Callable[[], AbstractContextManager[dict]] | None:
    """``--restore-activations``: the intervention writing the baseline's massive activations back on
    the evaluation ``windows`` (read from the activations evaluator's baseline record when first
    used: the measurer measures the baseline before any condition); None without it."""
    if not cfg.experiment.options.restore_activations or activations.NAME not in cfg.evaluation.evaluate:
        return None
    return lambda: activations.restoring(model, windows, measurer.baselines()[activations.NAME])


def warn_partial_coverage(cfg: RunConfig, cov: dict) -> bool:
    """Warn (naming the largest missing tensors) when the run scores less than every matrix weight
    although the user filtered nothing; returns whether it warned."""
    if (cov["scored_share_of_matrix_weights"] >= 1.0 or cfg.scoring.include or cfg.scoring.exclude
            or cfg.experiment.options.quantize or cfg.experiment.options.prune or cfg.experiment.options.prune_pattern):
        return False  # (--quantize and --prune leave embeddings and the head out on purpose; coverage lists them)
    missing = sorted(((n, e["numel"]) for n, e in cov["excluded"].items()), key=lambda x: -x[1])
    log.warning("scoring %.1f %% of the model's matrix weights; the largest tensors not scored: %s",
                100 * cov["scored_share_of_matrix_weights"], ", ".join(f"{n} ({c:,})" for n, c in missing[:5]))
    return True


def scorable_targets(cfg: RunConfig, model) -> tuple[list[Target], dict[str, str]]:
    """The targets of ``--targets``/``--include``/``--exclude`` that every metric of the run can score,
    and the ones some metric cannot (name -> reason, warned about and recorded, never dropped
    silently).  Several metrics score the same weights, so that their Top-Ks can be compared."""
    s = cfg.scoring
    found = read_layouts(model, find_targets(model, s.include, s.exclude, s.targets))
    excluded: dict[str, str] = {}
    for m in s.metrics:
        can = METRICS[m].can_score or (lambda t: None)
        for t in found:
            if t.name not in excluded and (why := can(t)) is not None:
                excluded[t.name] = f"{m}: {why}"
    if excluded:
        log.warning("%s cannot score %d tensor(s), excluded: %s", ", ".join(s.metrics), len(excluded),
                    ", ".join(list(excluded)[:5]) + (" ..." if len(excluded) > 5 else ""))
    targets = [t for t in found if t.name not in excluded]
    if not targets:
        raise UsageError(f"{', '.join(s.metrics)} can score none of the selected weights "
                         f"({next(iter(excluded.values()))})")
    return targets, excluded


def _run(ctx: RunContext) -> RunResult:
    cfg, is_main = ctx.cfg, ctx.is_main
    leaves = ctx.all_leaves()  # what each single-metric, single-perturbation run would see (RunContext.leaves)
    if is_main:  # a resumed run keeps the config.json (and the primary seed's statistics) it started with
        folders = (ctx, *(ctx.view(m) for m in cfg.scoring.metrics), *leaves.values())
        for view in {v.out_dir: v for v in folders}.values():
            if not cfg.output.resume:
                view.out_dir.mkdir(parents=True, exist_ok=True)
                records.write_config(view)
            for name in ("config.json", "sensitivity_stats.json", "score_distribution.npz"):
                if (view.out_dir / name).is_file():
                    view.manifest.add_file(name)
    seeds = [_seed(ctx, s, primary=(i == 0)) for i, s in enumerate(cfg.scoring.seeds)]
    run = RunResult(ctx.out_dir)
    for key, leaf in leaves.items():
        run.metrics[key] = MetricResult(leaf.metric, [s.results[key] for s in seeds])
        run.metrics[key].stability = _stability(leaf, run.metrics[key])
        if is_main:
            write_selections(leaf, run.metrics[key])
    if cfg.multi:
        s = cfg.scoring
        run.agreement = agreement_summary(list(s.metrics), list(s.seeds), s.topk, s.mode,
                                          {str(seed): r.agreement for seed, r in zip(s.seeds, seeds)})
        if is_main:
            records.write_json(ctx.out_dir / "metric_agreement.json", run.agreement)
            ctx.manifest.add_file("metric_agreement.json")
    if cfg.super_weights.detect_super_weights:
        with ctx.manifest.phase("super_weights"):
            ctx.super_weights = detect_super_weights(ctx)
    leaves = ctx.all_leaves()  # after the detector: they carry its result
    for key, view in leaves.items():
        res = run.metrics[key]
        if ctx.super_weights is not None:
            res.super_weights = with_overlap(view, ctx.super_weights, res.selections)
        res.experiments, measured = measure_all(view, res.selections)
        if ctx.super_weights is not None and (abl := ablation_measured(ctx.super_weights)) is not None:
            measured.append(abl)
        res.evaluations = ctx.measurer.results_files(measured)  # e.g. task_results.json
    if is_main:
        write_outputs(ctx, leaves, run)
    return run


def _seed(ctx: RunContext, seed: int, primary: bool) -> SeedScores:
    """One seed's selections: from its checkpoint when resuming a run that finished it, else scored
    and selected now, then checkpointed (rank 0) before anything else happens."""
    if ctx.cfg.output.resume and (done := checkpoint.load_seed(ctx.out_dir, seed)) is not None:
        log.info("seed %d: selections read from its checkpoint (not scored again)", seed)
        return done
    scored = score_seed(ctx, seed, write_stats=primary)  # every rank takes part in sharded statistics
    if ctx.is_main:
        checkpoint.save_seed(ctx.out_dir, seed, scored)
    fault_point(f"seed_done:{seed}")  # tests: killed right after a seed's checkpoint
    return scored


def _stability(view: RunContext, res: MetricResult) -> dict | None:
    s = view.cfg.scoring
    if not (s.stability_check and len(res.selections) >= 2):
        return None
    stab = stability_summary([r.top.indices for r in res.selections], list(s.seeds), s.topk, view.metric, s.mode)
    log.info("Mean Jaccard overlap: %.3f (%s)", stab["jaccard_mean"], view.metric)
    return stab
