"""per_row selection and controls against a brute-force row loop, for every input-axis layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esa.errors import UsageError
from esa.experiment import controls
from esa.experiment.controls import ControlContext
from esa.experiment.rows import as_rows, flat_indices
from esa.experiment.selection import top_k

# name -> (shape, input axis): Linear [out, in], Conv1D [in, out], fused experts [E, out, in] and
# [E, in, out], a 1-D tensor (one row)
LAYOUTS = {"linear": ((6, 10), 1), "conv1d": ((10, 6), 0), "experts": ((3, 4, 10), 2),
           "experts_t": ((3, 10, 4), 1), "norm": ((10,), None)}


def brute_rows(shape, in_axis):
    """Per row, the flat indices of its weights in input order (an independent enumeration)."""
    rows: dict[tuple, list[int]] = {}
    for flat in range(int(np.prod(shape))):
        coords = np.unravel_index(flat, shape)
        key = tuple(c for a, c in enumerate(coords) if a != in_axis) if in_axis is not None else ()
        rows.setdefault(key, []).append(flat)
    return [rows[k] for k in sorted(rows)]


@pytest.fixture
def scores():
    gen = torch.Generator().manual_seed(0)
    out = {n: torch.rand(shape, generator=gen) for n, (shape, _) in LAYOUTS.items()}
    out["linear"].view(-1)[:4] = 0.5  # ties: the lower index must win
    return out


def test_as_rows_and_flat_indices_agree_with_a_brute_force_enumeration():
    for shape, axis in LAYOUTS.values():
        x = torch.arange(int(np.prod(shape))).reshape(shape)
        assert as_rows(x, axis).tolist() == brute_rows(shape, axis)
        cols = torch.arange(as_rows(x, axis).shape[1]).repeat(as_rows(x, axis).shape[0], 1)
        assert flat_indices(shape, axis, cols).tolist() == [i for r in brute_rows(shape, axis) for i in r]


@pytest.mark.parametrize("k", [1, 3])
def test_per_row_top_k_is_each_rows_k_largest(scores, k):
    axes = {n: a for n, (_, a) in LAYOUTS.items()}
    sel = top_k(scores, list(LAYOUTS), k, "per_row", in_axes=axes)
    for n, (shape, axis) in LAYOUTS.items():
        flat = scores[n].reshape(-1)
        expected = []
        for row in brute_rows(shape, axis):
            expected += sorted(row, key=lambda i: (-float(flat[i]), i))[:k]
        assert sel.indices[n].tolist() == expected, n
        assert torch.equal(sel.scores[n], flat[sel.indices[n]])
    small = top_k(scores, list(LAYOUTS), 3, "per_row", in_axes=axes).prefix(k, "per_row", list(LAYOUTS))
    assert {n: v.tolist() for n, v in small.indices.items()} == {n: v.tolist() for n, v in sel.indices.items()}


def test_per_row_k_must_fit_a_row(scores):
    with pytest.raises(UsageError, match="per_row.*rows of"):
        top_k(scores, ["linear"], 6, "per_row", need=2, in_axes={"linear": 1})


@pytest.mark.parametrize("name", ["random_k", "bottom_k", "random_mag_k"])
def test_per_row_controls_take_k_per_row_outside_the_top_k(scores, name):
    axes = {n: a for n, (_, a) in LAYOUTS.items()}
    weights = {n: s - 0.5 for n, s in scores.items()}
    weights["linear"].view(-1)[10:13] = 0.0  # exact zeros: not eligible for bottom_k under zero
    top = top_k(scores, list(LAYOUTS), 2, "per_row", in_axes=axes)
    ctx = ControlContext(weights, zeros_unchanged=True, in_axes=axes)
    sel = controls.control(name, scores, list(LAYOUTS), 2, "per_row", top, np.random.default_rng(0), ctx)
    for n, (shape, axis) in LAYOUTS.items():
        rows = brute_rows(shape, axis)
        chosen = sel.indices[n].reshape(len(rows), 2)
        tops = top.indices[n].reshape(len(rows), 2)
        for row, c, t in zip(rows, chosen.tolist(), tops.tolist()):
            assert set(c) <= set(row) and len(set(c)) == 2 and not set(c) & set(t), (n, name)
            if name == "bottom_k":
                flat, w = scores[n].reshape(-1), weights[n].reshape(-1)
                eligible = [i for i in row if w[i] != 0]
                assert c == sorted(eligible, key=lambda i: (float(flat[i]), i))[:2]
