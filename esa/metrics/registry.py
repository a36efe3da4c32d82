"""The metric record, the metric registry and :func:`compute_scores`, the one way to score.

A metric maps ``(model, targets, windows [W, L] int64, batch_size, ctx)`` to ``{target name: score}``:
each score is an fp32 tensor with the weight's shape on the weight's device, whatever the model
dtype.  Its :class:`Metric` record carries what the command line, the dry run and the report need
(help text, unit, which passes it needs), so adding a metric is one module in this package that
calls :func:`metric`; the package imports every module in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from esa.model import distributed
from esa.model.introspect import assert_eval
from esa.registry import Registry

if TYPE_CHECKING:
    from esa.model.targets import Target

Scores = dict[str, torch.Tensor]
NEEDS = ("forward", "backward", "per_window", "hvp")  # what a metric costs, in passes over the data


@dataclass
class MetricContext:
    """What a metric may need beyond the data: the seed (for its own random streams), the number of
    Hutchinson probes and of Monte-Carlo label samples, and a place for extra per-tensor statistics
    (e.g. the signed Hutchinson estimate's summary) that end up in sensitivity_stats.json."""

    seed: int = 0
    hutchinson_samples: int = 16
    curvature_samples: int = 1
    obs_damp: float = 0.01  # obs: dampening λ as a fraction of mean(diag H)
    extra_stats: dict[str, dict] = field(default_factory=dict)
    # Set by compute_scores: windows over all ranks (normalisations use this, not the local share)
    # and the global index of this rank's first window (per-window random streams use it).
    n_windows: int = 0
    window_offset: int = 0


MetricFn = Callable[[torch.nn.Module, "list[Target]", torch.Tensor, int, MetricContext], Scores]


@dataclass(frozen=True)
class Metric:
    """One metric: its function and what the rest of the tool says about it.

    ``help``: one-line definition (``--help``, README); ``unit``: what a score measures (plot axes,
    recorded in config.json so the report needs no import of this package); ``needs``: a subset of
    :data:`NEEDS` (``backward``: gradient checkpointing applies; ``per_window``: one backward per
    window; ``hvp``: Hessian-vector products); ``aliases``: other spellings users type; ``can_score``:
    why a target cannot be scored (such targets are excluded with a warning and listed in the
    coverage record); absent, every target can.
    """

    name: str
    fn: MetricFn
    help: str
    unit: str
    needs: frozenset[str]
    aliases: tuple[str, ...] = ()
    can_score: Callable[[Target], str | None] | None = None  # why a target cannot be scored, or None

    def record(self) -> dict:
        """The JSON-ready description written to config.json."""
        return {"name": self.name, "help": self.help, "unit": self.unit, "needs": sorted(self.needs)}


METRICS: Registry[Metric] = Registry("metric")


def metric(name: str, *, help: str, unit: str, needs: tuple[str, ...], aliases: tuple[str, ...] = (),
           can_score: Callable[[Target], str | None] | None = None) -> Callable[[MetricFn], MetricFn]:
    """Register the decorated function as metric ``name`` (a duplicate name is an error)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"metric {name!r}: unknown needs {sorted(unknown)}; choose from {', '.join(NEEDS)}")

    def deco(fn: MetricFn) -> MetricFn:
        METRICS.add(name, Metric(name, fn, help, unit, frozenset(needs), aliases, can_score), aliases)
        return fn
    return deco


def compute_scores(metric: str, model: torch.nn.Module, targets: list[Target], windows: torch.Tensor,
                   batch_size: int, ctx: MetricContext | None = None) -> Scores:
    """Score every target weight with ``metric`` on calibration ``windows`` ``[W, L]`` (int64).

    Under torchrun each rank passes the same ``windows`` and scores its own contiguous share; the
    metrics sum their fp32 accumulators over ranks (:func:`esa.model.distributed.all_reduce_sum`) before
    finishing, so every rank returns the scores of all ``W`` windows.
    """
    assert_eval(model)
    ctx = ctx or MetricContext()
    local, offset = distributed.shard(windows)
    ctx.n_windows, ctx.window_offset = len(windows), offset
    scores = METRICS[metric].fn(model, targets, local, batch_size, ctx)
    for name, s in scores.items():
        # scores are >= 0, so one float64 sum is finite exactly when every entry is (NaN and inf
        # propagate, and no float64 sum of finite fp32 values overflows); no bool tensor needed
        if not math.isfinite(float(s.sum(dtype=torch.float64))):
            raise FloatingPointError(f"non-finite {metric} scores in {name}")
    return scores
