"""Per-weight sensitivity scores: a registry of metrics with one uniform signature.

Every metric maps ``(model, targets, windows, batch_size)`` to ``{target name: score}``, where each
score is an fp32 tensor with the weight's shape on the weight's device, whatever the model dtype.
Losses are the summed next-token NLL in fp32 over equal-length windows (no padding exists, so none
can enter a loss).  Let N be the number of predicted tokens over all calibration windows and W the
number of windows:

* ``grad_x_weight``: ``|w * g|`` with ``g = d/dw (sum NLL / N)``, the gradient of the mean token loss
  (first-order Taylor estimate of the loss change when w is removed).  One forward+backward per batch.
* ``grad_squared``: empirical Fisher diagonal ``(1/W) sum_windows (d/dw mean-NLL(window))^2``;
  granularity is one window (squared per window, then averaged), so each window gets its own
  backward pass (``--batch-size`` does not batch this metric).
* ``magnitude``: ``|w|``.
* ``hessian_diag`` and ``hutchinson_diag``: curvature, see :mod:`esa.curvature`.
* ``act_mag`` (Wanda): ``|w_ij| * ||x_j||_2`` with ``||x_j||_2`` over all calibration tokens of the
  input feature j of the module.  For an embedding the input is the one-hot token vector, so
  ``||x_v||_2 = sqrt(count of token v)``.  A tied weight sums the score of each of its uses.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from esa import distributed
from esa.evaluate import batches, nll_sum
from esa.models import assert_eval, input_device
from esa.targets import Target

Scores = dict[str, torch.Tensor]


@dataclass
class MetricContext:
    """What a metric may need beyond the data: the seed (for its own random streams), the number of
    Hutchinson probes and of Monte-Carlo label samples, and a place for extra per-tensor statistics
    (e.g. the signed Hutchinson estimate's summary) that end up in sensitivity_stats.json."""

    seed: int = 0
    hutchinson_samples: int = 16
    curvature_samples: int = 1
    extra_stats: dict[str, dict] = field(default_factory=dict)
    # Set by compute_scores: windows over all ranks (normalisations use this, not the local share)
    # and the global index of this rank's first window (per-window random streams use it).
    n_windows: int = 0
    window_offset: int = 0


MetricFn = Callable[[torch.nn.Module, list[Target], torch.Tensor, int, MetricContext], Scores]
METRICS: dict[str, MetricFn] = {}


def register(name: str) -> Callable[[MetricFn], MetricFn]:
    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn
    return deco


def compute_scores(metric: str, model: torch.nn.Module, targets: list[Target], windows: torch.Tensor,
                   batch_size: int, ctx: MetricContext | None = None) -> Scores:
    """Score every target weight with ``metric`` on calibration ``windows`` ``[W, L]`` (int64).

    Under torchrun each rank passes the same ``windows`` and scores its own contiguous share; the
    metrics sum their fp32 accumulators over ranks (:func:`esa.distributed.all_reduce_sum`) before
    finishing, so every rank returns the scores of all ``W`` windows.
    """
    if metric not in METRICS:
        raise NotImplementedError(f"metric {metric} is not implemented yet")
    assert_eval(model)
    ctx = ctx or MetricContext()
    local, offset = distributed.shard(windows)
    ctx.n_windows, ctx.window_offset = len(windows), offset
    scores = METRICS[metric](model, targets, local, batch_size, ctx)
    for name, s in scores.items():
        # scores are >= 0, so one float64 sum is finite exactly when every entry is (NaN and inf
        # propagate, and no float64 sum of finite fp32 values overflows); no bool tensor needed
        if not math.isfinite(float(s.sum(dtype=torch.float64))):
            raise FloatingPointError(f"non-finite {metric} scores in {name}")
    return scores


@contextlib.contextmanager
def grad_accumulators(targets: list[Target], square: bool = False) -> Iterator[Scores]:
    """Enable grads on targets and fold each backward's gradient (``square``: its square) into an
    fp32 accumulator.

    A post-accumulate-grad hook folds ``grad.float()`` into the accumulator and frees ``param.grad``
    at once, so no model-dtype gradient outlives its backward pass.  The first backward's gradient
    *becomes* the accumulator (squared in place), later ones are added by one fused pass
    (``add_`` / ``addcmul_``): no zero-filled buffer, no temporary, which keeps scoring within a few
    percent of a plain backward.  In-place work on the gradient is safe: once ``param.grad`` is
    cleared nothing else references it.  For a tied weight autograd sums all uses before the hook
    fires, so the hook sees the full gradient.  A target that no backward reached gets a zero
    accumulator; the dict is in target order when the block ends.
    """
    acc: Scores = {}
    handles = []

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.float().contiguous()  # fp32 and contiguous: p.grad itself, else a fresh copy
            p.grad = None
            if name not in acc:
                acc[name] = g.square_() if square else g
            elif square:
                acc[name].addcmul_(g, g)
            else:
                acc[name].add_(g)
        return hook

    try:
        for t in targets:
            t.param.requires_grad_(True)
            handles.append(t.param.register_post_accumulate_grad_hook(make_hook(t.name)))
        yield acc
        # back in target order (hooks fire in backward order), zeros for a target no backward reached
        filled = dict(acc)
        acc.clear()
        for t in targets:
            acc[t.name] = filled.pop(t.name, None)
            if acc[t.name] is None:
                acc[t.name] = torch.zeros(t.shape, dtype=torch.float32, device=t.param.device)
    finally:
        for h in handles:
            h.remove()
        for t in targets:
            t.param.requires_grad_(False)
            t.param.grad = None


@register("grad_x_weight")
def grad_x_weight(model, targets, windows, batch_size, ctx) -> Scores:
    n_tokens = ctx.n_windows * (windows.shape[1] - 1)
    with grad_accumulators(targets) as acc:
        for batch in batches(windows, batch_size, input_device(model), "grad_x_weight"):
            (nll_sum(model, batch) / n_tokens).backward()
    distributed.all_reduce_sum(acc.values())
    # in place: the fp32 accumulator becomes the score, so no second model-sized buffer is made
    return {t.name: acc[t.name].mul_(t.param.detach()).abs_() for t in targets}


@register("grad_squared")
def grad_squared(model, targets, windows, batch_size, ctx) -> Scores:
    n_predicted = windows.shape[1] - 1
    with grad_accumulators(targets, square=True) as acc:
        for window in batches(windows, 1, input_device(model), "grad_squared"):
            (nll_sum(model, window) / n_predicted).backward()
    distributed.all_reduce_sum(acc.values())
    return {name: a.div_(ctx.n_windows) for name, a in acc.items()}


@register("magnitude")
def magnitude(model, targets, windows, batch_size, ctx) -> Scores:
    return {t.name: t.param.detach().float().abs() for t in targets}


@register("act_mag")
def act_mag(model, targets, windows, batch_size, ctx) -> Scores:
    # One fp32 vector per use: sum over tokens of x_j^2 (or token counts for embeddings).
    sumsq: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    batch_shape: list[torch.Size] = []  # shape of the input_ids of the forward in progress

    def make_hook(key: tuple[str, int], kind: str, size: int):
        def hook(module, inputs, output) -> None:
            x = inputs[0]
            if kind == "embedding":
                # An index tensor broadcast over the batch (GPT-2 position ids [1, L]) is read by
                # every window: count it once per token of the batch, not once per forward call.
                x = _broadcast_ids(x, batch_shape[-1])
                v = torch.bincount(x.flatten(), minlength=size).float()
            else:
                v = x.detach().float().square().sum(dim=tuple(range(x.ndim - 1)))
            sumsq[key].add_(v)
        return hook

    try:
        for t in targets:
            for i, use in enumerate(t.uses):
                key = (t.name, i)
                sumsq[key] = torch.zeros(t.shape[use.in_axis], dtype=torch.float32, device=t.param.device)
                handles.append(use.module.register_forward_hook(make_hook(key, use.kind, t.shape[use.in_axis])))
        with torch.no_grad():
            for batch in batches(windows, batch_size, input_device(model), "act_mag"):
                batch_shape.append(batch.shape)
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    distributed.all_reduce_sum(sumsq.values())
    out: Scores = {}
    for t in targets:
        w = t.param.detach().float().abs()  # a fresh fp32 buffer (abs copies): it becomes the score
        norms = [sumsq[(t.name, i)].sqrt_() for i in range(len(t.uses))]
        axes = [use.in_axis for use in t.uses]
        bcast = [n[None, :] if a == 1 else n[:, None] for n, a in zip(norms, axes)]
        if len(bcast) == 1:
            out[t.name] = w.mul_(bcast[0])
        else:  # tied: |w| * sum of the uses' norms (each broadcast along its own input axis)
            out[t.name] = w * bcast[0]
            for b in bcast[1:]:
                out[t.name].addcmul_(w, b)
    return out


def _broadcast_ids(ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``ids`` expanded to the batch ``shape`` when it broadcasts to it (else unchanged)."""
    try:
        if ids.shape != shape and torch.broadcast_shapes(ids.shape, shape) == shape:
            return ids.expand(shape)
    except RuntimeError:
        pass
    return ids


from esa import curvature  # noqa: E402,F401  (registers hessian_diag and hutchinson_diag)
