"""What every check of ``benchmarks/gpu_check.sh`` reads: a run's out-dir, its files, its peak memory.

The shell script runs every command with its out-dir under one output folder ``OUT`` and records each
run's exit status in ``OUT/logs/<run>.rc``; these helpers only read files (no torch import), so the
checks can be tested on synthetic out-dirs.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.analysis.stability import index_sets, jaccard  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
BF16_SKIP = "cpu-only: bf16 is very slow on this CPU"
# (min Top-K Jaccard per seed, max baseline perplexity relative difference) per comparison level:
# exact = the CPU against itself (cpu-only), fp32 = cuda fp32 vs cpu fp32, bf16 = cuda bf16 vs cpu fp32
TOLERANCES = {"exact": (1.0, 0.0), "fp32": (0.9, 1e-4), "bf16": (0.5, 5e-2)}
SAME_RTOL = 1e-5  # offload, resume, torchrun, FSDP against the plain device run: scores and perplexities


@dataclass
class Check:
    """One row of the table: its number, what it compares, the verdict, the tolerance it was held to,
    the measured values, and the runs it read (their peak memory is shown beside it)."""

    id: str
    title: str
    status: str
    detail: str
    values: dict = field(default_factory=dict)
    tolerance: str = ""
    runs: tuple[str, ...] = ()


class RunMissing(Exception):
    """A run the check needs failed or did not run (the message says which and where its log is)."""


def run_dir(out: Path, name: str) -> Path:
    """The out-dir of run ``name``; raises :class:`RunMissing` unless its recorded exit status is 0."""
    rc_file = out / "logs" / f"{name}.rc"
    if not rc_file.is_file():
        raise RunMissing(f"run {name} did not run")
    rc = rc_file.read_text().strip()
    if rc == "124":
        raise RunMissing(f"run {name} timed out (see logs/{name}.log)")
    if not rc.isdigit():
        raise RunMissing(f"run {name}: {rc}")
    if rc != "0":
        raise RunMissing(f"run {name} exited {rc} (see logs/{name}.log)")
    return out / name


def read_json(path: Path) -> dict:
    """A JSON file; a missing file is a :class:`RunMissing`."""
    if not path.is_file():
        raise RunMissing(f"{path.parent.name}/{path.name} is missing")
    return json.loads(path.read_text())


def top_rows(run: Path) -> dict[int, dict[tuple[str, int], float]]:
    """``top_weights.csv`` per seed: ``{seed: {(parameter, flat index): score}}``."""
    path = run / "top_weights.csv"
    if not path.is_file():
        raise RunMissing(f"{run.name}/top_weights.csv is missing")
    out: dict[int, dict[tuple[str, int], float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(int(row["seed"]), {})[(row["parameter"], int(row["index"]))] = float(row["score"])
    return out


def as_float(x: object) -> float:
    """A perplexity as written in JSON (a number, or the string "inf")."""
    return float(x)  # float("inf") accepts the JSON string form


def rel_diff(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|); 0 for equal values (including two infinities)."""
    if a == b:
        return 0.0
    if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))


def resolved(run: Path) -> str:
    """``device/dtype`` as the run resolved them (from its config.json)."""
    cfg = read_json(run / "config.json").get("resolved", {})
    return f"{cfg.get('device', '?')}/{cfg.get('dtype', '?')}"


def jaccards(ta: dict, tb: dict) -> dict[int, float]:
    """Top-K Jaccard per seed of two :func:`top_rows` (the same seeds, else :class:`RunMissing`)."""
    if sorted(ta) != sorted(tb):
        raise RunMissing(f"different seeds: {sorted(ta)} vs {sorted(tb)}")
    return {s: jaccard(index_sets(ta[s]), index_sets(tb[s])) for s in sorted(ta)}


def peak_mb(out: Path, name: str) -> tuple[str, float] | None:
    """``(kind, MB)`` of run ``name``: the CUDA peak when it used CUDA, else the peak RSS (from its
    manifest, or ``bench.json`` for a benchmark run); None when nothing was recorded."""
    d = out / name
    manifest = d / "experiment_manifest.json"
    if manifest.is_file():
        peak = json.loads(manifest.read_text()).get("peak_memory") or {}
    elif (d / "bench.json").is_file():
        bench = json.loads((d / "bench.json").read_text())
        return ("CUDA" if str(bench.get("device", "")).startswith("cuda") else "RSS",
                max(bench.get("peak_mb", {}).values(), default=math.nan))
    else:
        return None
    if "cuda_peak_mb" in peak:
        return "CUDA", peak["cuda_peak_mb"]
    return ("RSS", peak["rss_peak_mb"]) if "rss_peak_mb" in peak else None


