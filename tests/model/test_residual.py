"""The residual stream's statistics: the fast lower median equals torch.median (NaN included), and the
values above the floor are capped at the largest, the rest counted."""

from __future__ import annotations

import math

import pytest
import torch

from esa.model.residual import ResidualPass, lower_median


@pytest.mark.parametrize("n", [7, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_median_is_torch_median(n, dtype):
    a = torch.randn(5, n, generator=torch.Generator().manual_seed(n)).abs().to(dtype)
    a[1, 3] = a[1, 4]  # ties
    a[2, 0] = math.nan
    got, ref = lower_median(a), a.median(dim=1).values.double()
    assert math.isnan(got[2]) and math.isnan(ref[2])
    keep = [0, 1, 3, 4]
    assert torch.equal(got[keep], ref[keep])


def test_values_above_the_floor_are_capped_at_the_largest():
    h = torch.zeros(2, 3, 4)
    h[0, 0, 1], h[0, 2, 3], h[1, 1, 0], h[1, 2, 2] = 50.0, -70.0, 60.0, math.nan
    sink = ResidualPass(n_layers=1, n_windows=2, floor=10.0, cap=2)
    sink.record(0, torch.tensor([0, 1]), h)
    kept = sink.kept[0]
    assert sink.dropped == [1] and sorted(kept.value.tolist()) == [-70.0, 60.0]  # 50 dropped, NaN never kept
    assert sorted(zip(kept.window.tolist(), kept.position.tolist(), kept.channel.tolist())) == [(0, 2, 3), (1, 1, 0)]
    assert sink.max[0, 0] == 70.0 and sink.value[0, 0] == -70.0 and (sink.position[0, 0], sink.channel[0, 0]) == (2, 3)
