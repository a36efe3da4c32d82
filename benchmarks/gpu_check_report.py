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
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules (benchmarks/ is not a package)

from gpu_check_common import (  # noqa: E402
    BF16_SKIP,
    FAIL,
    PASS,
    SKIP,
    Check,
    RunMissing,
    level_tolerance,
    pair_check,
    peak_mb,
    read_json,
    resolved,
    run_dir,
    same_run_check,
)
from gpu_check_paths import path_checks  # noqa: E402


def bench_check(out: Path, cid: str, name: str, title: str) -> Check:
    """Check 1: the benchmark ran and reported its ratios and peak memory."""
    tol = "bench.json has ratios and peak memory of grad_x_weight, act_mag"
    try:
        res = read_json(run_dir(out, name) / "bench.json")
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e), tolerance=tol, runs=(name,))
    ratios, peaks = res.get("ratio", {}), res.get("peak_mb", {})
    missing = [k for k in ("grad_x_weight", "act_mag") if k not in ratios or k not in peaks]
    if missing:
        return Check(cid, title, FAIL, f"bench.json lacks ratio/peak of {', '.join(missing)}", tolerance=tol,
                     runs=(name,))
    parts = ["ratio " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())]
    kind = "CUDA peak" if str(res.get("device", "")).startswith("cuda") else "peak RSS"
    parts.append(f"{kind} fwd+bwd {peaks.get('forward_backward', float('nan')):.0f} MB, "
                 f"grad_x_weight {peaks['grad_x_weight']:.0f} MB")
    return Check(cid, title, PASS, f"{res.get('device')}/{res.get('dtype')}: " + "; ".join(parts),
                 {"ratio": ratios, "peak_mb": peaks, "memory_ratio": res.get("memory_ratio", {})}, tol, (name,))


def esa_pair_check(out: Path, cid: str, a: str, b: str, title: str, level: str) -> Check:
    """Check 2: two ESA runs (``a`` on the device, ``b`` the reference), with the devices they resolved."""
    try:
        da, db = run_dir(out, a), run_dir(out, b)
        where = f"{resolved(da)} vs {resolved(db)}: "
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e), tolerance=level_tolerance(level), runs=(a, b))
    check = pair_check(cid, title, da, db, level, (a, b))
    check.detail = where + check.detail
    return check


def candidates(run: Path) -> list[tuple[int, int, int]]:
    """The super-weight candidates (layer, row, col) of a ``find_super_weights`` out-dir."""
    return [(int(c["layer"]), int(c["row"]), int(c["col"]))
            for c in read_json(run / "super_weights.json").get("candidates", [])]


def superweight_check(out: Path, cid: str, title: str) -> Check:
    """Check 4: the detector finds the same candidates on the device as on the CPU in fp32."""
    tol, runs = "the same (layer, row, col) candidates, at least one", ("sw_dev", "sw_cpu_fp32")
    try:
        a, b = candidates(run_dir(out, "sw_dev")), candidates(run_dir(out, "sw_cpu_fp32"))
    except RunMissing as e:
        return Check(cid, title, FAIL, str(e), tolerance=tol, runs=runs)
    same = sorted(a) == sorted(b) and bool(a)
    fmt = ", ".join(f"L{layer}[{r},{c}]" for layer, r, c in a) or "none"
    detail = f"{len(a)} candidates {fmt}" if same else f"device {fmt} vs cpu " + (
        ", ".join(f"L{layer}[{r},{c}]" for layer, r, c in b) or "none")
    return Check(cid, title, PASS if same else FAIL, detail,
                 {"device": [list(x) for x in a], "cpu": [list(x) for x in b]}, tol, runs)


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
    checks.append(same_run_check(out, "3", f"--device-map auto --offload vs plain {dev} fp32",
                                 ("esa_offload", "esa_dev_fp32"), exact=cpu_only, need_split=not cpu_only))
    sw_title = ("super weights cpu fp32 (bf16 skipped) vs cpu fp32" if cpu_only
                else "super weights cuda bf16 vs cpu fp32")
    checks.append(superweight_check(out, "4", sw_title))
    checks += path_checks(out, cpu_only)
    return checks


def memory_text(out: Path, runs: tuple[str, ...]) -> str:
    """Each run's peak memory: ``name CUDA 1234`` (or ``RSS`` where CUDA was not used), MB."""
    cells = []
    for name in runs:
        peak = peak_mb(out, name)
        if peak is not None:
            cells.append(f"{name} {peak[0]} {peak[1]:.0f}")
    return ", ".join(cells) or "-"


def render(checks: list[Check], out: Path | None = None) -> str:
    """The summary table: number, status, what was compared, the tolerance, each run's peak memory (MB),
    and the measured values."""
    width = max(len(c.title) for c in checks)
    tol = max(len(c.tolerance) for c in checks)
    lines = [f"{'#':<3} {'status':<6} {'check (what is compared)':<{width}}  {'tolerance':<{tol}}  detail",
             "-" * (width + tol + 70)]
    for c in checks:
        lines.append(f"{c.id:<3} {c.status:<6} {c.title:<{width}}  {c.tolerance:<{tol}}  {c.detail}")
        if out is not None and c.runs:
            lines.append(f"{'':<11}peak memory MB: {memory_text(out, c.runs)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table, write ``OUT/summary.json``; exit 1 if any check failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the output folder of gpu_check.sh")
    p.add_argument("--mode", choices=("gpu", "cpu-only"), default="gpu")
    p.add_argument("--wall-seconds", type=float, default=None, help="the script's wall time so far (recorded)")
    args = p.parse_args(argv)
    checks = build_checks(args.out, args.mode)
    print(render(checks, args.out))
    failed = [c.id for c in checks if c.status == FAIL]
    summary = {"mode": args.mode, "passed": not failed, "failed": failed, "wall_seconds": args.wall_seconds,
               "checks": [{**asdict(c), "peak_memory_mb": {r: peak_mb(args.out, r) for r in c.runs}}
                          for c in checks]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    n = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, SKIP)}
    print(f"{n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped"
          + (f" in {args.wall_seconds:.0f} s" if args.wall_seconds is not None else "")
          + f"; summary: {args.out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
