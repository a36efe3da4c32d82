"""esa.experiment.selection: Top-K, bottom-K and random-K against a full-sort reference, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esa.errors import UsageError
from esa.experiment.controls import control
from esa.experiment.selection import Selection, extreme_k, top_k

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = {"a.weight": (7, 9), "b.weight": (40,), "c.weight": (5, 6, 2), "d.weight": (3, 4)}
NAMES = list(SHAPES)


def make_scores(seed: int = 0, levels: int | None = 5) -> dict[str, torch.Tensor]:
    """Scores with many exact ties (``levels`` distinct values), or continuous when levels is None."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, shape in SHAPES.items():
        if levels is None:
            out[n] = torch.rand(shape, generator=gen)
        else:
            out[n] = torch.randint(0, levels, shape, generator=gen).float()
    return out


def reference_rows(scores, names, largest=True) -> list[tuple[str, int, float]]:
    """Every weight, fully sorted by (score desc|asc, target order asc, flat index asc)."""
    tid = np.concatenate([np.full(scores[n].numel(), t) for t, n in enumerate(names)])
    idx = np.concatenate([np.arange(scores[n].numel()) for n in names])
    val = np.concatenate([scores[n].reshape(-1).double().numpy() for n in names])
    perm = np.lexsort((idx, tid, -val if largest else val))
    return [(names[tid[j]], int(idx[j]), float(val[j])) for j in perm]


def reference_per_layer(scores, names, k, largest=True) -> dict[str, list[int]]:
    out = {}
    for n in names:
        rows = reference_rows({n: scores[n]}, [n], largest)
        out[n] = [i for _, i, _ in rows[:k]]
    return out


def as_sets(sel: Selection) -> dict[str, set[int]]:
    return {n: set(v.tolist()) for n, v in sel.indices.items()}


# ----------------------------------------------------------------------------- extreme_k

@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [1, 5, 17, 40, 100])
def test_extreme_k_matches_full_sort_with_ties(k, largest):
    flat = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(k)).float()
    got = extreme_k(flat, k, largest).tolist()
    v = flat.double().numpy()
    ref = np.lexsort((np.arange(40), -v if largest else v))[:min(k, 40)].tolist()
    assert got == ref  # same members and same order (value, then lowest index first)


def test_extreme_k_ties_go_to_lowest_indices():
    flat = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.0, 0.0, 2.0])
    assert extreme_k(flat, 3).tolist() == [1, 2, 4]
    assert extreme_k(flat, 6).tolist() == [1, 2, 4, 5, 3, 8]
    assert extreme_k(flat, 1, largest=False).tolist() == [6]
    assert extreme_k(flat, 4, largest=False).tolist() == [6, 7, 0, 3]
    assert torch.equal(extreme_k(torch.zeros(5), 2), torch.tensor([0, 1]))


def test_extreme_k_returns_int64_indices():
    idx = extreme_k(torch.rand(10), 3)
    assert idx.dtype == torch.int64


# ----------------------------------------------------------------------------- top_k / bottom_k

@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("levels", [5, 2, None])
def test_top_k_per_layer(k, levels):
    scores = make_scores(levels=levels)
    sel = top_k(scores, NAMES, k, "per_layer")
    ref = reference_per_layer(scores, NAMES, k)
    assert sel.kind == "top_k"
    assert {n: v.tolist() for n, v in sel.indices.items()} == ref
    for n in NAMES:
        assert sel.indices[n].dtype == torch.int64
        assert torch.equal(sel.scores[n], scores[n].reshape(-1)[sel.indices[n]])
        assert sel.scores[n].dtype == torch.float32
    assert sel.size == k * len(NAMES)


@pytest.mark.parametrize("k", [1, 7, 25, 60, 150])
@pytest.mark.parametrize("levels", [5, 2, None])
def test_top_k_global(k, levels):
    scores = make_scores(seed=3, levels=levels)
    sel = top_k(scores, NAMES, k, "global")
    ref = reference_rows(scores, NAMES)[:k]
    assert sel.size == k
    assert sel.ranked(NAMES) == ref
    assert sel.keys() == {(n, i) for n, i, _ in ref}


