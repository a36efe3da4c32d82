"""Dose-response (``--topk-sweep``): the perplexity change as a function of k.

Each seed's scores are computed once; inside :func:`esa.runner.pipeline.score_seed` the Top-K and controls
are selected for every sweep k while the scores exist, and only those selections (O(sum of k)) are
kept.  The scores are ranked once, at the largest k: Top-K and bottom_k of a smaller k are prefixes
of it (:meth:`esa.experiment.selection.Selection.prefix`), so the sets are nested, Top-1 ⊂ Top-10 ⊂ ….
The main ``--topk`` keeps its own selections and random stream; a sweep k equal to it reuses
them (identical numbers), any other k draws its random_k from the stream ``random_k:k<k>`` and its
perturbation noise from ``perturb:<condition>:k<k>``, so adding a sweep never changes the main results.

``perturbation_results.json["sweep"]``::

    {"k": [1, 10, ...], "main_k": 100,
     "conditions": {"top_k": {"delta_ppl_mean": [...], "delta_ppl_std": [...], "delta_ppl_min": [...],
                              "delta_ppl_max": [...], "ratio_mean": [...], "ratio_std": [...],
                              "per_seed": {"0": {"ppl": [...], "delta_ppl": [...], "ratio": [...],
                                                 "n_perturbed": [...], "n_changed": [...]}, ...}},
                    "random_k": {...}, ...}}

Lists are aligned with ``k``.  Means are over seeds; ``*_std`` is the sample std (ddof 1), null with
one seed or when a seed's value is infinite (the mean is then inf, as in ``summary``).
"""

from __future__ import annotations

import math

import numpy as np

FIELDS = ("ppl", "delta_ppl", "ratio", "n_perturbed", "n_changed")


def _stats(values: list[float]) -> tuple[float, float | None, float, float]:
    """(mean, sample std or None, min, max) of one k's per-seed values (floats, maybe inf)."""
    a = np.asarray(values, dtype=np.float64)
    if not np.isfinite(a).all():
        return float(a.max()), None, float(a.min()), float(a.max())
    std = float(a.std(ddof=1)) if len(a) >= 2 else None
    return float(a.mean()), std, float(a.min()), float(a.max())


def sweep_curve(ks: list[int], main_k: int, per_seed: dict[str, dict[int, dict[str, dict]]]) -> dict:
    """``per_seed[seed][k][condition]`` = evaluation row (as in ``conditions``) -> the ``sweep`` block."""
    first = next(iter(per_seed.values()))
    conditions = list(first[ks[0]])
    out: dict = {"k": list(ks), "main_k": main_k, "conditions": {}}
    for c in conditions:
        seeds = {s: {f: [by_k[k][c].get(f) for k in ks] for f in FIELDS} for s, by_k in per_seed.items()}
        block: dict = {}
        for what in ("delta_ppl", "ratio"):
            rows = [_stats([math.inf if seeds[s][what][i] is None else seeds[s][what][i] for s in seeds])
                    for i in range(len(ks))]
            block[f"{what}_mean"] = [r[0] for r in rows]
            block[f"{what}_std"] = [r[1] for r in rows]
            if what == "delta_ppl":
                block["delta_ppl_min"] = [r[2] for r in rows]
                block["delta_ppl_max"] = [r[3] for r in rows]
        block["per_seed"] = seeds
        out["conditions"][c] = block
    return out
