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
import re
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from esa.errors import UsageError
from esa.experiment.perturb import perturbed
from esa.experiment.selection import Selection
from esa.model.introspect import assert_eval, input_device
from esa.model.targets import Target, conv1d_class
from esa.naming import layer_index

log = logging.getLogger("esa")

DEFAULT_THRESHOLD = 50.0
DEFAULT_MAX_SUPER_WEIGHTS = 8
DETECT_WINDOWS = 4  # detection on data: the first calibration windows (max over all of them)
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of France."
OUT_NAMES = frozenset({"down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "wo", "fc_out", "out_proj", "proj_out"})
# a module-path component that marks an MLP / feed-forward container (matched lower-case, whole component)
MLP_PARENT_RE = re.compile(r"^(.*mlp.*|.*ffn.*|.*feed_?forward.*|ff|ffw|.*moe.*|experts?|densereludense)$")
ATTN_RE = re.compile(r"attn|attention")
SPIKE_RULE = ("a projection spikes when its max |output| over batch and positions is >= threshold x the median "
              "over all MLP output projections of that max; per pass the earliest new spike becomes a candidate "
              "(row/out-channel = spike channel, col/in-channel = largest |w*x| contributor at the spike token), "
              "then all candidates are zeroed and the pass repeated until no new spike or max_super_weights")


@dataclass(frozen=True)
class Projection:
    """An MLP output projection: ``kind`` "linear" (weight ``[out, in]``) or "conv1d" (``[in, out]``)."""

    module_name: str
    param_name: str  # canonical name in model.named_parameters() (the name Top-K selections use)
    module: nn.Module
    layer: int | None
    kind: str
    in_features: int
    out_features: int
    rule: str  # "name" or "structure" (see find_mlp_output_projections)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def weight_index(self, out_channel: int, in_channel: int) -> tuple[int, int]:
        """(row, col) of the weight element mapping ``in_channel`` to ``out_channel`` in the tensor's own layout."""
        return (out_channel, in_channel) if self.kind == "linear" else (in_channel, out_channel)

    def describe(self) -> dict:
        return {"module": self.module_name, "param": self.param_name, "layer": self.layer, "kind": self.kind,
                "in_features": self.in_features, "out_features": self.out_features, "rule": self.rule,
                "shape": list(self.weight.shape)}


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "embedding_dim", None)


def _features(module: nn.Module) -> tuple[str, int, int] | None:
    """(kind, in_features, out_features) of a Linear or HF Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, conv1d_class()):
        return "conv1d", module.weight.shape[0], module.weight.shape[1]
    return None


def find_mlp_output_projections(model: nn.Module) -> list[Projection]:
    """Every MLP output projection of ``model``, in module (forward) order.

    Rule 1 (by name): an ``nn.Linear`` or HF ``Conv1D`` whose last name component is in
    :data:`OUT_NAMES` (down_proj, fc2, c_proj, dense_4h_to_h, w2, wo, fc_out, ...) and one of whose
    ancestor components looks like an MLP container (:data:`MLP_PARENT_RE`: mlp, ffn, feed_forward,
    ff, moe, experts, ...) and none like attention.  So GPT-2's ``transformer.h.N.mlp.c_proj`` is
    found and ``transformer.h.N.attn.c_proj`` is not.
    Rule 2 (by structure, used only when rule 1 finds nothing, e.g. OPT's ``layers.N.fc2`` without an
    MLP container): inside a numbered block (:func:`esa.naming.layer_index`), outside attention, the
    projection maps ``in_features > hidden_size`` to ``out_features == hidden_size``.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    hidden = _hidden_size(model)
    by_name: list[Projection] = []
    by_shape: list[Projection] = []
    for name, module in model.named_modules():
        feats = _features(module)
        if feats is None or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        parts = name.lower().split(".")
        ancestors = parts[:-1]
        if any(ATTN_RE.search(p) for p in ancestors):
            continue
        kind, n_in, n_out = feats
        proj = dict(module_name=name, param_name=canonical[id(module.weight)], module=module,
                    layer=layer_index(name), kind=kind, in_features=n_in, out_features=n_out)
        if parts[-1] in OUT_NAMES and any(MLP_PARENT_RE.match(p) for p in ancestors):
            by_name.append(Projection(**proj, rule="name"))
        elif proj["layer"] is not None and hidden is not None and n_out == hidden and n_in > hidden:
            by_shape.append(Projection(**proj, rule="structure"))
    return by_name or by_shape


@dataclass
class LayerStat:
    """One projection in one forward pass: activation maxima in fp32 and where they occur.

    ``*_row`` is the flattened index over the leading (batch, position) dims; the spike's
    ``contributor`` is the input channel with the largest ``|w * x|`` at the output-max token.
    """

    module: str
    layer: int | None
    in_max: float = -1.0
    in_channel: int = -1
    in_row: int = -1
    out_max: float = -1.0
    out_channel: int = -1
    out_row: int = -1
    out_value: float = 0.0  # signed output at the max
    contributor: int = -1
    contribution: float = 0.0  # signed w * x of the contributor
    contributor_input: float = 0.0  # signed x of the contributor at the spike token
    seq_len: int = 0  # positions per sequence (rows -> batch, position), 0 if the input is 2-D

    def record(self, proj: Projection, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold one call of the projection (``x`` ``[..., in]``, ``y`` ``[..., out]``) into the maxima."""
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        yf = y.detach().reshape(-1, y.shape[-1]).float()
        self.seq_len = x.shape[-2] if x.dim() == 3 else 0
        xa, ya = xf.abs().view(-1), yf.abs().view(-1)
        i, o = int(xa.argmax()), int(ya.argmax())
        if float(xa[i]) > self.in_max:  # a module called several times per pass keeps its largest call
            self.in_row, self.in_channel = divmod(i, xf.shape[1])
            self.in_max = float(xa[i])
        if float(ya[o]) > self.out_max:
            self.out_row, self.out_channel = divmod(o, yf.shape[1])
            self.out_max = float(ya[o])
            self.out_value = float(yf.view(-1)[o])
            w = proj.weight[self.out_channel] if proj.kind == "linear" else proj.weight[:, self.out_channel]
            contrib = xf[self.out_row] * w.detach().float()  # [in]: each input channel's share of the spike
            self.contributor = int(contrib.abs().argmax())
            self.contribution = float(contrib[self.contributor])
            self.contributor_input = float(xf[self.out_row, self.contributor])

    def where(self, row: int) -> tuple[int | None, int]:
        """(batch, position) of a flattened row (batch None when the input was not [B, T, C])."""
        return divmod(row, self.seq_len) if self.seq_len else (None, row)


@contextlib.contextmanager
def recording(projections: Sequence[Projection]) -> Iterator[list[LayerStat]]:
    """Forward hooks filling one :class:`LayerStat` per projection; always removed on exit."""
    stats = [LayerStat(p.module_name, p.layer) for p in projections]
    handles = []
    try:
        for proj, stat in zip(projections, stats):
            def hook(_m, args, kwargs, out, proj=proj, stat=stat):
                x = args[0] if args else next(iter(kwargs.values()))  # called as module(x) or module(input=x)
                stat.record(proj, x, out)
            handles.append(proj.module.register_forward_hook(hook, with_kwargs=True))
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_stats(model: nn.Module, projections: Sequence[Projection], input_ids: torch.Tensor
                     ) -> list[LayerStat]:
    """One forward pass (eval mode, ``use_cache=False``) of ``input_ids`` ``[B, T]`` int64; stats per projection."""
    assert_eval(model)
    with recording(projections) as stats:
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

    @property
    def key(self) -> tuple[str, int]:
        return self.param, self.flat_index

    @classmethod
    def from_dict(cls, d: Mapping) -> Candidate:
        """A candidate from its ``super_weights.json`` row (extra keys such as ``token`` are ignored)."""
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def _ratio(value: float, median: float) -> float:
    return value / median if median > 0 else (math.inf if value > 0 else 1.0)


def _candidate(proj: Projection, stat: LayerStat, med_in: float, med_out: float, input_ids: torch.Tensor,
               iteration: int) -> Candidate:
    row, col = proj.weight_index(stat.out_channel, stat.contributor)
    batch, pos = stat.where(stat.out_row)
    token = int(input_ids[batch, pos]) if batch is not None and input_ids.dim() == 2 else None
    return Candidate(layer=proj.layer, module=proj.module_name, param=proj.param_name, kind=proj.kind, row=row,
                     col=col, out_channel=stat.out_channel, in_channel=stat.contributor,
                     flat_index=row * proj.weight.shape[1] + col, weight=float(proj.weight[row, col]),
                     input_activation=stat.contributor_input, output_activation=stat.out_value,
                     contribution=stat.contribution,
                     share=stat.contribution / stat.out_value if stat.out_value else math.nan,
                     max_abs_input=stat.in_max, input_channel_of_max=stat.in_channel,
                     input_ratio=_ratio(stat.in_max, med_in), output_ratio=_ratio(stat.out_max, med_out),
                     batch=batch, position=pos, token_id=token, iteration=iteration)


def _targets(projections: Iterable[Projection]) -> dict[str, Target]:
    return {p.param_name: Target(p.param_name, p.module.weight, (), (p.param_name,)) for p in projections}


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
        layers.append({"module": p.module_name, "layer": p.layer, "in_max": s.in_max, "in_channel": s.in_channel,
                       "in_batch": b_in, "in_position": pos_in, "in_ratio": _ratio(s.in_max, med_in),
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
