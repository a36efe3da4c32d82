"""One seed: draw its calibration windows, score, select the Top-K and controls, drop the scores.

Only the selections (O(k)) and small summaries outlive a seed, so peak memory does not grow with
the number of seeds.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
from dataclasses import dataclass

import torch

from esa.analysis.stats import all_stats
from esa.config import RunConfig
from esa.experiment import controls, selection
from esa.experiment.perturb import PERTURBATIONS
from esa.experiment.registry import EXPERIMENTS, SeedSelections
from esa.experiment.rows import row_length
from esa.experiment.sharded import Split
from esa.metrics import MetricContext, Scored, score_metrics
from esa.model import distributed
from esa.model.placement import checkpointed_blocks
from esa.model.targets import Target
from esa.outdir import atomic
from esa.outdir.journal import fault_point
from esa.runner import shard_stats
from esa.runner.agreement import seed_agreement
from esa.runner.context import RunContext
from esa.runner.score_sample import write_score_sample
from esa.seeding import numpy_rng

log = logging.getLogger("esa")


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


@dataclass
class SeedScores:
    """One seed of a run: each metric's :class:`SeedResult`, and (several metrics) their agreement."""

    results: dict[str, SeedSelections]
    agreement: dict[str, dict] | None = None


def score_seed(ctx: RunContext, seed: int, write_stats: bool) -> SeedScores:
    """Score with this seed's calibration windows (every metric of the run, sharing the passes),
    select each metric's Top-K and controls (for --topk and every --topk-sweep k), write the primary
    seed's statistics and score sample per metric, and drop the scores.

    With several metrics, each metric's scores stay alive until every metric has been selected (the
    Spearman agreement needs each metric's scores on the other metrics' Top-Ks): one fp32 buffer per
    metric and weight, the same as the scoring accumulators.
    """
    cfg, model, targets, data, manifest = ctx.cfg, ctx.model, ctx.targets, ctx.data, ctx.manifest
    chosen = data.calibration_indices(numpy_rng(seed, "calibration"), cfg.data.max_samples)
    windows = data.calib_pool[torch.from_numpy(chosen)]
    log.info("seed %d: scoring %d target tensors with %s on %d calibration windows", seed, len(targets),
             ", ".join(cfg.scoring.metrics), len(windows))
    checkpointing = cfg.distributed.gradient_checkpointing
    mctx = MetricContext(seed=seed, recomputes_forward=checkpointing, **cfg.scoring.options)
    results: dict[str, SeedSelections] = {}
    tops: dict[str, selection.Selection] = {}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    with (checkpointed_blocks(model) if checkpointing else contextlib.nullcontext()):
        scoring = score_metrics(list(cfg.scoring.metrics), model, targets, windows, cfg.data.batch_size, mctx)
        while True:
            with manifest.phase("scoring"):
                scored = next(scoring, None)
            if scored is None:
                break
            selected = _select(ctx.leaves(scored.metric), scored, seed, chosen.tolist(), write_stats)
            results.update(selected)
            tops[scored.metric] = next(iter(selected.values())).top  # the same Top-K for every perturbation
            fault_point(f"scoring:{seed}")  # tests: killed while this seed is being scored
            if cfg.multi:
                kept[scored.metric] = scored.scores
            del scored
    agreement = None
    if cfg.multi:
        with manifest.phase("agreement"):
            agreement = seed_agreement(kept, tops, scores_split(targets))
    del kept  # only the selections outlive this function: memory stays flat in the number of seeds
    release_memory()
    return SeedScores(results, agreement)


def _select(leaves: dict[str, RunContext], scored: Scored, seed: int, windows: list[int], write_stats: bool
            ) -> dict[str, SeedSelections]:
    """One metric's Top-K and controls of one seed for each of its ``leaves`` (one per perturbation, see
    :meth:`RunContext.leaves`: the Top-K is ranked once; bottom_k is drawn again only for a perturbation
    whose exact zeros count differently); its statistics and score sample, computed once for the
    primary seed and written into every leaf's folder."""
    view = next(iter(leaves.values()))
    names, scores = view.names, scored.scores
    out: dict[str, SeedSelections] = {}
    with view.manifest.phase("selection"):
        chosen: dict[bool, dict] = {}  # by zeros_unchanged: what of the selection depends on the perturbation
        for key, leaf in leaves.items():
            cctx = control_context(leaf.cfg, leaf.targets)
            if cctx.zeros_unchanged not in chosen:
                chosen[cctx.zeros_unchanged] = select_all(leaf.cfg, scores, names, seed, cctx)
                _check_same(leaf, seed, chosen[cctx.zeros_unchanged])
            chosen_k = chosen[cctx.zeros_unchanged]
            top, controls = chosen_k[view.topk]
            out[key] = SeedSelections(seed, top, controls, windows, {k: v for k, v in chosen_k.items()
                                                                     if k != view.topk})
    if write_stats:
        _write_stats(list(leaves.values()), scored, seed, out[next(iter(out))].top)
    kept = {}
    with view.manifest.phase("selection"):
        for name in view.cfg.experiment.enabled():  # e.g. pruning masks: the scores are freed after this seed
            if got := EXPERIMENTS[name].keep(view, scores):
                kept[name] = got
    return {key: dataclasses.replace(sel, kept=kept) for key, sel in out.items()} if kept else out


def _check_same(view: RunContext, seed: int, chosen_k: dict) -> None:
    """Under torchrun every rank must have chosen the same weights (else the ranks would measure different
    conditions); the payload is O(k) Python objects, only built when there are ranks."""
    if distributed.active():
        names = view.names
        distributed.check_same(f"the {view.cfg.metric} selections of seed {seed}", repr(
            [(k, top_k.ranked(names), {c: s.ranked(names) for c, s in ctl.items()})
             for k, (top_k, ctl) in sorted(chosen_k.items())]).encode())


