"""The weights fingerprint changes with any single weight and nothing else."""

from __future__ import annotations

import torch

from esa.model.fingerprint import data_fingerprint, weights_fingerprint
from tests.conftest import make_llama


def test_one_weight_changes_the_fingerprint_and_a_copy_does_not():
    a, b = make_llama(), make_llama()
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 7] = torch.nextafter(b.model.layers[1].mlp.down_proj.weight[3, 7],
                                                                       torch.tensor(1.0))  # one ulp
    assert weights_fingerprint(a) != weights_fingerprint(b)
    with torch.no_grad():  # two weights swapped: the plain sum is the same, the positional one is not
        c = make_llama()
        w = c.model.layers[0].mlp.up_proj.weight
        w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()
    assert weights_fingerprint(a) != weights_fingerprint(c)


def test_data_fingerprint_depends_on_every_token_and_the_source():
    ev, pool = torch.arange(12).reshape(2, 6), torch.arange(24).reshape(4, 6)
    base = data_fingerprint(ev, pool, "file x")
    assert base == data_fingerprint(ev.clone(), pool.clone(), "file x")
    pool2 = pool.clone()
    pool2[3, 5] += 1
    assert base != data_fingerprint(ev, pool2, "file x") and base != data_fingerprint(ev, pool, "file y")
