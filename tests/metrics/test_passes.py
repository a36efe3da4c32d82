"""The pass engine: several metrics in one run give each metric's own scores, with each kind of pass
run once."""

from __future__ import annotations

import itertools

import pytest
import torch

from esa.metrics import METRICS, MetricContext, compute_scores, score_metrics
from esa.metrics.passes import GradientStore
from esa.model.placement import checkpointed_blocks
from esa.model.targets import find_targets

ALL = sorted(METRICS)


def ctx() -> MetricContext:
    return MetricContext(seed=3, hutchinson_samples=2, curvature_samples=1)


def scorable(model, names):
    cans = [METRICS[n].can_score or (lambda t: None) for n in names]
    return [t for t in find_targets(model) if all(c(t) is None for c in cans)]


_ALONE: dict[str, tuple] = {}


@pytest.fixture
def alone(tiny_model, windows):
    """Each metric scored on its own (the reference), on the targets every metric can score; computed
    once per model family (the models are built deterministically)."""
    key = type(tiny_model).__name__
    if key not in _ALONE:
        targets = scorable(tiny_model, ALL)
        _ALONE[key] = ([t.name for t in targets],
                       {m: compute_scores(m, tiny_model, targets, windows, 2, ctx()) for m in ALL})
    names, reference = _ALONE[key]
    return [t for t in find_targets(tiny_model) if t.name in names], reference


@pytest.mark.parametrize("pair", list(itertools.combinations(ALL, 2)), ids="+".join)
def test_every_pair_in_one_pass_equals_each_metric_alone(tiny_model, windows, alone, pair):
    targets, reference = alone
    for order in (pair, pair[::-1]):  # the order of the metrics changes nothing either
        got = {s.metric: s.scores for s in score_metrics(list(order), tiny_model, targets, windows, 2, ctx())}
        assert list(got) == list(order)
        for m in pair:
            for t in targets:
                assert torch.equal(got[m][t.name], reference[m][t.name]), (m, order, t.name)


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize(("metrics", "forwards"), [
    # one batch forward (+ backward) serves grad_x_weight, act_mag and obs; magnitude needs none
    (["grad_x_weight", "act_mag", "obs", "magnitude"], "batches"),
    (["act_mag", "obs"], "batches"),
    # taylor2 = grad_x_weight's batch gradient + grad_squared's per-window backward: all three add no pass
    (["grad_squared", "taylor2", "grad_x_weight"], "batches+windows"),
    (["grad_squared"], "windows"),
    (["magnitude"], "none"),
])
def test_each_kind_of_pass_runs_once(llama, windows, metrics, forwards):
    targets = scorable(llama, metrics)
    calls, handle = count_forwards(llama)
    try:
        for _ in score_metrics(metrics, llama, targets, windows, 3, ctx()):
            pass
    finally:
        handle.remove()
    per = {"batches": [3] * (len(windows) // 3), "windows": [1] * len(windows), "none": []}
    expected = [n for part in forwards.split("+") for n in per[part]]
    assert calls == expected


def test_checkpointing_gives_observers_their_own_forward(llama, windows):
    """Recomputed forwards in backward would count twice in act_mag's sums: under checkpointing the
    observers get a no-grad forward of their own, and the scores stay those of act_mag alone."""
    targets = scorable(llama, ["act_mag", "grad_x_weight"])
    alone = compute_scores("act_mag", llama, targets, windows, 3)
    calls, handle = count_forwards(llama)
    try:
        with checkpointed_blocks(llama):
            got = {s.metric: s.scores for s in score_metrics(
                ["grad_x_weight", "act_mag"], llama, targets, windows, 3, MetricContext(recomputes_forward=True))}
    finally:
        handle.remove()
    for t in targets:
        torch.testing.assert_close(got["act_mag"][t.name], alone[t.name], rtol=0, atol=0)
    assert calls == [3] * (2 * len(windows) // 3)


def test_scores_come_one_metric_at_a_time(llama, windows):
    """The generator makes metric B's scores only after the caller has moved on from metric A's."""
    targets = scorable(llama, ["magnitude", "grad_x_weight"])
    made = []
    gen = score_metrics(["magnitude", "grad_x_weight"], llama, targets, windows, 4, ctx())
    first = next(gen)
    made.append(first.metric)
    assert first.metric == "magnitude"
    second = next(gen)
    assert second.metric == "grad_x_weight"
    with pytest.raises(StopIteration):
        next(gen)


def test_gradient_store_copies_for_all_but_the_last_reader():
    acc = torch.ones(3)
    store = GradientStore({"window_sq": {"w": acc}}, {"window_sq": ["taylor2", "grad_squared"]})
    first = store.take("window_sq", "taylor2", "w")
    assert first is not acc and torch.equal(first, acc)
    store.done("taylor2")
    assert store.take("window_sq", "grad_squared", "w") is acc  # the last reader scores in place
    with pytest.raises(KeyError, match="did not declare"):
        store.take("batch", "grad_squared", "w")
