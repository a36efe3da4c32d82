"""Statistics of perturbation effects across seeds.

Per condition: mean, std (sample, ddof=1), min and max of ΔPPL and of the ratio to baseline.
Top-K against each control: Welch's t-test on the per-seed ΔPPL (``scipy.stats.ttest_ind`` with
``equal_var=False``), two-sided p-value, Cohen's d with the pooled sample standard deviation
``sqrt(((n1-1) s1^2 + (n2-1) s2^2) / (n1 + n2 - 2))``, and the ratio of mean ΔPPL.  With fewer than
two seeds there is nothing to estimate: callers omit these blocks entirely (never zeros).  A
non-finite ΔPPL (inf perplexity) or zero variance makes a statistic undefined: it is written as
null with the reason.

ΔPPL is heavy-tailed across seeds (a Top-K can multiply perplexity by 10^6 on one seed and 10^7 on
another), which inflates its variance and the t-test's p-value.  So the same comparison is also
reported on the log ratio ``log(PPL / baseline)`` (= the change in mean NLL, in nats), under
``log_ratio``: the scale on which perplexity effects are multiplicative.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def describe(values: list[float]) -> dict:
    """mean, sample std (ddof 1), min, max and the values; an infinite value makes the mean inf, the std None."""
    a = np.asarray(values, dtype=np.float64)
    finite = bool(np.isfinite(a).all())
    if finite and (a == a[0]).all():  # one value (a seed-independent condition): exactly it, no spread;
        # np.mean of 3 equal values can round to a neighbour, and std then reports that rounding (1e-13)
        return {"mean": float(a[0]), "std": 0.0, "min": float(a[0]), "max": float(a[0]),
                "values": [float(v) for v in a]}
    return {"mean": float(a.mean()) if finite else float(a.max()),  # inf when any seed is infinite
            "std": float(a.std(ddof=1)) if finite else None,  # undefined with an infinite value
            "min": float(a.min()), "max": float(a.max()), "values": [float(v) for v in a]}


def condition_summary(per_seed: dict[str, dict]) -> dict:
    """``per_seed[seed][condition]`` rows -> per-condition summaries over seeds."""
    conditions = next(iter(per_seed.values())).keys()
    out = {}
    for c in conditions:
        rows = [per_seed[s][c] for s in per_seed]
        ok = [r for r in rows if r.get("ppl") is not None]
        out[c] = {"n_seeds": len(ok), "std_ddof": 1}
        if len(ok) >= 2:
            out[c]["delta_ppl"] = describe([r["delta_ppl"] for r in ok])
            out[c]["ratio"] = describe([r["ratio"] for r in ok])
    return out


def compare(top: list[float], control: list[float], what: str = "delta_ppl") -> dict:
    """Welch's t-test, Cohen's d and the ratio of means of Top-K vs one control."""
    a, b = np.asarray(top, dtype=np.float64), np.asarray(control, dtype=np.float64)
    out: dict = {"n_top_k": len(a), "n_control": len(b), "test": f"Welch two-sided t-test on {what}"}
    if len(a) < 2 or len(b) < 2:
        return {**out, "t": None, "p_value": None, "cohens_d": None, "mean_delta_ratio": None,
                "note": "fewer than two seeds"}
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return {**out, "t": None, "p_value": None, "cohens_d": None,
                "mean_delta_ratio": None, "note": f"non-finite {what} (infinite perplexity)"}
    ma, mb = float(a.mean()), float(b.mean())
    out["mean_delta_ratio"] = ma / mb if mb != 0 else (math.inf if ma > 0 else None)
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    out["cohens_d"] = (ma - mb) / pooled if pooled > 0 else None
    if pooled == 0:
        return {**out, "t": None, "p_value": None, "note": "zero variance in both groups"}
    res = stats.ttest_ind(a, b, equal_var=False)
    out["t"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def _log(ratio: float) -> float:
    return math.log(ratio) if ratio > 0 else -math.inf


def condition_vs(per_seed: dict[str, dict], a: str, b: str) -> dict:
    """Condition ``a`` vs ``b`` over seeds on ΔPPL and on log(PPL/baseline) (``log_ratio``)."""
    rows = [(per_seed[s][a], per_seed[s][b]) for s in per_seed]
    rows = [(t, k) for t, k in rows if t.get("ppl") is not None and k.get("ppl") is not None]
    res = compare([t["delta_ppl"] for t, _ in rows], [k["delta_ppl"] for _, k in rows])
    res["log_ratio"] = compare([_log(t["ratio"]) for t, _ in rows], [_log(k["ratio"]) for _, k in rows],
                               "log(ppl / baseline)")
    return res


def top_vs_controls(per_seed: dict[str, dict]) -> dict:
    """Top-K vs each control on ΔPPL (as specified) and on log(PPL/baseline) (``log_ratio``)."""
    controls = [c for c in next(iter(per_seed.values())) if c != "top_k"]
    return {f"top_k_vs_{c}": condition_vs(per_seed, "top_k", c) for c in controls}
