"""The records a run writes about itself: ``config.json`` (what ran, where, on what) and
``top_weights.csv`` (every seed's Top-K with coordinates)."""

from __future__ import annotations

import platform
import sys

import numpy as np
import torch

from esa.experiment.registry import SeedSelections
from esa.metrics import METRICS
from esa.model import distributed
from esa.model.introspect import model_record
from esa.outdir.atomic import write_csv, write_json
from esa.outdir.provenance import git_sha, versions
from esa.runner.context import RunContext

TOP_WEIGHTS_COLUMNS = ["rank", "parameter", "index", "coords", "score", "seed", "tensor_rank", "expert", "row", "col"]
__all__ = ["git_sha", "versions", "write_config", "write_json", "write_top_weights"]


SEED_CONTROLS = ("which calibration windows are drawn from the pool (scoring sample)",
                 "the random_k control draw",
                 "Gaussian noise, bit-flip and --perturb-prob draws of each perturbed condition",
                 "Hutchinson Rademacher probes (hutchinson_diag)",
                 "Monte-Carlo labels sampled from the model (hessian_diag)")
SEED_FIXED = "evaluation windows are the same for every seed and condition"


def write_config(ctx: RunContext) -> None:
    """``config.json``: the resolved configuration, device, model, targets, data, seeds, versions."""
    cfg, choice, model, targets, data = ctx.cfg, ctx.choice, ctx.model, ctx.targets, ctx.data
    metrics = cfg.scoring.metrics
    device_name = torch.cuda.get_device_name(0) if choice.device == "cuda" else platform.processor() or "cpu"
    device_map = getattr(model, "hf_device_map", None)  # set by transformers/accelerate when dispatched
    write_json(ctx.out_dir / "config.json", {
        "config": cfg.to_json(),
        "resolved": {"device": choice.device, "device_name": device_name, "dtype": choice.dtype,
                     "warnings": list(choice.warnings), "seeds_run": list(cfg.scoring.seeds),
                     "device_map": {k: str(v) for k, v in device_map.items()} if device_map else None,
                     "world_size": distributed.world_size()},
        "command": sys.argv,
        "model": model_record(model),
        **({"metrics_info": {m: METRICS[m].record() for m in metrics}} if cfg.multi
           else {"metric_info": METRICS[cfg.metric].record()}),
        "targets": {"count": len(targets), "weights": sum(t.numel for t in targets),
                    "tied": {t.name: list(t.aliases) for t in targets if len(t.aliases) > 1},
                    "layouts": {t.name: list(t.layout) for t in targets if t.layout not in (("out", "in"),)}},
        "coverage": ctx.coverage,
        "fingerprints": ctx.fingerprints,
        "data": {"data_source": data.data_source, "eval_windows": len(data.eval_windows),
                 "calibration_pool_windows": len(data.calib_pool), "window_tokens": cfg.data.max_length,
                 "bos_policy": data.bos_policy},
        "seed_semantics": {"controls": list(SEED_CONTROLS), "fixed": SEED_FIXED},
        "versions": versions(),
        "git_sha": git_sha(),
    })


def write_top_weights(ctx: RunContext, results: list[SeedSelections]) -> list[list]:
    """``top_weights.csv``, every seed in order: ``rank`` (position in the seed's whole Top-K, across
    all tensors, also under per_layer), parameter, flat index, coordinates, score, seed, and
    ``tensor_rank`` (position among the seed's Top-K weights of the same tensor: under per_layer the
    rank that selected it), then ``expert`` (empty unless the tensor is a fused mixture of experts),
    ``row`` and ``col`` in the module's own convention: row = output feature, col = input feature
    (the token id for an embedding), whatever the storage order (``coords``)."""
    shapes = {t.name: t.shape for t in ctx.targets}
    roles = {t.name: [t.axis(r) for r in ("expert", "out", "in")] for t in ctx.targets}
    rows = []
    for res in results:
        in_tensor: dict[str, int] = {}
        for rank, (name, idx, score) in enumerate(res.top.ranked(ctx.names), start=1):
            at = [int(c) for c in np.unravel_index(idx, shapes[name])]
            in_tensor[name] = in_tensor.get(name, 0) + 1
            named = ["" if a is None else at[a] for a in roles[name]]
            rows.append([rank, name, idx, ",".join(map(str, at)), f"{score:.9g}", res.seed, in_tensor[name], *named])
    write_csv(ctx.out_dir / "top_weights.csv", TOP_WEIGHTS_COLUMNS, rows)
    return rows
