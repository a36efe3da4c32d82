"""Super-weight validation: ablation, the ``super_weights.json`` dict and the Top-K overlap.

:func:`run_super_weights` is the one call for a pipeline: detection (:mod:`esa.superweights.detect`) plus
:func:`ablate`, which validates the candidates by perplexity on evaluation windows with each one
zeroed alone, all zeroed, and as many seeded random weights of the same matrices zeroed (the
control), always restoring the model bit-exactly.  The files (JSON, table, plot) are written by
:mod:`esa.reporting.superweights`, from the results dict alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict

import torch
from torch import nn

from esa.errors import UsageError
from esa.experiment.conditions import perplexity_row
from esa.seeding import numpy_rng
from esa.superweights.detect import (
    DEFAULT_MAX_SUPER_WEIGHTS,
    DEFAULT_PROMPT,
    DEFAULT_THRESHOLD,
    DETECT_WINDOWS,
    SPIKE_RULE,
    Candidate,
    Projection,
    detect_super_weights,
    find_mlp_output_projections,
    zeroed,
)

log = logging.getLogger("esa")


def _ppl(model: nn.Module, windows: torch.Tensor, batch_size: int, base: float | None) -> dict:
    """The ablation row: ppl and mean NLL (and the ratio to ``base``); ``inf`` on a NaN loss."""
    row = perplexity_row(model, windows, batch_size, base, "super-weight ablation")
    return {k: row[k] for k in ("ppl", "mean_nll", "non_finite_loss", "ratio") if k in row}


def random_control(projections: Sequence[Projection], candidates: Sequence[Candidate], seed: int
                   ) -> list[tuple[str, int]]:
    """As many random weights as candidates, each from its candidate's matrix, disjoint from every
    candidate and from each other; stream ``superweights:random`` of ``seed``."""
    rng = numpy_rng(seed, "superweights:random")
    numel = {p.param_name: p.param.numel() for p in projections}
    taken = {c.key for c in candidates}
    out = []
    for c in candidates:
        if numel[c.param] <= sum(k[0] == c.param for k in taken):
            raise ValueError(f"{c.param} has no weight left for the random control")
        while True:
            key = (c.param, int(rng.integers(0, numel[c.param])))
            if key not in taken:
                break
        taken.add(key)
        out.append(key)
    return out


def ablate(model: nn.Module, candidates: Sequence[Candidate], windows: torch.Tensor, batch_size: int,
           seed: int = 0, projections: Sequence[Projection] | None = None) -> dict:
    """Perplexity on ``windows`` ``[W, L]`` int64: baseline, each candidate zeroed alone, all zeroed, and
    the seeded random control (same count, same matrices); ``ratio`` = ppl / baseline.  Restores the model."""
    projs = list(projections) if projections is not None else find_mlp_output_projections(model)
    base = _ppl(model, windows, batch_size, None)
    out: dict = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "batch_size": batch_size,
                 "seed": seed, "baseline": base, "each": [], "all": None, "random": None}
    if not candidates:
        return out
    for c in candidates:
        with zeroed(projs, [c.key]) as info:
            row = _ppl(model, windows, batch_size, base["ppl"])
        out["each"].append({"param": c.param, "row": c.row, "col": c.col, "flat_index": c.flat_index, **row,
                            "n_changed": info["n_changed"]})
        log.info("zeroing %s[%d, %d]: perplexity %.4g (x%.3g)", c.param, c.row, c.col, row["ppl"], row["ratio"])
    with zeroed(projs, [c.key for c in candidates]) as info:
        out["all"] = {**_ppl(model, windows, batch_size, base["ppl"]), "n_changed": info["n_changed"]}
    rand = random_control(projs, candidates, seed)
    with zeroed(projs, rand) as info:
        out["random"] = {**_ppl(model, windows, batch_size, base["ppl"]), "n_changed": info["n_changed"],
                         "weights": [[n, i] for n, i in rand]}
    return out


def prompt_input_ids(tokenizer, prompt: str) -> torch.Tensor:
    """``[1, T]`` int64 ids of ``prompt`` as the model sees text (BOS added when the tokenizer adds it)."""
    ids = tokenizer(prompt).input_ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long)


def detection_input(tokenizer, prompt: str | None, calib_pool: torch.Tensor, on_data: bool) -> torch.Tensor:
    """What the detector reads, for both command lines: the first :data:`DETECT_WINDOWS` calibration
    windows (``on_data``) or ``[1, T]`` ids of ``prompt`` (default :data:`DEFAULT_PROMPT`).  A prompt
    that encodes to no tokens is a usage error."""
    if on_data:
        return calib_pool[:DETECT_WINDOWS]
    try:
        return prompt_input_ids(tokenizer, prompt or DEFAULT_PROMPT)
    except ValueError as exc:
        raise UsageError(f"prompt: {exc}") from None


def run_super_weights(model: nn.Module, input_ids: torch.Tensor, windows: torch.Tensor | None, *,
                      threshold: float = DEFAULT_THRESHOLD, max_super_weights: int = DEFAULT_MAX_SUPER_WEIGHTS,
                      batch_size: int = 4, seed: int = 0, tokenizer=None, settings: Mapping | None = None) -> dict:
    """Detection on ``input_ids`` ``[B, T]`` plus ablation on ``windows`` ``[W, L]`` (None: skipped).

    Returns the JSON-able ``super_weights.json`` dict; ``settings`` (prompt, model id, ...) is
    recorded as given, next to threshold, max_super_weights, batch_size and seed.  ``tokenizer``
    (optional) decodes the spike tokens.  The model is bit-identical afterwards.
    """
    projs = find_mlp_output_projections(model)
    det = detect_super_weights(model, input_ids, threshold, max_super_weights, projs)
    cands: list[Candidate] = det["candidates"]
    rows = [asdict(c) for c in cands]
    if tokenizer is not None:
        for r in rows:
            r["token"] = None if r["token_id"] is None else tokenizer.decode([r["token_id"]])
    return {"tool": "find_super_weights",
            "settings": {**(settings or {}), "threshold": threshold, "max_super_weights": max_super_weights,
                         "batch_size": batch_size, "seed": seed},
            "rule": SPIKE_RULE,
            "detection_input": {"sequences": int(input_ids.shape[0]), "tokens_per_sequence": int(input_ids.shape[1])},
            "projections": det["projections"], "passes": det["passes"], "stopped": det["stopped"],
            "candidates": rows,
            "ablation": None if windows is None else ablate(model, cands, windows, batch_size, seed, projs)}


def overlap_with_topk(candidates: Iterable[Candidate | Mapping], top_rows: Iterable[Sequence]) -> list[dict]:
    """For each candidate, whether it is in the Top-K and at which 1-based rank.

    ``top_rows``: the Top-K in rank order as ``(parameter name, flat index[, score, ...])`` rows, e.g.
    ``Selection.ranked(names)``; a weight ``W[r, c]`` of a 2-D tensor has flat index ``r * W.shape[1] + c``.
    """
    rank: dict[tuple[str, int], int] = {}
    for i, row in enumerate(top_rows, start=1):
        rank.setdefault((str(row[0]), int(row[1])), i)
    out = []
    for c in candidates:
        d = asdict(c) if isinstance(c, Candidate) else dict(c)
        key = (d["param"], int(d["flat_index"]))
        out.append({"param": key[0], "layer": d.get("layer"), "expert": d.get("expert"), "row": d.get("row"),
                    "col": d.get("col"),
                    "flat_index": key[1], "in_topk": key in rank, "rank": rank.get(key)})
    return out