def test_top_k_global_tie_break_prefers_earlier_target():
    scores = {"x": torch.tensor([1.0, 5.0, 5.0]), "y": torch.tensor([5.0, 5.0, 9.0])}
    sel = top_k(scores, ["x", "y"], 3, "global")
    assert sel.ranked(["x", "y"]) == [("y", 2, 9.0), ("x", 1, 5.0), ("x", 2, 5.0)]
    # target order is the given order, not alphabetical
    sel = top_k(scores, ["y", "x"], 3, "global")
    assert sel.ranked(["y", "x"]) == [("y", 2, 9.0), ("y", 0, 5.0), ("y", 1, 5.0)]


def test_top_k_global_all_from_one_tensor():
    scores = {"a": torch.zeros(10), "b": torch.arange(10.0) + 1}
    sel = top_k(scores, ["a", "b"], 4, "global")
    assert sel.indices["a"].numel() == 0
    assert sorted(sel.indices["b"].tolist()) == [6, 7, 8, 9]


@pytest.mark.parametrize("mode", ["per_layer", "global"])
@pytest.mark.parametrize("levels", [5, None])
def test_bottom_k(mode, levels):
    scores = make_scores(seed=5, levels=levels)
    k = 6
    rng = np.random.default_rng(0)
    top = top_k(scores, NAMES, k, mode, need=2)
    sel = control("bottom_k", scores, NAMES, k, mode, top, rng)
    assert sel.kind == "bottom_k"
    if mode == "per_layer":
        ref = reference_per_layer(scores, NAMES, k, largest=False)
        assert {n: sorted(v.tolist()) for n, v in sel.indices.items()} == {n: sorted(v) for n, v in ref.items()}
        for n in NAMES:
            assert sel.ranked(NAMES) and sel.ranked([n]) == reference_rows({n: scores[n]}, [n], largest=False)[:k]
    else:
        ref = reference_rows(scores, NAMES, largest=False)[:k]
        assert sel.ranked(NAMES) == ref
    for n in NAMES:
        assert torch.equal(sel.scores[n], scores[n].reshape(-1)[sel.indices[n]])


def test_selection_ranked_order():
    sel = Selection("top_k",
                    {"p": torch.tensor([4, 0, 2]), "q": torch.tensor([1, 3]), "r": torch.tensor([], dtype=torch.long)},
                    {"p": torch.tensor([2.0, 7.0, 2.0]), "q": torch.tensor([7.0, 2.0]), "r": torch.tensor([])})
    assert sel.ranked(["p", "q", "r"]) == [("p", 0, 7.0), ("q", 1, 7.0), ("p", 2, 2.0), ("p", 4, 2.0),
                                           ("q", 3, 2.0)]
    assert sel.ranked(["q", "p"]) == [("q", 1, 7.0), ("p", 0, 7.0), ("q", 3, 2.0), ("p", 2, 2.0),
                                      ("p", 4, 2.0)]
    assert sel.size == 5
    assert sel.keys() == {("p", 4), ("p", 0), ("p", 2), ("q", 1), ("q", 3)}
    bottom = Selection("bottom_k", sel.indices, sel.scores)
    assert bottom.ranked(["p", "q"]) == [("p", 2, 2.0), ("p", 4, 2.0), ("q", 3, 2.0), ("p", 0, 7.0),
                                         ("q", 1, 7.0)]
    assert Selection("top_k", {"r": torch.tensor([], dtype=torch.long)}, {"r": torch.tensor([])}).ranked(["r"]) == []


# ----------------------------------------------------------------------------- random_k

def _random(scores, k, mode, seed):
    top = top_k(scores, NAMES, k, mode, need=2)
    return top, control("random_k", scores, NAMES, k, mode, top, np.random.default_rng(seed))


@pytest.mark.parametrize("k", [2, 6])  # k=6 makes the 12-weight tensor dense (free <= 4k)
def test_random_k_per_layer_structure(k):
    scores = make_scores(levels=None)
    top, rnd = _random(scores, k, "per_layer", seed=1)
    assert rnd.kind == "random_k"
    for n in NAMES:
        idx = rnd.indices[n].tolist()
        assert len(idx) == k and len(set(idx)) == k
        assert all(0 <= i < scores[n].numel() for i in idx)
        assert not set(idx) & set(top.indices[n].tolist())
        assert rnd.indices[n].dtype == torch.int64
        assert torch.equal(rnd.scores[n], scores[n].reshape(-1)[rnd.indices[n]])


