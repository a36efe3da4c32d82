"""Plots of what perturbing the selections does, and of the Top-K's stability across seeds.

* ``perturbation_effect.png``: ΔPPL (symmetric log scale: controls can lower perplexity) of the
  Top-K and each control: every seed's point, and the mean ± sample std across seeds;
* ``stability.png``: Jaccard overlap of the Top-K sets of every pair of seeds (>= 2 seeds);
* ``dose_response.png``: ΔPPL versus k (``--topk-sweep``) for the Top-K and the controls.

Data: ``perturbation_results.json``, ``stability_summary.json`` (or, without it, the Top-K rows of
every seed in ``top_weights.csv``).  ``read_*`` give each plot's one-sentence reading.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from esa.analysis.stability import index_sets, jaccard_matrix
from esa.outdir.readers import read_json, read_top_rows
from esa.reporting.format import num, ratio_text, sci, verb
from esa.reporting.plotkit import COND_COLORS, save


def _color(cond: str) -> str:
    return COND_COLORS.get(cond, "tab:green")


def _symlog(ax, values: list[float]) -> float:
    """Symmetric log y axis, linear within ±linthresh = the decade below the smallest nonzero |value|."""
    nz = [abs(v) for v in values if math.isfinite(v) and v != 0]
    lin = 10.0 ** math.floor(math.log10(min(nz))) if nz else 1e-3
    ax.set_yscale("symlog", linthresh=lin, linscale=0.5)
    ax.axhline(0, color="black", lw=0.6)
    return lin


def _symlog_ticks(ax, lin: float, max_per_side: int = 7) -> None:
    """Decade ticks on a symlog axis, thinned to at most ``max_per_side`` per sign, so 15 decades of
    ΔPPL stay legible (matplotlib would label every decade and let 0 collide with ±linthresh)."""
    lo, hi = ax.get_ylim()
    ticks = [0.0]
    for sign, top in ((1, hi), (-1, -lo)):
        if top <= lin:
            continue
        decades = list(range(math.ceil(math.log10(lin)), math.floor(math.log10(top)) + 1))
        step = max(1, math.ceil(len(decades) / max_per_side))
        ticks += [sign * 10.0 ** d for d in decades[::-1][::step]]  # keep the largest decade
    ax.set_yticks(sorted(ticks))
    ax.yaxis.set_minor_locator(plt.NullLocator())


def _clipped_err(mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``[2, n]`` error-bar lengths for mean ± std, clipped to the seeds' range [lo, hi].

    ΔPPL is heavy-tailed across seeds (std often > mean), and on a symlog axis an unclipped bar would
    cross zero and span decades that no seed produced; the numbers themselves are in the report.
    """
    std = np.nan_to_num(std)
    below = np.clip(mean - np.maximum(mean - std, lo), 0, None)
    above = np.clip(np.minimum(mean + std, hi) - mean, 0, None)
    return np.nan_to_num(np.vstack([below, above]))


