"""The measuring half of a run: every enabled experiment's conditions, and the super-weight search,
measured by the run's evaluators (:class:`esa.evaluators.measure.Measurer`, which journals each
record so that ``--resume`` skips it)."""

from __future__ import annotations

import logging
import math

from esa.evaluators.registry import Measured
from esa.experiment.registry import EXPERIMENTS, Experiment, Rows, SeedSelections
from esa.runner import checkpoint
from esa.runner.context import RunContext
from esa.superweights.ablation import detection_input, overlap_with_topk, run_super_weights
from esa.superweights.config import DEFAULT_PROMPT

log = logging.getLogger("esa")


def experiments(ctx: RunContext) -> list[Experiment]:
    """The run's enabled experiments, built on ``ctx`` (one metric's view)."""
    return [EXPERIMENTS[name](ctx) for name in ctx.cfg.experiment.enabled()]


def measure_experiments(view: RunContext, selections: list[SeedSelections]) -> dict[str, dict]:
    """Each enabled experiment's results for one metric: every condition of every seed measured
    (``{experiment name: results-file content}``)."""
    return measure_all(view, selections)[0]


def measure_all(view: RunContext, selections: list[SeedSelections]) -> tuple[dict[str, dict], list[Measured]]:
    """:func:`measure_experiments`, and each experiment's measured rows (for the evaluators' own
    results files, :meth:`esa.evaluators.measure.Measurer.results_files`)."""
    out, measured = {}, []
    for exp in experiments(view):
        rows: Rows = {}
        base = view.measurer.baseline()
        with view.manifest.phase("evaluation"):
            for sel in selections:
                for group, cond in exp.conditions(sel):
                    row = view.measurer.measure(cond)
                    rows.setdefault(sel.seed, {}).setdefault(group, {})[cond.name] = row
                    log.info("%s: perplexity %.6g (ratio %.6g)", cond.label, row.get("ppl", math.nan),
                             row.get("ratio", math.nan))
        out[exp.name] = exp.results(rows, base)
        names = list(dict.fromkeys(c for groups in rows.values() for conds in groups.values() for c in conds))
        measured.append(Measured(exp.name, rows, exp.group_by, tuple(exp.pairs(names))))
    return out, measured


def detect_super_weights(ctx: RunContext) -> dict:
    """The data-free detector of :mod:`esa.superweights.detect` (on the prompt or the first calibration
    windows) and its ablation measured by the run's evaluators (once per run, whatever the metrics)."""
    cfg, data, sw = ctx.cfg, ctx.data, ctx.cfg.super_weights
    if cfg.output.resume and (done := checkpoint.load_json(ctx.out_dir, "super_weights.json")) is not None:
        log.info("super weights: read from the checkpoint (not detected again)")
        return done
    input_ids = detection_input(ctx.tokenizer, sw.super_weight_prompt, data.calib_pool, sw.detect_on_data)
    settings = {"model": cfg.model.model, "detect_on": "data" if sw.detect_on_data else "prompt",
                "prompt": None if sw.detect_on_data else sw.super_weight_prompt or DEFAULT_PROMPT,
                "data_source": data.data_source, "eval_windows": len(data.eval_windows),
                "max_length": cfg.data.max_length}
    found = run_super_weights(ctx.model, input_ids, ctx.measurer, threshold=sw.super_weight_threshold,
                              max_super_weights=sw.max_super_weights,
                              seed=cfg.scoring.seeds[0], tokenizer=ctx.tokenizer, settings=settings)
    if ctx.is_main:
        checkpoint.save_json(ctx.out_dir, "super_weights.json", found)
    return found


def with_overlap(view: RunContext, sw: dict, selections: list[SeedSelections]) -> dict:
    """The detector's result with the candidates' ranks in each seed's Top-K of this metric."""
    return {**sw, "topk_overlap": {"metric": view.metric, "mode": view.mode, "k": view.topk, "per_seed": {
        str(r.seed): overlap_with_topk(sw["candidates"], r.top.ranked(view.names)) for r in selections}}}
