"""The pass engine: every requested metric scored from one run of each kind of pass.

For metrics ``a, b, c`` on the same windows:

1. **Batch pass** (``--batch-size`` windows per forward): the forward hooks of every observing
   metric (``act_mag``, ``obs``) ride one forward; when a metric reads the ``batch`` gradient
   (``grad_x_weight``, ``taylor2``'s first-order term), that forward is followed by one backward of
   the mean token loss.  Under
   gradient checkpointing the forward is recomputed in backward, where hooks would count it twice,
   so the observers then get their own no-grad forward.
2. **Window pass** (one forward+backward per window), only when a metric reads ``window_sq``
   (``grad_squared``, ``taylor2``'s Fisher term).
3. **Own passes** of the metrics that need them (``hessian_diag``, ``hutchinson_diag``).
4. **Scoring**, one metric at a time (:func:`score_metrics` is a generator): the caller selects
   from metric A's scores and drops them before metric B's are made, so at most one finished score
   set is alive beside the accumulators.

Each metric's scores equal those of a run of that metric alone on the same windows: the same
operations on the same values, in the same order (a gradient sum two metrics read is copied for
all but the last reader, never recomputed).  Memory: one fp32 accumulator per weight and per
gradient sum read (``batch``, ``window_sq``), plus each metric's own (see README).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from esa.metrics.grads import grad_accumulators
from esa.metrics.registry import GRADIENTS, METRICS, Collector, MetricContext, Scores
from esa.model import distributed
from esa.model.forward import batches, dummy_step, nll_sum
from esa.model.introspect import assert_eval, input_device

if TYPE_CHECKING:
    from esa.model.targets import Target


@dataclass
class Scored:
    """One metric's finished scores (target name -> fp32 tensor) and its extra per-tensor statistics."""

    metric: str
    scores: Scores
    extra_stats: dict[str, dict]


class GradientStore:
    """The shared gradient sums; a reader gets the accumulator itself when it is the last metric to
    read that sum (so a single-metric run scores in place), a copy otherwise."""

    def __init__(self, sums: dict[str, Scores], readers: dict[str, list[str]]) -> None:
        self.sums = sums
        self.readers = readers  # gradient sum -> metrics that have not finished reading it

    def take(self, stat: str, metric: str, target: str) -> torch.Tensor:
        if metric not in self.readers.get(stat, []):
            raise KeyError(f"metric {metric} did not declare the gradient sum {stat!r}")
        if self.readers[stat] == [metric]:
            return self.sums[stat].pop(target)
        return self.sums[stat][target].clone()

    def done(self, metric: str) -> None:
        for stat, names in self.readers.items():
            if metric in names:
                names.remove(metric)
                if not names:
                    self.sums.pop(stat, None)


def forward_pass(model: torch.nn.Module, targets: list[Target], windows: torch.Tensor, batch_size: int,
                 observers: list[Collector], n_tokens: int | None, desc: str, steps: int = 0) -> Scores | None:
    """One pass over ``windows`` in batches with every observer's hooks installed.  ``n_tokens``
    given: also backward ``sum NLL / n_tokens`` per batch and return the summed gradient (fp32).
    ``steps``: the number of forward calls to make (a sharded model needs the same on every rank:
    after its own batches a rank runs dummy ones that count for nothing, see :func:`dummy_step`)."""
    with contextlib.ExitStack() as stack:
        acc = stack.enter_context(grad_accumulators(targets)) if n_tokens is not None else None
        if acc is None:
            stack.enter_context(torch.no_grad())
        with contextlib.ExitStack() as observing:
            for c in observers:
                observing.enter_context(c.observe(model, targets))
            done = 0
            for batch in batches(windows, batch_size, input_device(model), desc):
                for c in observers:
                    c.before_batch(batch)
                if acc is None:
                    model(input_ids=batch, use_cache=False)
                else:
                    (nll_sum(model, batch) / n_tokens).backward()
                done += 1
        for _ in range(done, steps):  # observers detached: a dummy batch adds to no statistic
            dummy_step(model, backward=acc is not None)
    return acc