def level_tolerance(level: str) -> str:
    """The agreement a comparison level asks for, in words."""
    min_jac, max_base = TOLERANCES[level]
    if level == "exact":
        return "every Top-K and perplexity equal"
    return f"Top-K Jaccard >= {min_jac} per seed, baseline ppl rel <= {max_base:.0e}"


def pair_check(cid: str, title: str, da: Path, db: Path, level: str, runs: tuple[str, ...]) -> Check:
    """Top-K Jaccard per seed and perplexity relative differences of two ESA out-dirs (or two metric
    folders of runs of several metrics)."""
    tol = level_tolerance(level)
    try:
        ta, tb = top_rows(da), top_rows(db)
        pa, pb = read_json(da / "perturbation_results.json"), read_json(db / "perturbation_results.json")
        jac = jaccards(ta, tb)
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e), tolerance=tol, runs=runs)
    base = rel_diff(as_float(pa["baseline"]["ppl"]), as_float(pb["baseline"]["ppl"]))
    topk = {s: rel_diff(as_float(pa["per_seed"][str(s)]["top_k"]["ppl"]),
                        as_float(pb["per_seed"][str(s)]["top_k"]["ppl"])) for s in jac}
    min_jac, max_base = TOLERANCES[level]
    ok = min(jac.values()) >= min_jac and base <= max_base
    if level == "exact":  # the CPU compared with itself: every number equal
        ok = ok and max(topk.values()) == 0.0 and ta == tb
    detail = ("Jaccard " + " / ".join(f"s{s} {j:.3f}" for s, j in jac.items()) + f"; baseline ppl rel {base:.1e}; "
              "Top-K ppl rel " + " / ".join(f"s{s} {r:.1e}" for s, r in topk.items()))
    return Check(cid, title, PASS if ok else FAIL, detail,
                 {"jaccard": {str(s): j for s, j in jac.items()}, "baseline_ppl_rel_diff": base,
                  "topk_ppl_rel_diff": {str(s): r for s, r in topk.items()}, "level": level}, tol, runs)


def same_run_check(out: Path, cid: str, title: str, runs: tuple[str, str], exact: bool,
                   need_split: bool = False) -> Check:
    """Checks 3, 7, 8: a run that must give the plain device run's answer (``runs``: it, then the plain
    run): the same Top-K set per seed, scores and every condition's perplexity within :data:`SAME_RTOL`
    (exactly equal in cpu-only).  ``need_split``: its device map must put blocks on the GPU and the CPU."""
    rtol = 0.0 if exact else SAME_RTOL
    tol = f"same Top-K, scores and perplexities rel <= {rtol:.0e}" if rtol else "same Top-K, every number equal"
    try:
        do, dp = run_dir(out, runs[0]), run_dir(out, runs[1])
        to, tp = top_rows(do), top_rows(dp)
        po, pp = read_json(do / "perturbation_results.json"), read_json(dp / "perturbation_results.json")
        device_map = read_json(do / "config.json").get("resolved", {}).get("device_map") or {}
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e), tolerance=tol, runs=runs)
    counts = {d: sum(str(v) == d for v in device_map.values()) for d in sorted({str(v) for v in device_map.values()})}
    problems = []
    if need_split and not ("cpu" in counts and any(d != "cpu" for d in counts)):
        problems.append(f"the budget did not split the model between GPU and CPU (device map {counts or 'none'})")
    if sorted(tp) != sorted(to):
        problems.append(f"different seeds: {sorted(to)} vs {sorted(tp)}")
    same_sets = all(tp[s].keys() == to.get(s, {}).keys() for s in tp)
    if not same_sets:
        problems.append("different Top-K")
    worst = max((rel_diff(tp[s][k], to[s][k]) for s in tp for k in tp[s] if k in to.get(s, {})), default=0.0)
    ppl = [(rel_diff(as_float(row["ppl"]), as_float(po["per_seed"].get(seed, {}).get(c, {}).get("ppl", "nan"))))
           for seed, conds in pp["per_seed"].items() for c, row in conds.items()]
    worst_ppl = max([rel_diff(as_float(po["baseline"]["ppl"]), as_float(pp["baseline"]["ppl"])), *ppl])
    if worst > rtol:
        problems.append(f"scores differ by rel {worst:.1e}")
    if worst_ppl > rtol:
        problems.append(f"perplexities differ by rel {worst_ppl:.1e}")
    placement = f"modules per device {counts}; " if counts else ""
    detail = (f"{placement}Top-K {'identical' if same_sets else 'DIFFERENT'}; max score rel diff {worst:.1e}; "
              f"max ppl rel diff {worst_ppl:.1e}")
    if problems:
        detail = "; ".join(problems) + " | " + detail
    return Check(cid, title, FAIL if problems else PASS, detail,
                 {"device_map_counts": counts, "same_topk": same_sets, "max_score_rel_diff": worst,
                  "max_ppl_rel_diff": worst_ppl}, tol, runs)
