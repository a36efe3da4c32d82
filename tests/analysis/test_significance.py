"""Cross-seed statistics against scipy and hand computations; undefined cases are null, not zero."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from esa.analysis.significance import compare, condition_summary, top_vs_controls


def test_compare_matches_scipy_and_hand_cohens_d():
    a, b = [10.0, 12.0, 15.0, 11.0], [1.0, 2.0, 1.5]
    r = compare(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert r["t"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue)
    pooled = math.sqrt((3 * np.var(a, ddof=1) + 2 * np.var(b, ddof=1)) / 5)
    assert r["cohens_d"] == pytest.approx((np.mean(a) - np.mean(b)) / pooled)
    assert r["mean_delta_ratio"] == pytest.approx(np.mean(a) / np.mean(b))


def test_undefined_statistics_are_null_with_a_reason():
    assert compare([1.0], [2.0])["p_value"] is None
    r = compare([math.inf, 3.0], [1.0, 2.0])
    assert r["p_value"] is None and "non-finite" in r["note"]
    r = compare([2.0, 2.0], [1.0, 1.0])
    assert r["p_value"] is None and r["cohens_d"] is None and "zero variance" in r["note"]


def test_condition_summary_and_pairing():
    per_seed = {s: {"top_k": {"ppl": 10 + d, "delta_ppl": d, "ratio": 1 + d / 10},
                    "random_k": {"ppl": 10 + d / 100, "delta_ppl": d / 100, "ratio": 1 + d / 1000}}
                for s, d in (("0", 5.0), ("1", 7.0), ("2", 9.0))}
    s = condition_summary(per_seed)
    assert s["top_k"]["delta_ppl"]["mean"] == pytest.approx(7.0)
    assert s["top_k"]["delta_ppl"]["std"] == pytest.approx(2.0)  # sample std of 5, 7, 9
    assert s["random_k"]["ratio"]["max"] == pytest.approx(1.009)
    t = top_vs_controls(per_seed)
    assert set(t) == {"top_k_vs_random_k"}
    assert t["top_k_vs_random_k"]["p_value"] == pytest.approx(
        stats.ttest_ind([5, 7, 9], [0.05, 0.07, 0.09], equal_var=False).pvalue)


def test_a_value_repeated_over_seeds_has_no_spread():
    """A seed-independent condition is measured once and its row repeated per seed: its mean is that
    value and its std exactly 0 (numpy's mean of three equal values can round to a neighbour, whose
    std would print as a spread of 1e-16 or, on ΔPPL, 1e-13)."""
    x = 1.507913950647994
    assert np.array([x] * 3).std(ddof=1) != 0  # the rounding this guards against
    per_seed = {s: {"none": {"ppl": 20 * x, "delta_ppl": 20 * x - 20, "ratio": x}} for s in "012"}
    s = condition_summary(per_seed)["none"]
    assert s["ratio"]["mean"] == x and s["ratio"]["std"] == 0.0 and s["delta_ppl"]["std"] == 0.0
