"""random_mag_k's match quality: quantiles against numpy, the 5 % warning, its report note."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esa.experiment import match
from esa.experiment.selection import Selection
from esa.model.targets import Target
from esa.reporting import summary


def test_seed_quality_is_numpys_quantiles_and_their_ratio():
    rng = np.random.default_rng(0)
    top, ctl = rng.random(37).astype(np.float32), rng.random(37).astype(np.float32)
    q = match.seed_quality(torch.from_numpy(top), torch.from_numpy(ctl))
    want_t, want_c = (np.quantile(x.astype(np.float64), [0.1, 0.5, 0.9]) for x in (top, ctl))
    np.testing.assert_allclose(q["top_k_abs_w"], want_t, rtol=1e-12)
    np.testing.assert_allclose(q["ratio"], want_c / want_t, rtol=1e-12)
    zero = match.seed_quality(torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert zero["ratio"][:2] == [1.0, 1.0] and zero["ratio"][2] is None  # 90 %: 0.7 vs 0 has no finite ratio


def test_abs_weights_reads_the_selected_entries():
    w = torch.arange(-12.0, 12.0).reshape(4, 6)
    targets = {"w": Target("w", torch.nn.Parameter(w.clone()), (), ("w",))}
    sel = Selection("top_k", {"w": torch.tensor([0, 7, 23])}, {"w": torch.zeros(3)})
    assert match.abs_weights(targets, sel).tolist() == [12.0, 5.0, 11.0]


@pytest.mark.parametrize("ratios, warned", [([0.96, 1.0, 1.049], False), ([1.0, 0.94, 1.0], True),
                                            ([1.0, 1.0, None], True)])
def test_a_ratio_beyond_five_percent_warns_in_results_and_report(ratios, warned):
    per_seed = {"0": {"top_k_abs_w": [1, 1, 1], "control_abs_w": [1, 1, 1], "ratio": [1.0, 1.0, 1.0]},
                "1": {"top_k_abs_w": [1, 1, 1], "control_abs_w": [1, 1, 1], "ratio": ratios}}
    mq = match.summary(per_seed)
    assert ("warning" in mq) == warned
    if None not in ratios:
        assert mq["max_deviation"] == pytest.approx(max(abs(r - 1) for r in ratios))
    notes = summary.control_notes({"controls": {"random_mag_k": {"match_quality": mq}}})
    assert "seed 1 " + " / ".join("–" if r is None else f"{r:.3f}" for r in ratios) in notes[0]
    assert any(n.startswith("Warning: random_mag_k is not magnitude-matched") for n in notes) == warned
    if warned:
        assert "seed 1 at " in mq["warning"]
