#!/usr/bin/env python
"""Compare the runs of ``benchmarks/gpu_check.sh``, print its PASS/FAIL table and write ``summary.json``.

The shell script runs every command with its out-dir under one output folder ``OUT`` and records
each run's exit status in ``OUT/logs/<run>.rc`` (its output in ``OUT/logs/<run>.log``).  This helper
only reads those files (no torch import), so it can be tested on synthetic out-dirs.  Runs:

* ``bench_fp32``, ``bench_bf16``: ``bench.json`` of ``benchmarks/bench_sensitivity.py``;
* ``esa_dev_fp32``, ``esa_dev_bf16``, ``esa_cpu_fp32``: the same ESA command on the device (cuda;
  cpu in ``--mode cpu-only``) in fp32 and bf16, and the CPU fp32 reference;
* ``esa_offload``: the device fp32 command with ``--device-map auto --offload`` and a GPU budget
  small enough that some blocks run on the CPU;
* ``sw_dev``, ``sw_cpu_fp32``: ``scripts/find_super_weights.py`` on the device (bf16; fp32 in
  ``cpu-only``) and on the CPU in fp32.

Agreement required (``cpu-only`` compares the CPU with itself, so everything must be exact):

* fp32 device vs CPU: Top-K Jaccard >= 0.9 for every seed, baseline perplexity within rel 1e-4;
* bf16 vs fp32 (a sanity bound, the measured values are the point): Jaccard >= 0.5, baseline
  perplexity within rel 5e-2;
* offload vs plain device path: the same Top-K set per seed and scores within rel 1e-5;
* super weights: the same (layer, row, col) candidates.

    python benchmarks/gpu_check_report.py OUT --mode gpu
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.analysis.stability import index_sets, jaccard  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
BF16_SKIP = "cpu-only: bf16 is very slow on this CPU"
# (min Jaccard per seed, max baseline perplexity relative difference) per comparison level
TOLERANCES = {"exact": (1.0, 0.0), "fp32": (0.9, 1e-4), "bf16": (0.5, 5e-2)}
OFFLOAD_SCORE_RTOL = 1e-5


@dataclass
class Check:
    """One row of the table: its number, what it compares, the verdict and the measured values."""

    id: str
    title: str
    status: str
    detail: str
    values: dict = field(default_factory=dict)


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


def bench_check(out: Path, cid: str, name: str, title: str) -> Check:
    """Check 1: the benchmark ran and reported its ratios and peak memory."""
    try:
        res = read_json(run_dir(out, name) / "bench.json")
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e))
    ratios, peaks = res.get("ratio", {}), res.get("peak_mb", {})
    missing = [k for k in ("grad_x_weight", "act_mag") if k not in ratios or k not in peaks]
    if missing:
        return Check(cid, title, FAIL, f"bench.json lacks ratio/peak of {', '.join(missing)}")
    parts = ["ratio " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())]
    kind = "CUDA peak" if str(res.get("device", "")).startswith("cuda") else "peak RSS"
    parts.append(f"{kind} fwd+bwd {peaks.get('forward_backward', float('nan')):.0f} MB, "
                 f"grad_x_weight {peaks['grad_x_weight']:.0f} MB")
    return Check(cid, title, PASS, f"{res.get('device')}/{res.get('dtype')}: " + "; ".join(parts),
                 {"ratio": ratios, "peak_mb": peaks, "memory_ratio": res.get("memory_ratio", {})})


def esa_pair_check(out: Path, cid: str, a: str, b: str, title: str, level: str) -> Check:
    """Check 2: Top-K Jaccard per seed and perplexity relative differences of two ESA runs."""
    try:
        da, db = run_dir(out, a), run_dir(out, b)
        ta, tb = top_rows(da), top_rows(db)
        pa, pb = read_json(da / "perturbation_results.json"), read_json(db / "perturbation_results.json")
        where = f"{resolved(da)} vs {resolved(db)}"
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e))
    if sorted(ta) != sorted(tb):
        return Check(cid, title, FAIL, f"different seeds: {sorted(ta)} vs {sorted(tb)}")
    jac = {s: jaccard(index_sets(ta[s]), index_sets(tb[s])) for s in sorted(ta)}
    base = rel_diff(as_float(pa["baseline"]["ppl"]), as_float(pb["baseline"]["ppl"]))
    topk = {s: rel_diff(as_float(pa["per_seed"][str(s)]["top_k"]["ppl"]),
                        as_float(pb["per_seed"][str(s)]["top_k"]["ppl"])) for s in sorted(ta)}
    min_jac, max_base = TOLERANCES[level]
    ok = min(jac.values()) >= min_jac and base <= max_base
    if level == "exact":  # the CPU compared with itself: every number equal
        ok = ok and max(topk.values()) == 0.0
    detail = (f"{where}: Jaccard " + " / ".join(f"s{s} {j:.3f}" for s, j in jac.items())
              + f" (need >= {min_jac}); baseline ppl rel {base:.1e} (need <= {max_base:.0e}); Top-K ppl rel "
              + " / ".join(f"s{s} {r:.1e}" for s, r in topk.items()))
    return Check(cid, title, PASS if ok else FAIL, detail,
                 {"jaccard": {str(s): j for s, j in jac.items()}, "baseline_ppl_rel_diff": base,
                  "topk_ppl_rel_diff": {str(s): r for s, r in topk.items()}, "level": level})


def offload_check(out: Path, cid: str, title: str, exact: bool, need_split: bool) -> Check:
    """Check 3: ``--device-map auto --offload`` gives the plain device path's Top-K and scores."""
    try:
        dp, do = run_dir(out, "esa_dev_fp32"), run_dir(out, "esa_offload")
        tp, to = top_rows(dp), top_rows(do)
        device_map = read_json(do / "config.json").get("resolved", {}).get("device_map") or {}
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e))
    placed = sorted({str(v) for v in device_map.values()})
    counts = {d: sum(str(v) == d for v in device_map.values()) for d in placed}
    problems = []
    if need_split and not ("cpu" in placed and any(d != "cpu" for d in placed)):
        problems.append(f"the budget did not split the model between GPU and CPU (device map {counts or 'none'})")
    if sorted(tp) != sorted(to):
        problems.append(f"different seeds: {sorted(tp)} vs {sorted(to)}")
    same_sets = all(tp[s].keys() == to.get(s, {}).keys() for s in tp)
    if not same_sets:
        problems.append("different Top-K")
    worst = max((rel_diff(tp[s][k], to[s][k]) for s in tp for k in tp[s] if k in to.get(s, {})), default=0.0)
    rtol = 0.0 if exact else OFFLOAD_SCORE_RTOL
    if worst > rtol:
        problems.append(f"scores differ by rel {worst:.1e} > {rtol:.0e}")
    placement = f"modules per device {counts}" if counts else "one device (no device map recorded)"
    detail = (f"{placement}; Top-K {'identical' if same_sets else 'DIFFERENT'}; "
              f"max score rel diff {worst:.1e} (need <= {rtol:.0e})")
    if problems:
        detail = "; ".join(problems) + " | " + detail
    return Check(cid, title, FAIL if problems else PASS, detail,
                 {"device_map_counts": counts, "same_topk": same_sets, "max_score_rel_diff": worst})


