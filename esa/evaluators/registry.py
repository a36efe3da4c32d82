"""The evaluator base class, what an evaluator may read, and the evaluator registry.

An evaluator measures the model *as it is now* (unchanged, or inside a condition that changed it):
``evaluate(model, baseline, label)`` returns a small JSON-able record.  ``baseline`` is the same
evaluator's record of the unmodified model (None while measuring that), so a record can state its
change (perplexity's ``ratio``).  An evaluator is built once per run (expensive set-up such as
building task requests happens in ``__init__``) and called for every condition.

It declares what it needs (``needs``: ``eval_windows``, ``tokenizer``, ``model``) and its settings
(``options``, which become flags, checked by :meth:`Evaluator.validate` before the model loads);
:meth:`Evaluator.key` names it with its settings, so a journalled record is reused only by an
evaluator with the same settings.  ``implied_by``: settings of other parts (e.g. the experiment
option ``restore_activations``) whose flag, typed, adds this evaluator.

**Sharing a forward.**  An evaluator whose :meth:`~Evaluator.evaluate` is exactly one model forward
per batch of the evaluation windows (this rank's share, in order, ``batch_size`` per batch) says so
with ``drives = True`` (perplexity).  An evaluator that can measure from hooks on someone else's
forward implements :meth:`~Evaluator.observing`; the measurer then runs it inside a driver's
evaluation over the same windows instead of running a forward of its own (one forward per batch
for both).

An evaluator may also have a results file of its own (``results_file``, e.g. ``task_results.json``):
the tools hand it every row they measured, grouped as the experiments grouped them
(:class:`Measured`), and write what :meth:`Evaluator.results` returns; reporting it is one module
of ``esa/reporting`` (:mod:`esa.reporting.parts`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import torch

from esa.options import Option, Options
from esa.registry import Registry

NEEDS = ("eval_windows", "tokenizer", "model")


@dataclass(frozen=True)
class EvalInputs:
    """What evaluators may read: ``windows`` ``[W, L]`` int64 evaluation windows (the same for every
    condition; None where a tool has none), ``batch_size`` windows per forward pass, the
    ``tokenizer`` (None where a tool has none), and the ``model`` every condition changes in place,
    unmodified when the evaluators are built (for an evaluator that wraps it once, e.g. lm-eval's
    HFLM; ``evaluate`` is always handed this same object)."""

    windows: torch.Tensor | None
    batch_size: int
    tokenizer: object | None = None
    model: torch.nn.Module | None = None


@dataclass(frozen=True)
class Measured:
    """The rows one experiment of a run measured (or the super-weight ablation), for an evaluator's
    own results file: ``rows[seed][group][condition]`` = the condition's row, which holds each
    evaluator's record under the evaluator's name; ``group_by``: what the groups are (``k``, ``block
    size``; "" for one group); ``pairs``: the conditions the experiment compares across seeds,
    ``(a, b)`` = a vs b (perturbation: top_k vs each control)."""

    experiment: str
    rows: dict[int, dict[Hashable, dict[str, dict]]]
    group_by: str = ""
    pairs: tuple[tuple[str, str], ...] = ()

    def each(self) -> Iterator[tuple[int, Hashable, str, dict]]:
        """Every row as ``(seed, group, condition, row)``, in measuring order."""
        for seed, groups in self.rows.items():
            for group, conds in groups.items():
                for cond, row in conds.items():
                    yield seed, group, cond, row


class Evaluator:
    """One measurement.  Subclasses set the class attributes through :func:`evaluator` and implement
    :meth:`evaluate`; ``self.options`` holds the run's evaluator options, ``self.inputs`` the inputs."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    options: ClassVar[tuple[Option, ...]] = ()
    implied_by: ClassVar[tuple[str, ...]] = ()
    drives: ClassVar[bool] = False  # evaluate() = one forward per batch of the windows, in order (see module doc)
    results_file: ClassVar[str] = ""  # its own results file ("" = its records live only in the rows)

    @classmethod
    def validate(cls, options: Options) -> None:
        """Checks of its options that need more than one value, or the environment (installed
        packages, data folders); run before the model loads.  Raise :class:`esa.errors.UsageError`."""

    @classmethod
    def plan(cls, options: Options) -> str:
        """What a dry run says about it (default: its name)."""
        return cls.name

    def __init__(self, options: Options, inputs: EvalInputs) -> None:
        self.options = options
        self.inputs = inputs

    def settings(self) -> dict:
        """This evaluator's own settings (its declared options), recorded and part of its key."""
        return {o.name: self.options[o.name] for o in type(self).options if o.name in self.options}

    def key(self) -> str:
        """``name`` plus a hash of :meth:`settings`: equal keys, interchangeable records."""
        s = self.settings()
        if not s:
            return self.name
        return f"{self.name}:{hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:16]}"

    def evaluate(self, model: torch.nn.Module, baseline: dict | None, label: str) -> dict:
        raise NotImplementedError

    def observing(self, model: torch.nn.Module, baseline: dict | None
                  ) -> AbstractContextManager[Callable[[str], dict]] | None:
        """Hooks that measure the forward passes a driver (``drives``) runs inside the block, over
        ``self.inputs.windows`` in batches of ``self.inputs.batch_size``; the block yields
        ``finish(label)``, which returns the record :meth:`evaluate` would have.  None: this
        evaluator cannot observe (it always runs its own evaluation)."""
        return None

    def results(self, baseline: dict, measured: list[Measured]) -> dict:
        """The content of :attr:`results_file` from its record of the unmodified model and every
        measured row (an empty list in the baseline tool); only called when it has a results file."""
        raise NotImplementedError


EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")


def evaluator(name: str, *, help: str, needs: tuple[str, ...] = (), options: tuple[Option, ...] = (),
              implied_by: tuple[str, ...] = (), results_file: str = ""
              ) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Register the decorated :class:`Evaluator` subclass as ``name`` (a duplicate name is an error)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"evaluator {name!r}: unknown needs {sorted(unknown)}; choose from {', '.join(NEEDS)}")

    def deco(cls: type[Evaluator]) -> type[Evaluator]:
        taken = {o.name for o in evaluator_options()}
        clash = [o.name for o in options if o.name in taken]
        if clash:
            raise ValueError(f"evaluator {name!r}: options {clash} are already declared by another evaluator")
        cls.name, cls.help, cls.needs, cls.options = name, help, frozenset(needs), tuple(options)
        cls.implied_by, cls.results_file = tuple(implied_by), results_file
        EVALUATORS.add(name, cls)
        return cls
    return deco


def evaluator_options() -> list[Option]:
    """Every option declared by a registered evaluator, in registration order."""
    return [o for name in EVALUATORS for o in EVALUATORS[name].options]
