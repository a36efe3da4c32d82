"""One experiment's block of ``task_results.json``: every condition's task scores per seed, and with
two or more seeds their mean ± std and the Welch tests of the experiment's compared conditions.

::

    {"group_by": "k", "seeds": [0, 1],
     "per_seed": {"0": {"100": {"top_k": {"arc_easy": {"acc": ..., "acc_stderr": ..., "acc_norm": ...,
                                                       "delta_acc": ..., "items": 200}, ...}, ...}}},
     "summary": {"100": {"top_k": {"arc_easy": {"acc": {"mean", "std", "min", "max", "values"}, ...}}}},
     "tests": {"100": {"top_k_vs_random_k": {"arc_easy": {"acc": {Welch t-test, Cohen's d}, ...}}}}}

``summary`` and ``tests`` are absent with one seed (never zeros), as in the experiments' own files.
The tests are :func:`esa.analysis.significance.compare` on the per-seed accuracies (Welch's
two-sided t-test, Cohen's d with the pooled sample std); a condition measured once for every seed
(a seed-independent one) has zero variance, which the test reports as undefined.
"""

from __future__ import annotations

from collections.abc import Callable

from esa.evaluators.registry import Measured

TESTED = ("acc", "acc_norm")


def _main_metrics(rec: dict) -> list[str]:
    """The metrics of one task's record worth a mean over seeds (not stderrs, deltas or counts)."""
    return [k for k, v in rec.items() if isinstance(v, float) and not k.endswith("_stderr")
            and not k.startswith("delta_")]


def summary(per_seed: dict[str, dict]) -> dict:
    """``per_seed[seed][group][condition][task]`` -> ``[group][condition][task][metric]`` statistics."""
    from esa.analysis.significance import describe  # scipy: only when results are written, never for --help

    first = next(iter(per_seed.values()))
    out: dict = {}
    for group, conds in first.items():
        for cond, tasks in conds.items():
            for task, rec in tasks.items():
                rows = [s[group][cond][task] for s in per_seed.values() if task in s.get(group, {}).get(cond, {})]
                out.setdefault(group, {}).setdefault(cond, {})[task] = {
                    m: describe([r[m] for r in rows]) for m in _main_metrics(rec) if all(r.get(m) is not None
                                                                                         for r in rows)}
    return out


def tests(per_seed: dict[str, dict], pairs: tuple[tuple[str, str], ...]) -> dict:
    """``[group]["<a>_vs_<b>"][task][metric]``: Welch's test of condition a vs b over seeds."""
    from esa.analysis.significance import compare

    first = next(iter(per_seed.values()))
    out: dict = {}
    for group, conds in first.items():
        for a, b in pairs:
            if a not in conds or b not in conds:
                continue
            block = out.setdefault(group, {}).setdefault(f"{a}_vs_{b}", {})
            for task in conds[a]:
                values = {c: [s[group][c][task] for s in per_seed.values()] for c in (a, b)}
                block[task] = {m: compare([r[m] for r in values[a]], [r[m] for r in values[b]], f"{m} ({task})")
                               for m in TESTED if all(r.get(m) is not None for r in values[a] + values[b])}
    return out


def experiment_block(m: Measured, evaluator: str, slim: Callable[[dict], dict]) -> dict:
    """The block of experiment ``m``: ``evaluator``'s record of every row (``slim`` drops the facts
    stated once elsewhere), per seed, and the statistics over seeds."""
    per_seed = {str(seed): {str(g): {c: slim(row[evaluator]) for c, row in conds.items() if evaluator in row}
                            for g, conds in groups.items()}
                for seed, groups in m.rows.items()}
    out = {"group_by": m.group_by, "seeds": list(m.rows), "per_seed": per_seed}
    if len(per_seed) >= 2:
        out["summary"] = summary(per_seed)
        out["tests"] = tests(per_seed, m.pairs)
    return out
