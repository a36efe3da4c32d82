"""Super-weight validation: ablation, the ``super_weights.json`` dict and the Top-K overlap.

:func:`run_super_weights` is the one call for a pipeline: detection (:mod:`esa.superweights.detect`) plus
:func:`ablate`, which validates the candidates on the evaluation windows with each one zeroed alone,
all zeroed, and as many seeded random weights of the same matrices zeroed (the control).  Each is a
condition (:class:`esa.experiment.registry.Condition`) measured by the run's evaluators
(:class:`esa.evaluators.measure.Measurer`: perplexity, and whatever else ``--evaluate`` names),
always restoring the model bit-exactly.  The files (JSON, table, plot) are written by
:mod:`esa.reporting.superweights`, from the results dict alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict

import torch
from torch import nn

from esa.errors import UsageError
from esa.evaluators import activations
from esa.evaluators.measure import Measurer
from esa.evaluators.registry import Measured
from esa.experiment.registry import Condition, evaluation_key
from esa.options import Options
from esa.seeding import numpy_rng
from esa.superweights.config import DEFAULT_MAX_SUPER_WEIGHTS, DEFAULT_PROMPT, DEFAULT_THRESHOLD, DETECT_WINDOWS
from esa.superweights.detect import (
    SPIKE_RULE,
    Candidate,
    Projection,
    detect_super_weights,
    find_mlp_output_projections,
    zeroed,
)

log = logging.getLogger("esa")


KEEP = ("ppl", "mean_nll", "non_finite_loss", "ratio")  # the reference (perplexity) fields of an ablation row


def _row(row: dict) -> dict:
    """An ablation row: the perplexity fields, and every other evaluator's record (a dict, by name)."""
    return {**{k: row[k] for k in KEEP if k in row}, **{k: v for k, v in row.items() if isinstance(v, dict)}}


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


def zeroing(projections: Sequence[Projection], weights: Sequence[tuple[str, int]], label: str) -> Condition:
    """The condition "these weights ``(param name, flat index)`` are zeroed"; its key depends only on the
    weights, so the same weights zeroed twice are measured once."""
    idx: dict[str, list[int]] = {}
    for name, flat in weights:
        idx.setdefault(name, []).append(flat)
    key = evaluation_key(("zero", "super-weight ablation"),
                         {n: torch.tensor(sorted(v), dtype=torch.int64) for n, v in idx.items()})
    return Condition(label, key, lambda: zeroed(projections, list(weights)), label)


def ablate(measurer: Measurer, candidates: Sequence[Candidate], projections: Sequence[Projection], seed: int = 0
           ) -> dict:
    """Measure the baseline, each candidate zeroed alone, all zeroed, and the seeded random control
    (same count, same matrices) with ``measurer`` (its reference evaluator reads the evaluation
    windows); ``ratio`` = ppl / baseline.  Every condition restores the model."""
    inputs = measurer.evaluators[0].inputs
    base = measurer.baseline()
    out: dict = {"windows": int(inputs.windows.shape[0]), "seq_len": int(inputs.windows.shape[1]),
                 "batch_size": inputs.batch_size, "seed": seed, "baseline": _row(base), "each": [], "all": None,
                 "random": None}
    if not candidates:
        return out
    for c in candidates:
        row = measurer.measure(zeroing(projections, [c.key], f"zeroing {c.param}[{c.row}, {c.col}]"))
        out["each"].append({"param": c.param, "row": c.row, "col": c.col, "flat_index": c.flat_index, **_row(row),
                            "n_changed": row["n_changed"]})
        log.info("zeroing %s[%d, %d]: perplexity %.6g (ratio %.6g)", c.param, c.row, c.col, row["ppl"], row["ratio"])
    row = measurer.measure(zeroing(projections, [c.key for c in candidates], "zeroing every candidate"))
    out["all"] = {**_row(row), "n_changed": row["n_changed"]}
    rand = random_control(projections, candidates, seed)
    row = measurer.measure(zeroing(projections, rand, "zeroing as many random weights"))
    out["random"] = {**_row(row), "n_changed": row["n_changed"], "weights": [[n, i] for n, i in rand]}
    return out


def ablation_measured(sw: Mapping) -> Measured | None:
    """The ablation's rows of a ``super_weights.json`` dict, as the evaluators' own results files
    read every measured row (one group, ``ablation``, of the detector's seed); None without one."""
    abl = sw.get("ablation")
    if not abl or not abl.get("each"):
        return None
    conds = {f"zeroing {e['param']}[{e['row']}, {e['col']}]": e for e in abl["each"]}
    conds.update({"zeroing every candidate": abl["all"], "zeroing as many random weights": abl["random"]})
    return Measured("super_weights", {int(abl["seed"]): {"ablation": conds}})


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


def run_super_weights(model: nn.Module, input_ids: torch.Tensor, measurer: Measurer | None, *,
                      threshold: float = DEFAULT_THRESHOLD, max_super_weights: int = DEFAULT_MAX_SUPER_WEIGHTS,
                      seed: int = 0, tokenizer=None, settings: Mapping | None = None) -> dict:
    """Detection on ``input_ids`` ``[B, T]`` plus ablation measured by ``measurer`` (None: skipped).

    Returns the JSON-able ``super_weights.json`` dict; ``settings`` (prompt, model id, ...) is
    recorded as given, next to threshold, max_super_weights, batch_size and seed.  ``tokenizer``
    (optional) decodes the spike tokens.  One more forward of ``input_ids`` measures the residual
    stream (:func:`esa.evaluators.activations.measure_once`, ``massive_activations``), so each
    candidate says which massive activation its output channel carries (``feeds``).  The model is
    bit-identical afterwards.
    """
    projs = find_mlp_output_projections(model)
    det = detect_super_weights(model, input_ids, threshold, max_super_weights, projs)
    cands: list[Candidate] = det["candidates"]
    rows = [asdict(c) for c in cands]
    if tokenizer is not None:
        for r in rows:
            r["token"] = None if r["token_id"] is None else tokenizer.decode([r["token_id"]])
    # which massive activation each candidate feeds: its row of the down projection is a residual channel
    massive = activations.measure_once(model, input_ids, _activation_options(measurer))
    for r in rows:
        r["feeds"] = activations.feeds(massive, r["out_channel"])
    return {"tool": "find_super_weights",
            "settings": {**(settings or {}), "threshold": threshold, "max_super_weights": max_super_weights,
                         "batch_size": None if measurer is None else measurer.evaluators[0].inputs.batch_size,
                         "seed": seed},
            "rule": SPIKE_RULE,
            "detection_input": {"sequences": int(input_ids.shape[0]), "tokens_per_sequence": int(input_ids.shape[1])},
            "projections": det["projections"], "passes": det["passes"], "stopped": det["stopped"],
            "candidates": rows, "massive_activations": massive,
            "ablation": None if measurer is None else ablate(measurer, cands, projs, seed)}


def _activation_options(measurer: Measurer | None) -> Options | None:
    """The run's massive-activation thresholds when it measures activations (else the defaults)."""
    ev = next((e for e in (measurer.evaluators if measurer is not None else []) if e.name == activations.NAME), None)
    return None if ev is None else ev.options


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