def _write_stats(leaves: list[RunContext], scored: Scored, seed: int, top: selection.Selection) -> None:
    """The primary seed's ``sensitivity_stats.json`` and ``score_distribution.npz``, computed once (every
    rank takes part when the scores are split) and written by rank 0 into each leaf's folder."""
    view, scores = leaves[0], scored.scores
    split = scores_split(view.targets)
    if not (view.is_main or split is not None):
        return
    with view.manifest.phase("stats"):
        shapes = {t.name: t.shape for t in view.targets}
        stats = all_stats(scores, shapes) if split is None else shard_stats.all_stats(scores, shapes)
        for name, extra in scored.extra_stats.items():
            stats[name].update(extra)
        if view.is_main:
            for leaf in leaves:
                leaf.out_dir.mkdir(parents=True, exist_ok=True)
        sample = view.out_dir / "score_distribution.npz"
        write_score_sample(sample if view.is_main else None, scores, view.names, top,
                           numpy_rng(seed, "score_sample"),
                           {"metric": view.cfg.metric, "mode": view.mode, "k": view.topk, "seed": seed}, split)
    if not view.is_main:
        return
    for leaf in leaves:
        if leaf is not view:  # the same sample: sampled once, copied
            atomic.atomic_write_bytes(leaf.out_dir / sample.name, sample.read_bytes())
        atomic.write_json(leaf.out_dir / "sensitivity_stats.json", {"metric": view.cfg.metric, "seed": seed,
                                                                    "tensors": stats})
        leaf.manifest.add_file("sensitivity_stats.json")
        leaf.manifest.add_file("score_distribution.npz")


def scores_split(targets: list[Target]) -> Split | None:
    """Under ``--shard fsdp``: where this rank's score rows sit in each whole tensor, and the ranks'
    all-gather (:mod:`esa.experiment.sharded`); None when every rank holds whole tensors."""
    if not any(distributed.sharded(t.param) for t in targets):
        return None
    return Split({t.name: (t.shape, distributed.first_row(t.param)) for t in targets}, distributed.all_gather_object)


def control_context(cfg: RunConfig, targets: list[Target]) -> controls.ControlContext:
    """The weights (this rank's rows), whether the perturbation leaves exact zeros unchanged (bottom_k's
    eligibility), and under --shard fsdp the split and a way to gather one whole weight."""
    perturb = cfg.experiment.options.perturb
    zeros_unchanged = perturb is not None and not PERTURBATIONS[perturb].changes_zero
    by_name = {t.name: t for t in targets}
    return controls.ControlContext({t.name: t.local() for t in targets}, zeros_unchanged, in_axes(targets),
                                   scores_split(targets), lambda n: by_name[n].param.full_tensor().detach())


def in_axes(targets: list[Target]) -> dict[str, int | None]:
    """Each target's input-feature axis (per_row selection: a row is everything else)."""
    return {t.name: t.axis("in") for t in targets}


def select_all(cfg: RunConfig, scores: dict[str, torch.Tensor], names: list[str], seed: int,
               cctx: controls.ControlContext | None = None
               ) -> dict[int, tuple[selection.Selection, dict[str, selection.Selection]]]:
    """Top-K and each control for --topk and every --topk-sweep k, from one pass at the largest k.

    Top-K and bottom_k of a smaller k are prefixes of the largest k's (nested under the total
    order), so the scores are ranked once; a random control is drawn per k from its own stream (named
    after it for --topk, ``<control>:k<k>`` for the others: ``random_k`` keeps the streams it always
    had), disjoint from that k's Top-K, so adding a control never changes another's draws.
    """
    mode, topk, o = cfg.scoring.mode, cfg.scoring.topk, cfg.experiment.options
    ks = sorted({topk, *o.topk_sweep})
    top_max = selection.top_k(scores, names, ks[-1], mode, need=room(cfg), in_axes=cctx.in_axes if cctx else None,
                              split=cctx.split if cctx else None)
    # a control this metric's Top-K cannot have (random_mag_k under magnitude, in a run of several metrics) is
    # skipped; the experiment's results say why
    skipped = controls.unmatched_controls(cfg.metric, o.controls)
    wanted = [c for c in o.controls if c not in skipped]
    nested = {c: controls.control(c, scores, names, ks[-1], mode, top_max, None, cctx)  # deterministic
              for c in wanted if controls.CONTROLS[c].nested}
    out = {}
    for k in ks:
        top = top_max.prefix(k, mode, names)
        out[k] = (top, {c: nested[c].prefix(k, mode, names) if c in nested else controls.control(
            c, scores, names, k, mode, top, numpy_rng(seed, c if k == topk else f"{c}:k{k}"), cctx)
            for c in wanted})
    return out


def room(cfg: RunConfig) -> int:
    """Multiples of k the weights must hold: controls drawn disjoint from the Top-K need as many again."""
    return 2 if {"random_k", "random_mag_k"} & set(cfg.experiment.options.controls) else 1


def check_sizes(cfg: RunConfig, targets: list[Target]) -> None:
    """Fail before scoring when --topk or a --topk-sweep k does not fit the weight count."""
    mode = cfg.scoring.mode
    sizes = {t.name: row_length(t.shape, t.axis("in")) if mode == "per_row" else t.numel for t in targets}
    need = room(cfg)
    selection.check_k(mode, cfg.scoring.topk, sizes, need)
    for k in cfg.experiment.options.topk_sweep:
        selection.check_k(mode, k, sizes, need, flag="--topk-sweep")
