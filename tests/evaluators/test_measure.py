"""The measurer: every condition x every evaluator once, the row shape, the cache, the journal; and
the perplexity evaluator against a plain loop."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from esa.evaluators import EvalInputs, Evaluator
from esa.evaluators.measure import Measurer
from esa.evaluators.perplexity import Perplexity
from esa.experiment.registry import Condition
from esa.options import Options
from esa.outdir.journal import Journal


class Counting(Evaluator):
    """Records how often it ran; its record reads a number the conditions change."""

    name = "counting"

    def __init__(self, state: dict, name: str = "counting") -> None:
        super().__init__(Options(), EvalInputs(None, 1))
        self.state, self.name, self.calls = state, name, 0

    def evaluate(self, model, baseline, label):
        self.calls += 1
        rec = {"value": self.state["value"]}
        if baseline is not None:
            rec["change"] = self.state["value"] - baseline["value"]
        return rec


def setting(state: dict, value: float, key: str) -> Condition:
    @contextlib.contextmanager
    def change():
        before = state["value"]
        state["value"] = value
        try:
            yield {"set_to": value}
        finally:
            state["value"] = before
    return Condition(f"set {value}", key, change, f"set {value}")


def test_each_condition_is_measured_once_by_each_evaluator_and_rows_nest_the_others():
    state = {"value": 1.0}
    ref, other = Counting(state, "ref"), Counting(state, "other")
    m = Measurer(torch.nn.Linear(1, 1), [ref, other])
    row = m.measure(setting(state, 3.0, "a"))
    assert row == {"value": 3.0, "change": 2.0, "set_to": 3.0, "other": {"value": 3.0, "change": 2.0}}
    assert state["value"] == 1.0  # restored
    assert m.measure(setting(state, 99.0, "a")) == row  # same key: the cached records, nothing re-run
    assert (ref.calls, other.calls) == (2, 2)  # baseline + one condition each
    assert m.baseline() == {"value": 1.0, "other": {"value": 1.0}}


def test_the_journal_lets_a_new_measurer_skip_what_was_measured(tmp_path):
    state = {"value": 1.0}
    first = Counting(state)
    Measurer(torch.nn.Linear(1, 1), [first], Journal(tmp_path)).measure(setting(state, 2.0, "k"))
    again = Counting(state)
    done = Journal(tmp_path, write=False).load()
    assert len(done) == 2  # the baseline and the condition
    row = Measurer(torch.nn.Linear(1, 1), [again], done=done).measure(setting(state, 2.0, "k"))
    assert again.calls == 0 and row == {"value": 2.0, "change": 1.0, "set_to": 2.0}


def test_a_failing_evaluation_still_restores_the_condition():
    state = {"value": 1.0}

    class Boom(Counting):
        def evaluate(self, model, baseline, label):
            if baseline is not None:
                raise RuntimeError("boom")
            return super().evaluate(model, baseline, label)

    m = Measurer(torch.nn.Linear(1, 1), [Boom(state)])
    with pytest.raises(RuntimeError):
        m.measure(setting(state, 5.0, "x"))
    assert state["value"] == 1.0


def test_perplexity_equals_a_plain_loop(llama, windows):
    ev = Perplexity(Options(), EvalInputs(windows, 4))
    base = ev.evaluate(llama, None, "baseline")
    with torch.no_grad():
        logits = llama(input_ids=windows).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1))
    assert base["tokens"] == windows.shape[0] * (windows.shape[1] - 1)
    assert base["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-6)
    with torch.no_grad():
        llama.lm_head.weight.mul_(2.0)
    try:
        row = ev.evaluate(llama, base, "doubled head")
    finally:
        with torch.no_grad():
            llama.lm_head.weight.div_(2.0)
    assert row["ratio"] == pytest.approx(row["ppl"] / base["ppl"]) and row["delta_ppl"] != 0.0
