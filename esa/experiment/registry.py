"""Experiments as registered objects that yield *conditions*; the condition record; the registry.

A **condition** is a reversible, named change of the model: ``change()`` is a context manager that
changes the model, yields ``info`` (what it did: weights perturbed, protected, ...) and restores the
model bit-exactly on exit, whatever happens inside; ``key`` says what its measurements depend on
(equal keys, equal measurements: the run's evaluation cache and the journal of ``--resume``).

An **experiment** (perturbation, quantization, ...) is an :class:`Experiment` subclass registered
with :func:`experiment`.  It declares its options (flags), says when a run does it (:meth:`enabled`)
and validates its options; for a run it is built on the run's view of one metric
(:class:`RunView`), turns each seed's selections into conditions (:meth:`conditions`, each placed in
a group such as a k or a block size), and turns the measured rows into its results file
(:meth:`results`).  The runner measures every condition with every evaluator; the experiment never
evaluates anything itself.  Adding an experiment is one module in this package plus its test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from esa.experiment.selection import Selection
from esa.model.targets import Target
from esa.options import Option, Options
from esa.registry import Registry


def evaluation_key(settings: tuple, indices: dict[str, torch.Tensor]) -> str:
    """What a condition's measurements depend on: ``settings`` (the change and its parameters, its
    random stream) and the chosen weights per tensor in their stored order (a Gaussian draw follows
    that order).  Equal keys, equal measurements."""
    h = hashlib.sha256(repr(settings).encode())
    for name in sorted(indices):
        h.update(name.encode() + b"\0" + indices[name].numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Condition:
    """A reversible change of the model (see the module docstring); ``label`` names it in logs."""

    name: str
    key: str
    change: Callable[[], AbstractContextManager[dict]]
    label: str


@dataclass
class SeedSelections:
    """What one seed leaves behind for the experiments: its selections (never full scores).

    ``sweep``: the Top-K and controls of every ``--topk-sweep`` k other than ``--topk``.
    ``kept``: per experiment, what it computed from the full scores while they were alive
    (:meth:`Experiment.keep`, e.g. pruning's bit-packed masks), ``{key: CPU tensor}``."""

    seed: int
    top: Selection
    controls: dict[str, Selection]
    calibration_windows: list[int]  # pool indices of the windows this seed scored on
    sweep: dict[int, tuple[Selection, dict[str, Selection]]]
    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class RunView(Protocol):
    """What an experiment reads of the run: one metric's view (:class:`esa.runner.context.RunContext`)."""

    targets: list[Target]
    names: list[str]
    by_name: dict[str, Target]
    metric: str
    mode: str
    topk: int
    seeds: tuple[int, ...]
    options: Options  # every experiment option of the run
    eval_windows: int
    super_weights: dict | None  # the detector's result (with --detect-super-weights), else None
    # writes the baseline's massive activations back into the residual stream inside the block (the
    # runner provides it when the run measures them and --restore-activations asks for it), else None
    restoring: Callable[[], AbstractContextManager[dict]] | None


# per seed: {group: {condition name: row}}; a group is what the experiment placed the condition in
Rows = dict[int, dict[Hashable, dict[str, dict]]]


class Experiment:
    """One experiment; subclasses set the class attributes through :func:`experiment`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    results_file: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    group_by: ClassVar[str] = ""  # what its conditions' groups are ("k", "block size")

    @classmethod
    def pairs(cls, conditions: list[str]) -> list[tuple[str, str]]:
        """The conditions it compares across seeds, ``(a, b)`` = a vs b, among ``conditions``; an
        evaluator's own results file tests the same pairs (default: none)."""
        return []

    @classmethod
    def enabled(cls, opts: Options) -> bool:
        """Whether a run with these options does this experiment."""
        raise NotImplementedError

    @classmethod
    def validate(cls, opts: Options) -> None:
        """Raise :class:`esa.errors.UsageError` for a bad combination of options (before loading)."""

    @classmethod
    def restrict(cls, model: torch.nn.Module, targets: list[Target], included: bool
                 ) -> tuple[list[Target], dict[str, str]]:
        """The targets this experiment can change and the others with the reason (default: all)."""
        return targets, {}

    @classmethod
    def keep(cls, view: RunView, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What this experiment needs of one seed's full scores (target name -> fp32 scores in the
        target's shape), computed while they are alive: the runner frees them before any condition
        and keeps only the selections and this (``SeedSelections.kept[name]``, also in the seed's
        checkpoint).  CPU tensors, far smaller than the scores.  Default: nothing."""
        return {}

    def __init__(self, view: RunView) -> None:
        self.view = view
        self.opts = view.options

    def check(self) -> None:
        """Checks that need the loaded model, run before any scoring (UsageError)."""

    def conditions(self, sel: SeedSelections) -> Iterator[tuple[Hashable, Condition]]:
        """The seed's conditions, each with the group its row belongs to."""
        raise NotImplementedError

    def results(self, rows: Rows, baseline: dict) -> dict:
        """The results file's content from every seed's measured rows and the baseline row."""
        raise NotImplementedError


EXPERIMENTS: Registry[type[Experiment]] = Registry("experiment")


def experiment(name: str, *, help: str, results_file: str, options: tuple[Option, ...] = ()
               ) -> Callable[[type[Experiment]], type[Experiment]]:
    """Register the decorated :class:`Experiment` subclass as ``name`` (a duplicate name is an error)."""
    def deco(cls: type[Experiment]) -> type[Experiment]:
        taken = {o.name for o in experiment_options()}
        clash = [o.name for o in options if o.name in taken]
        if clash:
            raise ValueError(f"experiment {name!r}: options {clash} are already declared by another experiment")
        cls.name, cls.help, cls.results_file, cls.options = name, help, results_file, tuple(options)
        EXPERIMENTS.add(name, cls)
        return cls
    return deco


def experiment_options() -> list[Option]:
    """Every option declared by a registered experiment, in registration order."""
    return [o for name in EXPERIMENTS for o in EXPERIMENTS[name].options]


def enabled_experiments(opts: Options) -> list[type[Experiment]]:
    """The experiments a run with ``opts`` does, in registration order."""
    return [EXPERIMENTS[n] for n in EXPERIMENTS if EXPERIMENTS[n].enabled(opts)]
