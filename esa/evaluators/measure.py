"""Every condition of a run, measured by every requested evaluator, once.

A *condition* is a reversible change of the model (:class:`esa.experiment.registry.Condition`): it
has a stable ``key`` and ``change()``, a context manager that changes the model, yields what it did
(``info``, e.g. how many weights changed) and restores the model bit-exactly on exit.  The
:class:`Measurer` applies a condition once, runs each evaluator that has no record for it yet,
and assembles the condition's row.

Records are cached by ``(condition key, evaluator key)``: a condition equal to one already measured
(another metric's identical ``random_k`` draw, a seed-independent quantization) reuses the record
(the model is restored bit-exactly after each condition and the evaluation inputs are fixed, so
measuring again would give the same numbers).  With a :class:`esa.outdir.journal.Journal`, each
record is appended as it is measured, so ``--resume`` skips it; no evaluator knows about either.

**Row shape.**  The first evaluator (perplexity in every tool) is the run's reference: its record
is the row's top level, the condition's ``info`` follows, and every other evaluator's record sits
under its own name: ``{"ppl": ..., "ratio": ..., "n_changed": ..., "tasks": {...}}``.

**One forward for several evaluators.**  When a condition needs a *driver* (an evaluator whose
evaluation is one forward per batch of the evaluation windows: perplexity) and an evaluator that
can observe (:meth:`~esa.evaluators.registry.Evaluator.observing`, e.g. ``activations``) on the same
windows and batch size, the observer's hooks ride the driver's forward: one forward per batch for
both.  The driver's numbers do not change (the hooks only read).  Otherwise each evaluator runs its
own evaluation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import torch

from esa.evaluators.registry import EvalInputs, Evaluator, Measured
from esa.options import Options
from esa.outdir.journal import Journal

log = logging.getLogger("esa")

BASELINE = "baseline"


class ConditionLike(Protocol):
    """What the measurer needs of a condition (:class:`esa.experiment.registry.Condition`)."""

    key: str
    label: str
    change: Callable[[], AbstractContextManager[dict]]


class Measurer:
    """Measures the baseline and conditions of ``model`` with ``evaluators`` (the first is the
    reference: see the module docstring); ``journal`` (optional) records each measurement, and
    ``done`` (a journal's :meth:`~esa.outdir.journal.Journal.load`) is what an earlier, interrupted
    run measured."""

    def __init__(self, model: torch.nn.Module, evaluators: list[Evaluator], journal: Journal | None = None,
                 done: dict[str, dict] | None = None) -> None:
        if not evaluators:
            raise ValueError("a measurer needs at least one evaluator")
        self.model = model
        self.evaluators = evaluators
        self.journal = journal
        self.cache: dict[str, dict] = dict(done or {})  # "<condition key>|<evaluator key>" -> {record, info}

    @classmethod
    def perplexity(cls, model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> Measurer:
        """The measurer of perplexity alone on ``windows`` ``[W, L]`` (no journal): every tool's default."""
        from esa.evaluators.perplexity import Perplexity

        return cls(model, [Perplexity(Options(), EvalInputs(windows, batch_size))])

    def _cached(self, cond_key: str, ev: Evaluator) -> dict | None:
        return self.cache.get(f"{cond_key}|{ev.key()}")

    def _store(self, cond_key: str, ev: Evaluator, record: dict, info: dict) -> None:
        key = f"{cond_key}|{ev.key()}"
        entry = {"record": record, "info": dict(info)}
        self.cache[key] = entry
        if self.journal is not None:
            self.journal.append(key, entry)

    def baselines(self) -> dict[str, dict]:
        """Each evaluator's record of the unmodified model (measured once, then cached)."""
        missing = [ev for ev in self.evaluators if self._cached(BASELINE, ev) is None]
        if missing:
            log.info("baseline: %s of the unmodified model", ", ".join(ev.name for ev in missing))
            self._evaluate(BASELINE, missing, None, BASELINE, {})
            for ev in missing:
                log.info("baseline %s: %s", ev.name, _headline(self._cached(BASELINE, ev)["record"]))
        return {ev.name: self._cached(BASELINE, ev)["record"] for ev in self.evaluators}

    def _evaluate(self, cond_key: str, missing: list[Evaluator], base: dict[str, dict] | None, label: str,
                  info: dict) -> None:
        """Measure and store ``missing`` on the model as it is now (``base``: the baseline records, None
        while measuring the baseline): observers ride the first driver's forward (module docstring)."""
        driver = next((ev for ev in missing if ev.drives), None)
        rest = [ev for ev in missing if ev is not driver]
        with contextlib.ExitStack() as hooks:
            finish: dict[str, Callable[[str], dict]] = {}
            for ev in rest if driver is not None else []:
                watch = ev.observing(self.model, None if base is None else base[ev.name]) \
                    if _same_inputs(ev, driver) else None
                if watch is not None:
                    finish[ev.name] = hooks.enter_context(watch)
            if driver is not None:
                self._store(cond_key, driver, driver.evaluate(self.model, None if base is None else base[driver.name],
                                                              label), info)
            for ev in rest:
                if ev.name in finish:
                    self._store(cond_key, ev, finish[ev.name](label), info)
        for ev in rest:
            if ev.name not in finish:
                self._store(cond_key, ev, ev.evaluate(self.model, None if base is None else base[ev.name], label), info)

    def baseline(self) -> dict:
        """The baseline row: the reference record, then the other evaluators' records by name."""
        records = self.baselines()
        return self._row(records, {})

    def measure(self, cond: ConditionLike) -> dict:
        """The condition's row (see the module docstring), measuring only what is not cached."""
        base = self.baselines()
        missing = [ev for ev in self.evaluators if self._cached(cond.key, ev) is None]
        if missing:
            with cond.change() as info:
                self._evaluate(cond.key, missing, base, cond.label, dict(info))
        else:
            first = self._cached(cond.key, self.evaluators[0])["record"]
            log.info("%s: the same change as a condition already measured (%s %s), not re-run", cond.label,
                     self.evaluators[0].name, _headline(first))
        info = self._cached(cond.key, self.evaluators[0])["info"]
        return self._row({ev.name: self._cached(cond.key, ev)["record"] for ev in self.evaluators}, info)

    def results_files(self, measured: list[Measured]) -> dict[str, dict]:
        """``{results file: content}`` of every evaluator that has a results file of its own, from
        the rows of ``measured``; with no rows (a scores-only run) its record of the unmodified model
        alone, which the user asked for by naming the evaluator."""
        if not any(ev.results_file for ev in self.evaluators):
            return {}  # (the baseline is not measured for nothing)
        return results_files(self.evaluators, self.baselines(), measured)

    def _row(self, records: dict[str, dict], info: dict) -> dict:
        ref = self.evaluators[0].name
        return {**records[ref], **info, **{name: rec for name, rec in records.items() if name != ref}}


def _same_inputs(ev: Evaluator, driver: Evaluator) -> bool:
    """Whether ``ev`` reads exactly the windows and batches ``driver``'s forward runs over."""
    a, b = ev.inputs.windows, driver.inputs.windows
    return (a is not None and b is not None and ev.inputs.batch_size == driver.inputs.batch_size
            and (a is b or (a.shape == b.shape and torch.equal(a, b))))


def results_files(evaluators: list[Evaluator], baselines: dict[str, dict], measured: list[Measured]
                  ) -> dict[str, dict]:
    """``{results file: content}`` of each of ``evaluators`` that has one (``Evaluator.results_file``),
    from its record of the unmodified model (``baselines[name]``) and the measured rows."""
    return {ev.results_file: ev.results(baselines[ev.name], measured) for ev in evaluators if ev.results_file}


def _headline(record: dict) -> str:
    """The number a log line quotes for a record (its first value), to 6 significant digits: a log
    line is read, and the record keeps every digit."""
    value = next(iter(record.values()), "") if record else ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def unchanged() -> AbstractContextManager[dict]:
    """The change of a condition that changes nothing (yields empty info)."""
    return contextlib.nullcontext({})
