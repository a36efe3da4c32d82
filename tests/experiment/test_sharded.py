"""Selection when each rank holds only some rows of every score tensor: ranks simulated by threads
(each with its own rows and an all-gather through a barrier) must select exactly what one process
holding whole tensors selects, for every mode, the Top-K and every control, with ties and uneven
splits (a rank may hold no row of a small tensor)."""

from __future__ import annotations

import threading

import pytest
import torch

from esa.experiment import controls, selection
from esa.experiment.sharded import Split
from esa.seeding import numpy_rng

SHAPES = {"linear": ((7, 6), 1), "conv1d": ((5, 9), 0), "experts": ((3, 4, 6), 2), "embedding": ((11, 4), 0),
          "norm": ((9,), None)}
NAMES = list(SHAPES)


def scores_and_weights(seed: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    # few distinct values: many ties, so the tie-break (target order, flat index) is exercised
    scores = {n: torch.randint(0, 6, shape, generator=gen).float() for n, (shape, _) in SHAPES.items()}
    weights = {}
    for n, (shape, _) in SHAPES.items():  # few |w| values (ties for random_mag_k), a few exact zeros (bottom_k)
        w = torch.randint(1, 4, shape, generator=gen).float() * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
        w.view(-1)[::7] = 0.0
        weights[n] = w
    return scores, weights


def rows_of(t: torch.Tensor, r: int, world: int) -> tuple[torch.Tensor, int]:
    """Rank r's rows under torch.chunk semantics (FSDP2): ceil(N/W) rows each, later ranks fewer or none."""
    chunk = -(-t.shape[0] // world)
    start = min(r * chunk, t.shape[0])
    return t[start:min(start + chunk, t.shape[0])], start


def on_ranks(world: int, fn):
    """Run ``fn(rank, exchange)`` on ``world`` threads whose ``exchange`` is an all-gather; every result."""
    slots, out, errors = [None] * world, [None] * world, []
    barrier = threading.Barrier(world)

    def exchange_of(r):
        def exchange(obj):
            slots[r] = obj
            barrier.wait()
            got = list(slots)
            barrier.wait()
            return got
        return exchange

    def body(r):
        try:
            out[r] = fn(r, exchange_of(r))
        except Exception as exc:  # noqa: BLE001 - re-raised below with the rank
            errors.append((r, exc))
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0][1]
    return out


def same(a: selection.Selection, b: selection.Selection) -> None:
    assert a.row_k == b.row_k
    for n in NAMES:
        assert torch.equal(a.indices[n], b.indices[n]), n
        assert torch.equal(a.scores[n], b.scores[n]), n


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["per_layer", "per_row", "global"])
def test_top_k_and_every_control_equal_the_whole_tensor_selection(world, mode):
    scores, weights = scores_and_weights(world)
    in_axes = {n: axis for n, (_, axis) in SHAPES.items()}
    k = 2
    whole_ctx = controls.ControlContext(weights, zeros_unchanged=True, in_axes=in_axes)
    top = selection.top_k(scores, NAMES, k, mode, need=2, in_axes=in_axes)
    expected = {c: controls.control(c, scores, NAMES, k, mode, top, numpy_rng(0, c), whole_ctx)
                for c in controls.CONTROLS}

    def rank(r, exchange):
        local = {n: rows_of(s, r, world)[0] for n, s in scores.items()}
        split = Split({n: (tuple(s.shape), rows_of(s, r, world)[1]) for n, s in scores.items()}, exchange)
        ctx = controls.ControlContext({n: rows_of(w, r, world)[0] for n, w in weights.items()}, zeros_unchanged=True,
                                      in_axes=in_axes, split=split, whole_weight=weights.__getitem__)
        mine = selection.top_k(local, NAMES, k, mode, need=2, in_axes=in_axes, split=split)
        return mine, {c: controls.control(c, local, NAMES, k, mode, mine, numpy_rng(0, c), ctx)
                      for c in controls.CONTROLS}

    for mine, ctl in on_ranks(world, rank):
        same(mine, top)
        for c in controls.CONTROLS:
            same(ctl[c], expected[c])


def test_a_tensor_smaller_than_the_ranks_and_the_prefix_of_a_sweep():
    scores = {"tiny": torch.tensor([[3.0, 1.0, 3.0]]), "big": torch.arange(40.0).reshape(10, 4) % 7}
    names = ["tiny", "big"]
    for mode, axes in (("per_layer", {}), ("global", {}), ("per_row", {"tiny": 1, "big": 1})):
        top = selection.top_k(scores, names, 2, mode, in_axes=axes)

        def rank(r, exchange, mode=mode, axes=axes):
            local = {n: rows_of(s, r, 4)[0] for n, s in scores.items()}
            split = Split({n: (tuple(s.shape), rows_of(s, r, 4)[1]) for n, s in scores.items()}, exchange)
            return selection.top_k(local, names, 2, mode, in_axes=axes, split=split)

        for mine in on_ranks(4, rank):
            for n in names:
                assert torch.equal(mine.indices[n], top.indices[n]) and torch.equal(mine.scores[n], top.scores[n])
            one, expected = mine.prefix(1, mode, names), top.prefix(1, mode, names)
            assert all(torch.equal(one.indices[n], expected.indices[n]) for n in names)


def test_a_failing_rank_cannot_leave_the_others_waiting():
    def rank(r, exchange):
        if r == 1:
            raise ValueError("rank 1 fails")
        return exchange(r)

    with pytest.raises((ValueError, threading.BrokenBarrierError)):
        on_ranks(2, rank)
