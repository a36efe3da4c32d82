"""The perturbation experiment of a run: each seed's Top-K and controls perturbed in place,
evaluated on the fixed evaluation windows and restored; then the cross-seed statistics."""

from __future__ import annotations

import hashlib
import logging

import torch

from esa.analysis import significance
from esa.config import RunConfig
from esa.data import TokenData
from esa.experiment import selection
from esa.experiment.conditions import perplexity_row
from esa.experiment.perturb import perturbed
from esa.experiment.sweep import sweep_curve
from esa.model.forward import perplexity
from esa.runner.context import RunContext
from esa.runner.seeds import SeedResult
from esa.seeding import torch_generator

log = logging.getLogger("esa")


def baseline_perplexity(ctx: RunContext) -> dict:
    """Perplexity of the unmodified model on the evaluation windows (computed once per run)."""
    if "baseline" in ctx.evaluated:
        return dict(ctx.evaluated["baseline"])
    with ctx.manifest.phase("evaluation"):
        log.info("baseline perplexity on %d evaluation windows", len(ctx.data.eval_windows))
        base = perplexity(ctx.model, ctx.data.eval_windows, ctx.cfg.batch_size)
    log.info("baseline perplexity %.4f", base["ppl"])
    ctx.record("baseline", base)
    return dict(base)


def evaluate_conditions(ctx: RunContext, result: SeedResult, base: dict | None = None) -> dict:
    """Each condition of one seed perturbed in place, evaluated and restored (baseline if not given)."""
    if base is None:
        base = baseline_perplexity(ctx)
    conditions = _evaluate(ctx, result.seed, [("top_k", result.top), *result.controls.items()], base)
    return {"seed": result.seed, "baseline": base, "conditions": conditions}


def evaluate_sweep(ctx: RunContext, result: SeedResult, base: dict, primary: dict) -> dict[int, dict[str, dict]]:
    """``{k: {condition: row}}`` of one seed for every --topk-sweep k (the main k reuses ``primary``)."""
    cfg = ctx.cfg
    out = {}
    for k in cfg.topk_sweep:
        if k == cfg.topk:
            out[k] = primary["conditions"]
            continue
        top, controls = result.sweep[k]
        log.info("seed %d: sweep k=%d", result.seed, k)
        out[k] = _evaluate(ctx, result.seed, [("top_k", top), *controls.items()], base, stream_suffix=f":k{k}")
    return out


def evaluation_key(settings: tuple, indices: dict[str, torch.Tensor]) -> str:
    """What an evaluated condition's row depends on: ``settings`` (the perturbation or quantizer, its
    parameters, the random stream) and the chosen weights per tensor in their stored order (a
    Gaussian draw follows that order).  Equal keys, equal rows: the run's evaluation cache."""
    h = hashlib.sha256(repr(settings).encode())
    for name in sorted(indices):
        h.update(name.encode() + b"\0" + indices[name].numpy().tobytes())
    return h.hexdigest()


def _evaluate(ctx: RunContext, seed: int, conds: list[tuple[str, selection.Selection]], base: dict,
              stream_suffix: str = "") -> dict:
    """Perturb each selection in place, measure perplexity, restore; rows keyed by condition name.

    A condition whose selection, stream and perturbation equal one already evaluated in this run
    (another metric's identical random_k, say) reuses that row: the model is restored bit-exactly
    after each condition and the evaluation windows are fixed, so re-running it would give the
    same numbers."""
    cfg = ctx.cfg
    with ctx.manifest.phase("evaluation"):
        conditions = {}
        for name, sel in conds:
            stream = f"perturb:{name}{stream_suffix}"
            key = evaluation_key((cfg.perturb, cfg.perturb_scale, cfg.perturb_prob, cfg.bit_index, f"{seed}:{stream}"),
                                 sel.indices)
            if key in ctx.evaluated:
                conditions[name] = dict(ctx.evaluated[key])
                log.info("seed %d %s: the same weights as an evaluated condition (perplexity %s), not re-run", seed,
                         name, conditions[name].get("ppl"))
                continue
            gen = torch_generator(seed, stream)
            with perturbed(ctx.by_name, sel, cfg.perturb, cfg.perturb_scale, cfg.perturb_prob, gen,
                           cfg.bit_index) as info:
                row = perplexity_row(ctx.model, ctx.data.eval_windows, cfg.batch_size, base["ppl"],
                                     f"seed {seed} {name}")
            conditions[name] = {**row, **info}
            ctx.record(key, conditions[name])
            if info["n_changed"] < info["n_perturbed"]:
                log.warning("%s: only %d of %d perturbed weights changed value (the others are exactly 0, "
                            "which %s leaves unchanged)", name, info["n_changed"], info["n_perturbed"], cfg.perturb)
            log.info("seed %d %s: perplexity %s (%d weights perturbed)", seed, name, row.get("ppl"),
                     info["n_perturbed"])
    return conditions


def perturbation_results(cfg: RunConfig, data: TokenData, blocks: list[dict], bit_index: int | None,
                         sweeps: list[dict[int, dict]] | None = None, controls_info: dict | None = None) -> dict:
    """The primary seed's block where single-seed users expect it, every seed's, and statistics.

    ``summary`` and ``tests`` exist only with >= 2 seeds (absent, never zero, otherwise); ``sweep``
    (see :mod:`esa.experiment.sweep`) only with --topk-sweep; ``controls`` (what each control could
    not draw, e.g. bottom_k's exact zeros) only when a control excluded something.
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
    if controls_info:
        out["controls"] = controls_info
    if sweeps:
        out["sweep"] = sweep_curve(list(cfg.topk_sweep), cfg.topk,
                                   {str(b["seed"]): sw for b, sw in zip(blocks, sweeps)})
    return out