def candidates(run: Path) -> list[tuple[int, int, int]]:
    """The super-weight candidates (layer, row, col) of a ``find_super_weights`` out-dir."""
    return [(int(c["layer"]), int(c["row"]), int(c["col"]))
            for c in read_json(run / "super_weights.json").get("candidates", [])]


def superweight_check(out: Path, cid: str, title: str) -> Check:
    """Check 4: the detector finds the same candidates on the device as on the CPU in fp32."""
    try:
        a, b = candidates(run_dir(out, "sw_dev")), candidates(run_dir(out, "sw_cpu_fp32"))
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e))
    same = sorted(a) == sorted(b) and bool(a)
    fmt = ", ".join(f"L{layer}[{r},{c}]" for layer, r, c in a) or "none"
    detail = f"{len(a)} candidates {fmt}" if same else f"device {fmt} vs cpu " + (
        ", ".join(f"L{layer}[{r},{c}]" for layer, r, c in b) or "none")
    return Check(cid, title, PASS if same else FAIL, detail,
                 {"device": [list(x) for x in a], "cpu": [list(x) for x in b]})


def build_checks(out: Path, mode: str) -> list[Check]:
    """Every check of the GPU script, in order (``mode``: ``gpu`` or ``cpu-only``)."""
    cpu_only = mode == "cpu-only"
    dev = "cpu" if cpu_only else "cuda"
    checks = [bench_check(out, "1a", "bench_fp32", f"benchmark fp32 on {dev}: ratios + peak memory")]
    title_1b = "benchmark bf16 on cuda: grad_x_weight, act_mag"
    checks.append(Check("1b", title_1b, SKIP, BF16_SKIP) if cpu_only
                  else bench_check(out, "1b", "bench_bf16", title_1b))
    checks.append(esa_pair_check(out, "2a", "esa_dev_fp32", "esa_cpu_fp32", f"ESA {dev} fp32 vs cpu fp32",
                                 "exact" if cpu_only else "fp32"))
    for cid, other, title in (("2b", "esa_cpu_fp32", "ESA cuda bf16 vs cpu fp32"),
                              ("2c", "esa_dev_fp32", "ESA cuda bf16 vs cuda fp32")):
        checks.append(Check(cid, title, SKIP, BF16_SKIP) if cpu_only
                      else esa_pair_check(out, cid, "esa_dev_bf16", other, title, "bf16"))
    checks.append(offload_check(out, "3", f"--device-map auto --offload vs plain {dev} fp32", exact=cpu_only,
                                need_split=not cpu_only))
    sw_title = ("super weights cpu fp32 (bf16 skipped) vs cpu fp32" if cpu_only
                else "super weights cuda bf16 vs cpu fp32")
    checks.append(superweight_check(out, "4", sw_title))
    checks.append(Check("5", "--quantize / multi-metric", SKIP, "not implemented yet, skipped"))
    return checks


def render(checks: list[Check]) -> str:
    """The summary table: number, status, what was compared and the measured values."""
    width = max(len(c.title) for c in checks)
    lines = [f"{'#':<3} {'status':<6} {'check':<{width}}  detail", "-" * (width + 60)]
    lines += [f"{c.id:<3} {c.status:<6} {c.title:<{width}}  {c.detail}" for c in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table, write ``OUT/summary.json``; exit 1 if any check failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the output folder of gpu_check.sh")
    p.add_argument("--mode", choices=("gpu", "cpu-only"), default="gpu")
    p.add_argument("--wall-seconds", type=float, default=None, help="the script's wall time so far (recorded)")
    args = p.parse_args(argv)
    checks = build_checks(args.out, args.mode)
    print(render(checks))
    failed = [c.id for c in checks if c.status == FAIL]
    summary = {"mode": args.mode, "passed": not failed, "failed": failed, "wall_seconds": args.wall_seconds,
               "checks": [asdict(c) for c in checks]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    n = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, SKIP)}
    print(f"{n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped"
          + (f" in {args.wall_seconds:.0f} s" if args.wall_seconds is not None else "")
          + f"; summary: {args.out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