def window_pass(model: torch.nn.Module, targets: list[Target], windows: torch.Tensor, desc: str) -> Scores:
    """One forward+backward per window of its mean token loss; the sum of the squared per-window
    gradients (fp32)."""
    n_predicted = windows.shape[1] - 1
    with grad_accumulators(targets, square=True) as acc:
        for window in batches(windows, 1, input_device(model), desc):
            (nll_sum(model, window) / n_predicted).backward()
    return acc


def score_metrics(metrics: list[str], model: torch.nn.Module, targets: list[Target], windows: torch.Tensor,
                  batch_size: int, ctx: MetricContext | None = None) -> Iterator[Scored]:
    """Score every target with each of ``metrics`` on calibration ``windows`` ``[W, L]`` (int64),
    yielding one :class:`Scored` per metric in the given order.

    Under torchrun each rank passes the same ``windows`` and runs the passes on its own contiguous
    share; every sum is reduced over ranks before scoring, so every rank yields the scores of all
    ``W`` windows.  Each metric gets its own copy of ``ctx`` (its own ``extra_stats``).
    """
    assert_eval(model)
    ctx = ctx or MetricContext()
    local, offset = distributed.shard(windows)
    ctx.n_windows, ctx.window_offset = len(windows), offset
    collectors: dict[str, Collector | None] = {
        m: METRICS[m].collector(ctx.fresh()) for m in metrics}
    readers = {s: [m for m, c in collectors.items() if s in c.gradients] for s in GRADIENTS}
    observers = [c for c in collectors.values() if c.observes]
    desc = "+".join(metrics)
    sums: dict[str, Scores] = {}
    backward = bool(readers["batch"])
    # a sharded model (--shard fsdp) needs the same number of forward calls on every rank
    steps = distributed.steps(len(windows), batch_size) if distributed.sharded(model) else 0
    if observers and backward and ctx.recomputes_forward:
        forward_pass(model, targets, local, batch_size, observers, None, desc, steps)
        observers = []
    if observers or backward:
        n_tokens = ctx.n_windows * (local.shape[1] - 1) if backward else None
        acc = forward_pass(model, targets, local, batch_size, observers, n_tokens, desc, steps)
        if acc is not None:
            sums["batch"] = acc
    if readers["window_sq"]:
        sums["window_sq"] = window_pass(model, targets, local, desc)
    if not distributed.sharded(model):  # sharded: FSDP's reduce-scatter summed each gradient over the ranks
        for acc in sums.values():
            distributed.all_reduce_sum(acc.values())
    for c in collectors.values():
        c.own_passes(model, targets, local, batch_size)
        c.reduce()
    store = GradientStore(sums, {s: r for s, r in readers.items() if r})
    for m, c in collectors.items():
        scores = {t.name: c.score(t, lambda s, _n=t.name, _m=m: store.take(s, _m, _n)) for t in targets}
        store.done(m)
        # scores are >= 0, so one float64 sum is finite exactly when every entry is (NaN and inf
        # propagate, and no float64 sum of finite fp32 values overflows); no bool tensor needed.  Under
        # --shard fsdp each rank holds some rows: every rank learns whether any rank saw one.
        bad = [name for name, s in scores.items() if not math.isfinite(float(s.sum(dtype=torch.float64)))]
        if distributed.sharded(model) and distributed.any_rank(bool(bad)):
            raise FloatingPointError(f"non-finite {m} scores{' in ' + bad[0] if bad else ' on another rank'}")
        if bad:
            raise FloatingPointError(f"non-finite {m} scores in {bad[0]}")
        extra = c.ctx.extra_stats
        del c
        collectors[m] = None  # its accumulators go with it before the next metric is scored
        yield Scored(m, scores, extra)
        del scores  # first thing on resuming: the caller has dropped these before the next metric's are made


def compute_scores(metric: str, model: torch.nn.Module, targets: list[Target], windows: torch.Tensor,
                   batch_size: int, ctx: MetricContext | None = None) -> Scores:
    """Scores of one metric (``ctx.extra_stats`` receives its extra statistics)."""
    ctx = ctx or MetricContext()
    (scored,) = score_metrics([metric], model, targets, windows, batch_size, ctx)
    ctx.extra_stats.update(scored.extra_stats)
    return scored.scores
