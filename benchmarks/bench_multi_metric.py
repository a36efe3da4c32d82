#!/usr/bin/env python
"""One multi-metric run against each metric's own run, side by side on the same data and flags.

Runs ``esa_runner.py`` once per metric and once with all of them (``--metric a,b,c``), one after
the other in fresh processes, with the same flags; then reports each run's wall time (process
start to exit) and the manifest's phases (scoring, selection, evaluation, ...), the ratio of the
multi-metric run to the slowest single-metric run (whole run, and scoring alone), and whether each
metric's folder of the multi-metric run holds the same Top-K (``top_weights.csv``) and perturbation
results as that metric's own run.

    python benchmarks/bench_multi_metric.py --out /tmp/bench_multi --json bench_multi.json -- \\
        --mode global --topk 100 --perturb zero --controls random_k,bottom_k,random_mag_k --seeds 0,1

Everything after ``--`` is passed to every run (default: the command above on the embedded model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from esa.outdir.compare import compare  # noqa: E402

DEFAULT_METRICS = "grad_x_weight,act_mag,obs,taylor2,magnitude"
DEFAULT_FLAGS = ["--mode", "global", "--topk", "100", "--perturb", "zero", "--controls",
                 "random_k,bottom_k,random_mag_k", "--seeds", "0,1"]


def timed_run(out: Path, metric: str, flags: list[str]) -> dict:
    """One esa_runner.py process; its wall time and the manifest's phase timings."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "esa_runner.py"), "--metric", metric, "--out-dir", str(out), *flags],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    return {"metric": metric, "wall_s": wall, "phases_s": manifest["timings_s"],
            "peak_rss_mb": manifest["peak_memory"]["rss_peak_mb"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--metrics", default=DEFAULT_METRICS)
    p.add_argument("--out", type=Path, required=True, help="folder for the runs' out-dirs (must not exist)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv[:split])
    flags = argv[split + 1:] or DEFAULT_FLAGS
    metrics = args.metrics.split(",")
    args.out.mkdir(parents=True)
    singles = {m: timed_run(args.out / m, m, flags) for m in metrics}
    multi = timed_run(args.out / "multi", args.metrics, flags)
    slowest = max(singles.values(), key=lambda r: r["wall_s"])
    same = {}
    for m in metrics:
        diff = compare(args.out / "multi" / "metrics" / m, args.out / m)
        same[m] = {name: diff.get(name) for name in ("top_weights.csv", "perturbation_results.json")}
    result = {"flags": flags, "singles": singles, "multi": multi, "slowest_single": slowest["metric"],
              "ratio_wall": multi["wall_s"] / slowest["wall_s"],
              "ratio_scoring": multi["phases_s"]["scoring"] / max(r["phases_s"]["scoring"] for r in singles.values()),
              "same_as_single": same}
    print(f"{'run':<45} {'wall s':>8} {'scoring s':>10} {'evaluation s':>13} {'peak RSS MB':>12}")
    for r in [*singles.values(), multi]:
        ph = r["phases_s"]
        print(f"{r['metric']:<45} {r['wall_s']:8.1f} {ph.get('scoring', 0):10.1f} {ph.get('evaluation', 0):13.1f} "
              f"{r['peak_rss_mb']:12.0f}")
    print(f"multi / slowest single ({slowest['metric']}): wall {result['ratio_wall']:.2f}x, "
          f"scoring {result['ratio_scoring']:.2f}x")
    print("per-metric files equal to the single-metric run:", json.dumps(same))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
