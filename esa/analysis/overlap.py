"""Comparing the Top-K of separate runs (e.g. grad_x_weight vs act_mag on the same model).

For a pair of runs: Jaccard of the Top-K sets (identity = parameter name + flat index, through
:func:`esa.analysis.stability.jaccard`), the overlap count, and ``spearman_on_shared``: the Spearman
rank correlation of the two runs' scores over the weights both Top-Ks hold (undefined with fewer
than 3 shared weights).  It is not ``metric_agreement.json``'s ``spearman_on_union``
(:mod:`esa.analysis.agreement`), which ranks every weight of either Top-K and is negative when the
Top-Ks barely overlap.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from scipy import stats

from esa.analysis.stability import index_sets, intersection_size, jaccard
from esa.errors import UsageError
from esa.outdir.layout import METRICS_DIR
from esa.outdir.readers import leaf_dirs


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("config", {})
    except (OSError, ValueError):
        return {}


def runs_in(path: Path) -> list[tuple[str, Path]]:
    """``(label, folder with top_weights.csv)`` of each Top-K an out-dir holds: the run itself, or each
    metric of a multi-metric run (``metrics/<name>/``, labelled ``PATH[name]``); with several
    perturbations, the first one's folder (``perturbations/<name>/``: every perturbation's Top-K is the same)."""
    if (path / "top_weights.csv").is_file():
        return [(str(path), path)]
    config = _config(path)
    first: dict[str, Path] = {}
    for (m, _), folder in (leaf_dirs(path, config) if config else {}).items():
        first.setdefault(m, folder)
    folders = [(f"{path}[{m}]" if len(first) > 1 else str(path), f) for m, f in first.items()]
    if folders and (len(first) > 1 or folders[0][1] != path) and all((f / "top_weights.csv").is_file()
                                                                     for _, f in folders):
        return folders
    raise UsageError(f"{path} has no top_weights.csv, at its top or in {METRICS_DIR}/<name>/ "
                     "(not an ESA out-dir, or a run that stopped before selecting)")


def selection_of(folder: Path) -> str | None:
    """How a run chose its Top-K, as ``"global k=100"`` (None when its config.json is unreadable)."""
    c = _config(folder)
    return f"{c['mode']} k={c['topk']}" if "mode" in c and "topk" in c else None


def mismatch(selections: dict[str, str | None]) -> str | None:
    """A warning when the runs chose their Top-Ks differently (mode or k): their Jaccard then compares
    sets of different definitions and sizes (a global k=100 is not a per_layer k=10)."""
    known = {label: s for label, s in selections.items() if s is not None}
    if len(set(known.values())) <= 1:
        return None
    return ("the runs chose their Top-K differently (" + "; ".join(f"{label}: {s}" for label, s in known.items())
            + "): the Jaccard compares sets of different definitions and sizes, so read it with care")


def load_top(run: Path, seed: int | None) -> tuple[dict[tuple[str, int], float], int]:
    """{(parameter, index): score} of one seed of a run, and that seed."""
    path = run / "top_weights.csv"
    if not path.is_file():
        raise UsageError(f"{run} has no top_weights.csv (not an ESA out-dir, or a run that stopped before "
                         "selecting)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsageError(f"{path} lists no weights")
    chosen = int(rows[0]["seed"]) if seed is None else seed
    top = {(r["parameter"], int(r["index"])): float(r["score"]) for r in rows if int(r["seed"]) == chosen}
    if not top:
        raise UsageError(f"{path} has no rows for seed {chosen}")
    return top, chosen


def compare(a: dict, b: dict) -> dict:
    """Sizes, overlap, Jaccard and Spearman on the shared weights of two ``{(parameter, index): score}`` Top-Ks."""
    sa, sb = index_sets(a), index_sets(b)
    shared = sorted(a.keys() & b.keys())
    out = {"size_a": len(a), "size_b": len(b), "overlap": intersection_size(sa, sb), "jaccard": jaccard(sa, sb),
           "spearman_on_shared": None, "spearman_on_shared_p": None}
    if len(shared) >= 3:
        res = stats.spearmanr([a[k] for k in shared], [b[k] for k in shared])
        if res.statistic == res.statistic:  # nan when one side is constant
            out["spearman_on_shared"], out["spearman_on_shared_p"] = float(res.statistic), float(res.pvalue)
    return out
