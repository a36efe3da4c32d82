"""The metric record, its :class:`Collector` protocol and the metric registry.

A metric is a :class:`Collector` subclass registered with :func:`metric`.  It says which of the
scoring passes it takes part in, and :mod:`esa.metrics.passes` runs each pass once for all the
metrics of a run:

* ``gradients``: shared gradient sums it reads (:data:`GRADIENTS`), accumulated in fp32 by one
  loop that serves every metric reading them;
* ``observes``: forward hooks (``observe``) on the shared batch forward;
* ``own_passes``: passes no other metric can share (sampled labels, Hessian-vector products).

Then ``score(t, grads)`` turns what it collected into one target's score: an fp32 tensor with the
weight's shape on the weight's device, whatever the model dtype.  The :class:`Metric` record
carries what the command line, the dry run and the report need (help text, unit, which passes it
costs), so adding a metric is one module in this package; the package imports every module in it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from esa.options import Option, Options
from esa.registry import Registry

if TYPE_CHECKING:
    from esa.model.targets import Target

Scores = dict[str, torch.Tensor]
NEEDS = ("forward", "backward", "per_window", "hvp")  # what a metric costs, in passes over the data
# The shared gradient sums (fp32, one accumulator per target weight each), over the calibration windows:
GRADIENTS = {
    "batch": "sum over batches of d(sum of the batch's token NLLs / N)/dw = dL/dw, L the mean token loss",
    "window_sq": "sum over windows of (d(mean token NLL of the window)/dw)^2",
}


class MetricContext:
    """What a metric may need beyond the data: the seed (for its own random streams), the metric
    options of the run (each declared by the metric that reads it, e.g. ``hutchinson_samples``; read as
    attributes: ``ctx.hutchinson_samples``), and a place for extra per-tensor statistics (e.g. the
    signed Hutchinson estimate's summary) that end up in sensitivity_stats.json.

    ``MetricContext(seed=3, hutchinson_samples=2)``: options not given take their declared defaults;
    an unknown option is an error.
    """

    def __init__(self, seed: int = 0, recomputes_forward: bool = False, **options: Any) -> None:
        defaults = Options.defaults(metric_options())
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"unknown metric options {sorted(unknown)}; declared: {', '.join(defaults)}")
        self.seed = seed
        # the forward is recomputed in backward (gradient checkpointing): forward hooks must not ride a backward pass
        self.recomputes_forward = recomputes_forward
        self.options = defaults.replace(**options)
        self.extra_stats: dict[str, dict] = {}
        # Set by the pass engine: windows over all ranks (normalisations use this, not the local share)
        # and the global index of this rank's first window (per-window random streams use it).
        self.n_windows = 0
        self.window_offset = 0

    def __getattr__(self, name: str) -> Any:
        if name == "options":  # not set yet (copying)
            raise AttributeError(name)
        return getattr(self.options, name)

    def fresh(self) -> MetricContext:
        """A copy with its own, empty ``extra_stats`` (one per metric of a scoring call)."""
        out = copy.copy(self)
        out.extra_stats = {}
        return out


class Collector:
    """One metric's part in one scoring call (a fresh instance per call, holding its accumulators).

    The engine calls, in this order: ``observe`` around the shared batch forward (with
    ``before_batch`` before each forward of a ``[B, L]`` batch), ``own_passes``, ``reduce`` (sum its
    own accumulators over torchrun ranks), then ``score`` once per target.  ``grads(name)`` in
    ``score`` returns that target's sum ``name`` from :data:`GRADIENTS` (already summed over ranks),
    which the metric owns and may change in place.
    """

    gradients: tuple[str, ...] = ()
    observes: bool = False

    def __init__(self, ctx: MetricContext) -> None:
        self.ctx = ctx

    def observe(self, model: torch.nn.Module, targets: list[Target]) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def before_batch(self, batch: torch.Tensor) -> None:
        """Called before each forward of the shared batch pass."""

    def own_passes(self, model: torch.nn.Module, targets: list[Target], windows: torch.Tensor, batch_size: int
                   ) -> None:
        """Passes over ``windows`` (this rank's share, ``[W, L]`` int64) that no other metric shares."""

    def reduce(self) -> None:
        """Sum this metric's own accumulators over ranks (:func:`esa.model.distributed.all_reduce_sum`)."""

    def score(self, t: Target, grads: Callable[[str], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Metric:
    """One metric: its collector and what the rest of the tool says about it.

    ``help``: one-line definition (``--help``, README); ``unit``: what a score measures (plot axes,
    recorded in config.json so the report needs no import of this package); ``needs``: a subset of
    :data:`NEEDS` (``backward``: gradient checkpointing applies; ``per_window``: one backward per
    window; ``hvp``: Hessian-vector products); ``aliases``: other spellings users type; ``can_score``:
    why a target cannot be scored (such targets are excluded with a warning and listed in the
    coverage record); absent, every target can.
    """

    name: str
    collector: type[Collector]
    help: str
    unit: str
    needs: frozenset[str]
    aliases: tuple[str, ...] = ()
    can_score: Callable[[Target], str | None] | None = None  # why a target cannot be scored, or None
    options: tuple[Option, ...] = ()  # settings it reads from MetricContext (flags of esa_runner)
    not_on_shards: str | None = None  # why it cannot score a model sharded by --shard fsdp (None: it can)

    def record(self) -> dict:
        """The JSON-ready description written to config.json."""
        return {"name": self.name, "help": self.help, "unit": self.unit, "needs": sorted(self.needs)}


METRICS: Registry[Metric] = Registry("metric")

# Why the metrics that square per-window gradients cannot score a model sharded by --shard fsdp
PER_WINDOW_SQUARES = ("it squares each window's gradient, but on FSDP shards a backward's gradient reaches each "
                      "rank already summed over the ranks (the square of a sum is not the sum of squares)")


def metric(name: str, *, help: str, unit: str, needs: tuple[str, ...], aliases: tuple[str, ...] = (),
           can_score: Callable[[Target], str | None] | None = None, options: tuple[Option, ...] = (),
           not_on_shards: str | None = None) -> Callable[[type[Collector]], type[Collector]]:
    """Register the decorated :class:`Collector` subclass as metric ``name`` (a duplicate name is an error);
    ``options``: the settings it reads (``esa_runner`` turns each into a flag)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"metric {name!r}: unknown needs {sorted(unknown)}; choose from {', '.join(NEEDS)}")

    def deco(cls: type[Collector]) -> type[Collector]:
        if set(cls.gradients) - set(GRADIENTS):
            raise ValueError(f"metric {name!r}: unknown gradients {sorted(set(cls.gradients) - set(GRADIENTS))}")
        taken = {o.name for o in metric_options()}
        clash = [o.name for o in options if o.name in taken]
        if clash:
            raise ValueError(f"metric {name!r}: options {clash} are already declared by another metric")
        METRICS.add(name, Metric(name, cls, help, unit, frozenset(needs), aliases, can_score, options, not_on_shards),
                    aliases)
        return cls
    return deco


def metric_options() -> list[Option]:
    """Every option declared by a registered metric, in registration order."""
    return [o for name in METRICS for o in METRICS[name].options]
