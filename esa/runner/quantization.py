"""The quantization experiment (``--quantize rtn``): does keeping the Top-K in full precision rescue
low-bit round-to-nearest quantization?

Per block size, on the fixed evaluation windows (the quantizer: :mod:`esa.experiment.quantize`):

* ``none``: plain RTN of every quantized tensor;
* ``protect_topk``: the seed's Top-K left out of each block's min/max and kept exact;
* ``protect_random_k``: as many random weights of the same tensors (per tensor the Top-K's count,
  drawn disjoint from it from the seed's ``protect_random_k`` stream), protected the same way;
* ``protect_super_weights``: the detector's candidates (with ``--detect-super-weights``).

``none`` and ``protect_super_weights`` do not depend on the seed: they are evaluated once and their
row repeated per seed (the run's evaluation cache, :mod:`esa.runner.perturbation`).  The model is
never written (the quantized weights are swapped in per forward), so it is bit-exactly itself
after every condition.
"""

from __future__ import annotations

import logging

import torch

from esa.analysis import significance
from esa.experiment.conditions import perplexity_row
from esa.experiment.controls import sample_excluding
from esa.experiment.quantize import RTN, quantization_error, quantized
from esa.model.targets import Target
from esa.runner.context import RunContext
from esa.runner.perturbation import evaluation_key
from esa.runner.seeds import SeedResult
from esa.seeding import numpy_rng

log = logging.getLogger("esa")

SCHEME = ("asymmetric min-max round-to-nearest per block, integer zero point, range widened to hold 0, "
          "round half to even; protected weights out of the block's min/max and kept exact")


def quantizable(model: torch.nn.Module, targets: list[Target], included: bool) -> tuple[list[Target], dict[str, str]]:
    """The targets RTN quantizes: the linear weights (matrices and fused experts read as linear maps),
    not embeddings, the output head or 1-D norms and biases, unless ``--include`` named them
    (``included``); the others with the reason."""
    if included:
        return targets, {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    keep, skipped = [], {}
    for t in targets:
        if any(u.kind == "embedding" for u in t.uses) or t.param is head_weight:
            skipped[t.name] = "not quantized: embedding or output head (--include it to quantize it)"
        elif t.param.ndim < 2:
            skipped[t.name] = "not quantized: 1-D norm scale or bias (--include it to quantize it)"
        else:
            keep.append(t)
    return keep, skipped


def random_protection(top: dict[str, torch.Tensor], sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Per tensor, as many random weights as the Top-K holds there, disjoint from it (sorted flat indices)."""
    rng = numpy_rng(seed, "protect_random_k")
    return {n: sample_excluding(sizes[n], len(idx), idx, rng).sort().values for n, idx in top.items() if len(idx)}


def candidate_protection(sw: dict | None, names: set[str]) -> dict[str, torch.Tensor] | None:
    """The super-weight candidates (in quantized tensors) as flat indices, or None without the detector."""
    if sw is None:
        return None
    out: dict[str, list[int]] = {}
    for c in sw["candidates"]:
        if c["param"] in names:
            out.setdefault(c["param"], []).append(int(c["flat_index"]))
    return {n: torch.tensor(sorted(set(v)), dtype=torch.int64) for n, v in out.items()}


def evaluate(ctx: RunContext, spec: RTN, protect: dict[str, torch.Tensor], base: dict, label: str) -> dict:
    """One condition: perplexity with the quantized weights, the protected count and the error."""
    key = evaluation_key(("rtn", spec.bits, spec.block, spec.clip_z), protect)
    if key in ctx.evaluated:
        return dict(ctx.evaluated[key])
    with ctx.manifest.phase("evaluation"), quantized(ctx.targets, spec, protect):
        row = perplexity_row(ctx.model, ctx.data.eval_windows, ctx.cfg.batch_size, base["ppl"], label)
    mse, n = quantization_error(ctx.targets, spec, protect)
    row.update(protected=sum(len(v) for v in protect.values()), quantized_weights=n, mse_unprotected=mse)
    log.info("%s: perplexity %s (ratio %.4g, %d weights protected)", label, row["ppl"], row["ratio"], row["protected"])
    ctx.record(key, row)
    return dict(row)


def quantization_results(ctx: RunContext, results: list[SeedResult], base: dict, sw: dict | None) -> dict:
    """``quantization_results.json`` of one metric: per seed, block size and condition, and the
    cross-seed statistics of protect_topk vs protect_random_k."""
    cfg = ctx.cfg
    sizes = {t.name: t.numel for t in ctx.targets}
    supers = candidate_protection(sw, set(sizes))
    per_seed: dict[str, dict] = {}
    for r in results:
        top = {n: i for n, i in r.top.indices.items() if len(i)}
        conditions = {"none": {}, "protect_topk": top, "protect_random_k": random_protection(top, sizes, r.seed)}
        if supers is not None:
            conditions["protect_super_weights"] = supers
        per_seed[str(r.seed)] = {
            str(b): {c: evaluate(ctx, RTN(cfg.bits, b, cfg.clip_z), p, base, f"seed {r.seed} block {b} {c}")
                     for c, p in conditions.items()} for b in cfg.block_sizes}
    out = {"quantizer": {"method": cfg.quantize, "bits": cfg.bits, "clip_z": cfg.clip_z, "scheme": SCHEME,
                         "quantized_tensors": len(ctx.targets), "quantized_weights": sum(sizes.values())},
           "metric": cfg.metric, "mode": cfg.mode, "k": cfg.topk, "block_sizes": [str(b) for b in cfg.block_sizes],
           "eval_windows": len(ctx.data.eval_windows), "baseline": base, "seeds": [r.seed for r in results],
           "per_seed": per_seed}
    if len(results) >= 2:
        out["summary"], out["tests"] = {}, {}
        for b in map(str, cfg.block_sizes):
            rows = {s: per_seed[s][b] for s in per_seed}
            out["summary"][b] = significance.condition_summary(rows)
            out["tests"][b] = {"protect_topk_vs_protect_random_k":
                               significance.condition_vs(rows, "protect_topk", "protect_random_k")}
    return out