@pytest.mark.parametrize("k", [5, 50])  # 50 of 175 weights: the dense branch
def test_random_k_global_structure(k):
    scores = make_scores(levels=None)
    top, rnd = _random(scores, k, "global", seed=1)
    assert rnd.size == k
    keys = rnd.keys()
    assert len(keys) == k
    assert not keys & top.keys()
    for n in NAMES:
        assert all(0 <= i < scores[n].numel() for i in rnd.indices[n].tolist())
        assert torch.equal(rnd.scores[n], scores[n].reshape(-1)[rnd.indices[n]])


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_random_k_reproducible_and_seed_dependent(mode):
    scores = make_scores(levels=None)
    _, a = _random(scores, 3, mode, seed=11)
    _, b = _random(scores, 3, mode, seed=11)
    _, c = _random(scores, 3, mode, seed=12)
    assert {n: v.tolist() for n, v in a.indices.items()} == {n: v.tolist() for n, v in b.indices.items()}
    assert a.keys() != c.keys()


def test_random_k_global_is_disjoint_even_with_ties():
    scores = make_scores(levels=2)  # half the weights tie with the threshold
    top, rnd = _random(scores, 60, "global", seed=0)
    assert not rnd.keys() & top.keys()
    assert rnd.size == 60


@pytest.mark.parametrize("n", [50, 20])  # 45 free of 50: rejection sampling; 15 free of 20: dense
def test_random_k_per_layer_uniform_over_non_top(n):
    """Every non-top weight is drawn about equally often; top weights never."""
    scores = {"w": torch.arange(float(n))}
    top = top_k(scores, ["w"], 5, "per_layer", need=2)
    counts = np.zeros(n)
    for seed in range(1500):
        sel = control("random_k", scores, ["w"], 5, "per_layer", top, np.random.default_rng(seed))
        assert len(set(sel.indices["w"].tolist())) == 5
        counts[sel.indices["w"].numpy()] += 1
    assert counts[n - 5:].sum() == 0
    expected = 1500 * 5 / (n - 5)
    assert np.all(np.abs(counts[:n - 5] - expected) < 0.3 * expected)


def test_random_k_global_proportional_to_tensor_size():
    scores = {"small": torch.rand(20), "big": torch.rand(180)}
    names = ["small", "big"]
    top = top_k(scores, names, 4, "global", need=2)
    n_small = 0
    draws = 400
    for seed in range(draws):
        sel = control("random_k", scores, names, 4, "global", top, np.random.default_rng(seed))
        assert sel.size == 4
        n_small += len(sel.indices["small"])
    free_small = 20 - len(top.indices["small"])
    frac = free_small / (200 - 4)
    assert abs(n_small / (4 * draws) - frac) < 0.04


# ----------------------------------------------------------------------------- size checks

def test_usage_error_per_layer_k_too_large():
    scores = make_scores()  # smallest tensor: d.weight with 12 weights
    top_k(scores, NAMES, 12, "per_layer")
    with pytest.raises(UsageError, match="d.weight"):
        top_k(scores, NAMES, 13, "per_layer")
    top_k(scores, NAMES, 6, "per_layer", need=2)
    with pytest.raises(UsageError, match="controls"):
        top_k(scores, NAMES, 7, "per_layer", need=2)


def test_usage_error_global_k_too_large():
    scores = make_scores()
    total = sum(s.numel() for s in scores.values())
    assert total == 175
    top_k(scores, NAMES, 175, "global")
    with pytest.raises(UsageError, match="global"):
        top_k(scores, NAMES, 176, "global")
    top_k(scores, NAMES, 87, "global", need=2)
    with pytest.raises(UsageError, match="controls"):
        top_k(scores, NAMES, 88, "global", need=2)


def test_full_global_top_k_is_everything_in_order():
    scores = make_scores(levels=3)
    sel = top_k(scores, NAMES, 175, "global")
    assert sel.ranked(NAMES) == reference_rows(scores, NAMES)
