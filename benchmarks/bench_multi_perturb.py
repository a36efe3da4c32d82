#!/usr/bin/env python
"""The paper's grid in one run against the same grid as separate runs (one metric, one perturbation each).

On the embedded SmolLM2-135M (``tests.realmodels.embedded_dir()``), with the same flags: one run of
``--metric act_mag,grad_x_weight --perturb zero,sign_flip,gauss_noise,bit_flip --topk-sweep 1,10,100,1000``
and 2 seeds, then each of the 8 (metric, perturbation) runs alone, one after the other in fresh
processes.  Reports each run's wall time (process start to exit) and the manifest's phases, the ratio
of the one run to the sum of the 8 (target <= 0.75: the evaluations are the same in both, so the
saving is the loading and the scoring done once instead of 8 times), whether each perturbation's
folder equals its separate run (``scripts/compare_outdirs.py``'s rules), and runs ``esa-compare`` on
the one run (its table and figures under ``OUT/compare``).

    python benchmarks/bench_multi_perturb.py --out /tmp/bench_mp --json bench_mp.json          # full size
    python benchmarks/bench_multi_perturb.py --out /tmp/bench_mp_small --small                 # a quick try

Full size: 32 calibration and 16 evaluation windows of 256 tokens (the runner's defaults), global Top-100.
``--small`` shrinks the windows (2 + 2 of 32 tokens) to try the script in a few minutes; its ratio is
then dominated by loading, not by scoring, and says little about the full-size one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_multi_metric import timed_run as multi_metric_run  # noqa: E402
from esa.compare.cli import main as compare_main  # noqa: E402
from esa.outdir.compare import compare  # noqa: E402
from tests.realmodels import CORPUS, embedded_dir  # noqa: E402

METRICS = ("act_mag", "grad_x_weight")
PERTURBS = ("zero", "sign_flip", "gauss_noise", "bit_flip")
FULL = ["--max-samples", "32", "--eval-samples", "16", "--max-length", "256"]
SMALL = ["--max-samples", "2", "--eval-samples", "2", "--max-length", "32"]


def common_flags(small: bool) -> list[str]:
    return ["--model", str(embedded_dir()), "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
            *(SMALL if small else FULL), "--mode", "global", "--topk", "100", "--topk-sweep", "1,10,100,1000",
            "--controls", "random_k,bottom_k", "--seeds", "0,1"]


def timed_run(out: Path, metric: str, perturb: str, flags: list[str]) -> dict:
    """One esa_runner.py process (:func:`bench_multi_metric.timed_run`): its wall time and phase timings."""
    return {**multi_metric_run(out, metric, ["--perturb", perturb, *flags]), "perturb": perturb}


def table(runs: list[dict]) -> str:
    """Each run's wall time and the manifest's loading, scoring and evaluation phases, aligned."""
    cols = (("wall s", lambda r: r["wall_s"]), ("load s", lambda r: r["phases_s"].get("load_model", 0)),
            ("scoring s", lambda r: r["phases_s"].get("scoring", 0)),
            ("evaluation s", lambda r: r["phases_s"].get("evaluation", 0)))
    head = f"{'run':<58}" + "".join(f" {name:>13}" for name, _ in cols)
    return "\n".join([head, *(f"{r['metric'] + ' / ' + r['perturb']:<58}" + "".join(f" {get(r):13.1f}"
                                                                                   for _, get in cols)
                               for r in runs)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the runs' out-dirs (must not exist)")
    p.add_argument("--small", action="store_true", help="tiny windows: try the script in minutes")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    flags = common_flags(args.small)
    args.out.mkdir(parents=True)
    one = timed_run(args.out / "one", ",".join(METRICS), ",".join(PERTURBS), flags)
    singles = [timed_run(args.out / f"{m}_{q}", m, q, flags) for m in METRICS for q in PERTURBS]
    total = sum(r["wall_s"] for r in singles)
    same = {f"{m}/{q}": sorted({v for v in compare(args.out / "one" / "metrics" / m / "perturbations" / q,
                                                   args.out / f"{m}_{q}").values()}) for m in METRICS for q in PERTURBS}
    assert compare_main([str(args.out / "one"), "--out", str(args.out / "compare")]) == 0
    result = {"small": args.small, "flags": flags, "one": one, "singles": singles, "singles_total_s": total,
              "ratio_wall": one["wall_s"] / total, "verdicts_against_single": same}
    print("\n".join([table([one, *singles]),
                     f"one run / {len(singles)} separate runs: {one['wall_s']:.1f} s / {total:.1f} s = "
                     f"{result['ratio_wall']:.2f}x (target <= 0.75x at full size)",
                     f"file verdicts of each perturbation's folder against its separate run: {json.dumps(same)}"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
