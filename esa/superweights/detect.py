"""Super weights (Yu et al. 2024, "The Super Weight in Large Language Models"): find and validate them.

A super weight is one scalar of an MLP output (down) projection that, multiplied by a massive
input activation, writes a *super activation* into one channel of the residual stream; zeroing
that single scalar can raise perplexity by orders of magnitude.  Detection needs one forward pass:

1. :func:`find_mlp_output_projections` locates every MLP output projection generically (rule in
   its docstring), with the weight layout (``nn.Linear`` ``[out, in]`` or HF ``Conv1D`` ``[in, out]``).
2. Forward hooks record, per projection, the largest ``|input|`` and ``|output|`` (fp32, max over
   batch and positions) with their channel and token position.  A projection *spikes* when its
   max ``|output|`` is at least ``threshold`` x the median over all projections of that max.
3. The spike's output channel is the weight's out-channel (``row`` in the paper); its in-channel
   is the input channel whose product ``w[out, in] * x[in]`` contributes most to that output at
   the spike's token (for a true super weight this is also the input-spike channel, which is
   recorded as ``input_channel_of_max`` so a disagreement is visible).
4. Iteration (the paper's "remove and repeat"): per pass the *earliest* new spike becomes a
   candidate; all candidates so far are zeroed and the pass is repeated, because a later spike is
   often only a consequence of an earlier super activation (it vanishes once that is zeroed), and
   a super activation can hide another one (RMSNorm divides every channel by the huge norm).  It
   stops when a pass has no new spike or ``max_super_weights`` candidates are found.

Every change to the model is made through :func:`zeroed` (:func:`esa.experiment.perturb.perturbed`, which
restores the saved raw bits in ``finally``), so the model is bit-identical afterwards.  Validation
by ablation, the ``super_weights.json`` dict, its files, table, plot and the Top-K overlap:
:mod:`esa.superweights.ablation`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from esa.errors import UsageError
from esa.experiment.perturb import perturbed
from esa.experiment.selection import Selection
from esa.model.introspect import assert_eval, input_device
from esa.model.targets import Target
from esa.model.weight_inputs import eager_experts
from esa.superweights.config import DEFAULT_MAX_SUPER_WEIGHTS, DEFAULT_THRESHOLD
from esa.superweights.projections import LayerStat, Projection, find_mlp_output_projections, recording

log = logging.getLogger("esa")

SPIKE_RULE = ("a projection spikes when its max |output| over batch and positions is >= threshold x the median "
              "over all MLP output projections of that max; per pass the earliest new spike becomes a candidate "
              "(row/out-channel = spike channel, col/in-channel = largest |w*x| contributor at the spike token), "
              "then all candidates are zeroed and the pass repeated until no new spike or max_super_weights")


@torch.no_grad()
def activation_stats(model: nn.Module, projections: Sequence[Projection], input_ids: torch.Tensor
                     ) -> list[LayerStat]:
    """One forward pass (eval mode, ``use_cache=False``) of ``input_ids`` ``[B, T]`` int64; stats per projection."""
    assert_eval(model)
    with eager_experts(model), recording(projections, seq_len=input_ids.shape[-1]) as stats:
        model(input_ids=input_ids.to(input_device(model)), use_cache=False)
    if all(s.out_max < 0 for s in stats):
        raise RuntimeError("the forward pass called no MLP output projection; cannot measure activations")
    return stats  # a projection never called (an unrouted MoE expert) keeps out_max = in_max = -1


@dataclass(frozen=True)
class Candidate:
    """A super-weight candidate: ``weight`` = W[row, col] in the tensor's own layout (``flat_index`` =
    ``row * W.shape[1] + col``), mapping input channel ``in_channel`` to output ``out_channel``."""

    layer: int | None
    module: str
    param: str
    kind: str
    row: int
    col: int
    out_channel: int
    in_channel: int
    flat_index: int
    weight: float
    input_activation: float  # signed x[in_channel] at the spike token
    output_activation: float  # signed y[out_channel] at the spike token (the super activation)
    contribution: float  # weight * input_activation
    share: float  # contribution / output_activation
    max_abs_input: float  # the layer's max |input| (over every channel and token)
    input_channel_of_max: int
    input_ratio: float  # max |input| / median over projections
    output_ratio: float  # max |output| / median over projections (>= threshold)
    batch: int | None
    position: int
    token_id: int | None
    iteration: int
    expert: int | None = None  # the expert of a fused mixture-of-experts tensor (row, col are within it)

    @property
    def key(self) -> tuple[str, int]:
        return self.param, self.flat_index

    @classmethod
    def from_dict(cls, d: Mapping) -> Candidate:
        """A candidate from its ``super_weights.json`` row (extra keys such as ``token`` are ignored)."""
        return cls(**{f: d[f] for f in cls.__dataclass_fields__ if f in d})


def _ratio(value: float, median: float) -> float:
    return value / median if median > 0 else (math.inf if value > 0 else 1.0)


def _candidate(proj: Projection, stat: LayerStat, med_in: float, med_out: float, input_ids: torch.Tensor,
               iteration: int) -> Candidate:
    row, col = proj.weight_index(stat.out_channel, stat.contributor)
    batch, pos = stat.where(stat.out_row)
    token = int(input_ids[batch, pos]) if batch is not None and input_ids.dim() == 2 else None
    return Candidate(layer=proj.layer, module=proj.module_name, param=proj.param_name, kind=proj.kind, row=row,
                     col=col, out_channel=stat.out_channel, in_channel=stat.contributor,
                     flat_index=proj.flat_index(row, col), weight=float(proj.weight[row, col]),
                     input_activation=stat.contributor_input, output_activation=stat.out_value,
                     contribution=stat.contribution,
                     share=stat.contribution / stat.out_value if stat.out_value else math.nan,
                     max_abs_input=stat.in_max, input_channel_of_max=stat.in_channel,
                     input_ratio=_ratio(stat.in_max, med_in), output_ratio=_ratio(stat.out_max, med_out),
                     batch=batch, position=pos, token_id=token, iteration=iteration, expert=proj.expert)


def _targets(projections: Iterable[Projection]) -> dict[str, Target]:
    return {p.param_name: Target(p.param_name, p.param, (), (p.param_name,)) for p in projections}


@contextlib.contextmanager
def zeroed(projections: Sequence[Projection], weights: Iterable[tuple[str, int]]) -> Iterator[dict]:
    """Zero the weights ``(param name, flat index)`` for the block; restored bit-exactly in ``finally``.

    Yields :func:`esa.experiment.perturb.perturbed`'s counts (``n_changed`` < ``n_perturbed`` when some were already 0).
    """
    idx: dict[str, list[int]] = {}
    for name, flat in weights:
        idx.setdefault(name, []).append(flat)
    sel = Selection("super_weights", {n: torch.tensor(v, dtype=torch.int64) for n, v in idx.items()},
                    {n: torch.zeros(len(v)) for n, v in idx.items()})
    with perturbed(_targets(projections), sel, "zero", 1.0, 1.0, torch.Generator()) as info:
        yield info


def _pass_record(projections: Sequence[Projection], stats: list[LayerStat], med_in: float, med_out: float,
                 threshold: float, zeroed_keys: list[tuple[str, int]]) -> dict:
    layers = []
    for p, s in zip(projections, stats):
        if s.out_max < 0:  # never called in this pass: no maxima, never a spike
            layers.append({"module": p.module_name, "layer": p.layer, "called": False, "in_max": None,
                           "out_max": None, "in_ratio": None, "out_ratio": None, "spike": False})
            continue
        b_in, pos_in = s.where(s.in_row)
        b_out, pos_out = s.where(s.out_row)
        expert = {"expert": p.expert} if p.expert is not None else {}
        layers.append({"module": p.module_name, "layer": p.layer, **expert, "in_max": s.in_max,
                       "in_channel": s.in_channel, "in_batch": b_in, "in_position": pos_in,
                       "in_ratio": _ratio(s.in_max, med_in),
                       "out_max": s.out_max, "out_channel": s.out_channel, "out_batch": b_out,
                       "out_position": pos_out, "out_ratio": _ratio(s.out_max, med_out), "called": True,
                       "spike": _ratio(s.out_max, med_out) >= threshold})
    return {"zeroed": [list(k) for k in zeroed_keys], "median_in_max": med_in, "median_out_max": med_out,
            "layers": layers, "spikes": [r["module"] for r in layers if r["spike"]]}


def detect_super_weights(model: nn.Module, input_ids: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                         max_super_weights: int = DEFAULT_MAX_SUPER_WEIGHTS,
                         projections: Sequence[Projection] | None = None) -> dict:
    """The iterative search (module docstring) on ``input_ids`` ``[B, T]`` int64; the model is restored.

    Returns ``{"projections", "passes", "candidates": [Candidate], "stopped"}``; each pass holds
    the per-projection maxima (for the plot), the weights zeroed before it and its spikes.
    """
    if not threshold > 1.0:
        raise ValueError(f"threshold must be > 1, got {threshold}")
    if max_super_weights < 1:
        raise ValueError(f"max_super_weights must be >= 1, got {max_super_weights}")
    projs = list(projections) if projections is not None else find_mlp_output_projections(model)
    if not projs:
        raise UsageError("no MLP output projection found in the model (see find_mlp_output_projections)")
    if len(projs) < 3:
        log.warning("only %d MLP output projection(s): the median rule cannot single out a layer", len(projs))
    found: list[Candidate] = []
    passes: list[dict] = []
    while True:
        keys = [c.key for c in found]
        with zeroed(projs, keys):
            stats = activation_stats(model, projs, input_ids)
        called = [s for s in stats if s.out_max >= 0]
        med_in = statistics.median(s.in_max for s in called)
        med_out = statistics.median(s.out_max for s in called)
        rec = _pass_record(projs, stats, med_in, med_out, threshold, keys)
        passes.append(rec)
        new = []
        for i, (p, s) in enumerate(zip(projs, stats)):
            if not rec["layers"][i]["spike"] or s.contribution == 0.0:  # 0: no weight explains it (bias, or zeroed)
                continue
            cand = _candidate(p, s, med_in, med_out, input_ids, len(passes) - 1)
            if cand.key not in keys:
                new.append((i, cand))
        if not new:
            stopped = "no new spike"
            break
        if len(found) >= max_super_weights:
            stopped = f"max_super_weights ({max_super_weights}) reached; spikes left: {len(new)}"
            break
        # earliest in forward order: layer index, then module order (two projections of one block, e.g.
        # experts); a spike can only be caused upstream, and a later one may vanish once this is zeroed
        _, cand = min(new, key=lambda t: (t[1].layer if t[1].layer is not None else -1, t[0]))
        rec["new_candidate"] = asdict(cand)
        found.append(cand)
        log.info("super-weight candidate %d: %s[%d, %d] = %.4g (|y| = %.4g, %.0fx the median)", len(found),
                 cand.param, cand.row, cand.col, cand.weight, abs(cand.output_activation), cand.output_ratio)
    return {"projections": [p.describe() for p in projs], "passes": passes, "candidates": found,
            "stopped": stopped}