def _cap(values: list[float]) -> float:
    """Where to draw an infinite ΔPPL: a decade above the largest finite value."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    return 10 * max(finite) if finite and max(finite) > 0 else 1.0


def _per_seed(res: dict, field: str) -> dict[str, list[float]]:
    """condition -> values over seeds (in seed order)."""
    per = res.get("per_seed") or {str(res["seed"]): res["conditions"]}
    return {c: [num(per[s][c].get(field)) for s in per] for c in res["conditions"]}


def plot_perturbation(out_dir: Path, dest: Path) -> bool:
    res = read_json(out_dir, "perturbation_results.json")
    if res is None:
        return False
    deltas = _per_seed(res, "delta_ppl")
    names = list(deltas)
    allv = [v for vs in deltas.values() for v in vs]
    cap = _cap(allv)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(names) + 2), 5))
    lin = _symlog(ax, allv + [cap])
    rng = np.random.default_rng(0)  # jitter only, so points of equal value stay visible
    for i, c in enumerate(names):
        vs = np.array(deltas[c])
        shown = np.where(np.isinf(vs), cap, vs)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(vs)), shown, s=28, color=_color(c), alpha=0.6,
                   edgecolor="black", linewidth=0.4, zorder=3, label="one seed" if i == 0 else None)
        summ = (res.get("summary") or {}).get(c, {}).get("delta_ppl")
        if summ and summ.get("std") is not None and math.isfinite(num(summ["mean"])):
            m = np.array([num(summ["mean"])])
            err = _clipped_err(m, np.array([num(summ["std"])]), np.array([vs.min()]), np.array([vs.max()]))
            ax.errorbar(i + 0.25, m, yerr=err, fmt="D", color="black", ms=6, capsize=4, zorder=4,
                        label="mean ± std over seeds (bar clipped to the seeds' range)" if i == 0 else None)
        ratio = num(((res.get("summary") or {}).get(c, {}).get("ratio") or {}).get("mean",
                    res["conditions"][c].get("ratio")))
        ax.annotate(ratio_text(ratio), (i, np.nanmax(shown)), xytext=(0, 8), textcoords="offset points",
                    ha="center", fontsize=9, fontweight="bold" if c == "top_k" else None)
    if any(np.isinf(allv)):
        ax.axhline(cap, color="tab:red", ls=":", lw=1, label="infinite perplexity (drawn here)")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(top=cap * 30)
    _symlog_ticks(ax, lin)
    ax.set_xlabel("condition (label: PPL ÷ baseline PPL, mean over seeds)")
    ax.set_ylabel(f"ΔPPL = PPL − baseline (perplexity; symlog, linear within ±{sci(lin)})")
    n = len(res.get("seeds") or [res["seed"]])
    ax.set_title(f"Perturbation effect: {res['perturb']} of k={res['k']} ({res['mode']}, {res['metric']}), "
                 f"{n} seed{'s' if n > 1 else ''}; baseline PPL {sci(res['baseline']['ppl'], 3)}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    save(fig, dest)
    return True


def read_perturbation(out_dir: Path) -> str | None:
    res = read_json(out_dir, "perturbation_results.json")
    if res is None:
        return None
    summ, seeds = res.get("summary"), res.get("seeds") or [res["seed"]]

    def ratio(c: str) -> float:
        if summ and "ratio" in summ.get(c, {}):
            return num(summ[c]["ratio"]["mean"])
        return num(res["conditions"][c]["ratio"])

    controls = [c for c in res["conditions"] if c != "top_k"]
    how = f"mean over {len(seeds)} seeds" if summ else f"seed {res['seed']}"
    text = (f"{verb(res['perturb'])} the Top-K multiplied perplexity by {ratio_text(ratio('top_k'))} ({how}, ΔPPL "
            f"{sci(res['conditions']['top_k']['delta_ppl'] if not summ else summ['top_k']['delta_ppl']['mean'])})")
    if controls:
        text += " vs " + ", ".join(f"{ratio_text(ratio(c))} for {c}" for c in controls)
    tests = res.get("tests") or {}
    ps = [f"{c} p={sci(t['log_ratio']['p_value'])}" for c in controls
          if (t := tests.get(f"top_k_vs_{c}")) and t["log_ratio"].get("p_value") is not None]
    return text + (f" (Welch t-test on log ratio: {', '.join(ps)})." if ps else ".")


def _jaccard(out_dir: Path) -> tuple[list[str], np.ndarray] | None:
    stab = read_json(out_dir, "stability_summary.json")
    if stab is not None:
        return [str(s) for s in stab["seeds"]], np.array(stab["jaccard_matrix"], dtype=float)
    by_seed: dict[str, list[tuple[str, int]]] = {}
    for r in read_top_rows(out_dir):  # every seed's Top-K is in the CSV: Jaccard without --stability-check
        by_seed.setdefault(r["seed"], []).append((r["parameter"], int(r["index"])))
    if len(by_seed) < 2:
        return None
    seeds = list(by_seed)
    m = np.array(jaccard_matrix([index_sets(by_seed[s]) for s in seeds]), dtype=float)
    return seeds, m


def plot_stability(out_dir: Path, dest: Path) -> bool:
    got = _jaccard(out_dir)
    if got is None:
        return False
    seeds, m = got
    size = max(4.5, 0.6 * len(seeds) + 3)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    if len(seeds) <= 20:
        for i, j in np.ndindex(m.shape):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if m[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(seeds)), seeds)
    ax.set_yticks(range(len(seeds)), seeds)
    ax.set_xlabel("seed")
    ax.set_ylabel("seed")
    off = m[~np.eye(len(seeds), dtype=bool)]
    ax.set_title(f"Top-K stability across seeds\n(Jaccard |A∩B|/|A∪B|, mean over all pairs {off.mean():.2f})",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="Jaccard overlap (0 = disjoint, 1 = identical)", fraction=0.046)
    save(fig, dest)
    return True


def read_stability(out_dir: Path) -> str | None:
    got = _jaccard(out_dir)
    if got is None:
        return None
    seeds, m = got
    off = m[~np.eye(len(seeds), dtype=bool)]
    j = float(off.mean())
    stab = read_json(out_dir, "stability_summary.json")
    k = (stab or {}).get("set_sizes", {}).get(seeds[0])
    if k is None:
        k = sum(1 for r in read_top_rows(out_dir) if r["seed"] == seeds[0])
    shared = 2 * k * j / (1 + j)  # |A∩B| for two sets of size k with Jaccard j
    spread = (f"{off.min():.2f}" if off.min() == off.max()
              else f"{off.min():.2f}–{off.max():.2f} (mean over all pairs {j:.2f}; the summary's mean is over "
                   "consecutive seed pairs, the definition kept in stability_summary.json)")
    return (f"Across {len(seeds)} seeds the Top-K sets overlap with Jaccard {spread}: two seeds share about "
            f"{shared:.0f} of their {k} Top-K weights ({100 * shared / k:.0f} %) although each scored a "
            f"different calibration sample.")


def plot_dose_response(out_dir: Path, dest: Path) -> bool:
    res = read_json(out_dir, "perturbation_results.json")
    if res is None or "sweep" not in res:
        return False
    sw = res["sweep"]
    ks = np.array(sw["k"], dtype=float)
    allv = [num(v) for c in sw["conditions"].values() for s in c["per_seed"].values() for v in s["delta_ppl"]]
    cap = _cap(allv)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lin = _symlog(ax, allv + [cap])
    for c, block in sw["conditions"].items():
        mean = np.array([num(v) for v in block["delta_ppl_mean"]])
        std = np.array([num(v) for v in block["delta_ppl_std"]])
        lo = np.array([num(v) for v in block["delta_ppl_min"]])
        hi = np.array([num(v) for v in block["delta_ppl_max"]])
        shown = np.where(np.isinf(mean), cap, mean)
        err = None if np.isnan(std).all() else _clipped_err(shown, std, lo, np.where(np.isinf(hi), cap, hi))
        ax.errorbar(ks, shown, yerr=err, marker="o", color=_color(c), lw=2 if c == "top_k" else 1.3, capsize=3,
                    label=c)
        for s in block["per_seed"].values():
            v = np.array([num(x) for x in s["delta_ppl"]])
            ax.scatter(ks, np.where(np.isinf(v), cap, v), s=10, color=_color(c), alpha=0.35)
    if any(np.isinf(allv)):
        ax.axhline(cap, color="tab:red", ls=":", lw=1, label="infinite perplexity (drawn here)")
    ax.axvline(sw.get("main_k", res["k"]), color="black", ls=":", lw=1, label=f"--topk {sw.get('main_k', res['k'])}")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(int(k)) for k in ks])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    _symlog_ticks(ax, lin)
    unit = {"per_layer": "weights per tensor", "per_row": "weights per output row"}.get(res["mode"], "weights")
    ax.set_xlabel(f"k = number of perturbed {unit} (log scale)")
    ax.set_ylabel(f"ΔPPL = PPL − baseline (perplexity; symlog, linear within ±{sci(lin)})")
    ax.set_title(f"Dose–response: {res['perturb']} of k weights ({res['mode']}, {res['metric']}); "
                 f"baseline PPL {sci(res['baseline']['ppl'], 3)}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    # below the axes: the curves may run anywhere in the plot
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=min(4, len(sw["conditions"]) + 1),
              title="lines: mean ± std over seeds (bars clipped to the seeds' range); dots: single seeds",
              title_fontsize=8)
    save(fig, dest)
    return True


def read_dose_response(out_dir: Path) -> str | None:
    res = read_json(out_dir, "perturbation_results.json")
    if res is None or "sweep" not in res:
        return None
    sw = res["sweep"]
    ks, conds = sw["k"], sw["conditions"]
    top = [num(v) for v in conds["top_k"]["ratio_mean"]]
    broke = next((i for i, r in enumerate(top) if r >= 2), None)
    text = (f"{verb(res['perturb'])} the Top-K changes perplexity (mean over seeds) by {ratio_text(top[0])} "
            f"at k={ks[0]} and by {ratio_text(top[-1])} at k={ks[-1]}")
    others = []
    for c, b in conds.items():
        if c != "top_k":
            r = [num(v) for v in b["ratio_mean"]]
            lo, hi = ratio_text(min(r)), ratio_text(max(r))
            others.append(f"{c} stays at {lo}" if lo == hi else f"{c} stays within {lo}…{hi}")
    if others:
        text += f", while {' and '.join(others)} over the same k"
    if broke is None:
        return text + "; no k in the sweep doubles the mean perplexity."
    seeds = conds["top_k"]["per_seed"].values()
    doubled = sum(num(s["ratio"][broke]) >= 2 for s in seeds)
    return text + (f"; {_topk_count(ks[broke], res['mode'])} already at least double"
                   f"{'s' if ks[broke] == 1 and res['mode'] == 'global' else ''} the mean perplexity "
                   f"(in {doubled} of {len(seeds)} seeds individually).")


def _topk_count(k: int, mode: str) -> str:
    """How many weights k means: under per_layer, k is per tensor (k = 1 is one weight in every tensor);
    under per_row, per output row."""
    if mode == "per_layer":
        return f"the Top-{k} of every tensor ({k} weight{'s' if k > 1 else ''} per tensor)"
    if mode == "per_row":
        return f"the Top-{k} of every output row ({k} weight{'s' if k > 1 else ''} per row)"
    return "a single Top-K weight" if k == 1 else f"k={k} Top-K weights"
