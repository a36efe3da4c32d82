#!/usr/bin/env python
"""Several metrics in one run against each metric's own run: what sharing saves, measured and enforced.

Runs ``esa_runner.py`` once per metric and once with all of them (``--metric a,b,c``), one after the
other in fresh processes, with the same flags (a control that cannot be built for a metric, i.e.
``random_mag_k`` under ``magnitude``, is left out of that metric's own run, as the run of several
metrics skips it there), and reports:

* the scoring passes each run made, counted in the process: the shared batch pass (one forward, with a
  backward when a metric reads the batch gradient), the observers' own forward (under gradient
  checkpointing), the per-window pass, each metric's own passes.  The run of several metrics must
  make each kind of pass once per seed;
* its scoring time (the manifest's ``scoring`` phase) against the sum of the single runs' (bound
  :data:`SCORING_BOUND`): what sharing the passes removes;
* its wall time (process start to exit) against the sum of the single runs' (bound
  :data:`WALL_BOUND`): one load, one baseline evaluation, identical conditions measured once, while
  each metric's own Top-K and controls remain conditions of their own;
* whether each metric's folder holds its own run's Top-K (``top_weights.csv``) and perturbation
  results (volatile keys and the skipped control's note aside).

It prints the ratios and exits 1 when any bound or check fails.

    python benchmarks/bench_multi_metric.py --out /tmp/bench_multi --json bench_multi.json -- \\
        --mode global --topk 100 --perturb zero --controls random_k,bottom_k,random_mag_k --seeds 0,1

Everything after ``--`` is passed to every run (default: the command above on the embedded model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from esa.outdir.compare import compare, strip_volatile  # noqa: E402

DEFAULT_METRICS = "grad_x_weight,act_mag,obs,taylor2,magnitude"
DEFAULT_FLAGS = ["--mode", "global", "--topk", "100", "--perturb", "zero", "--controls",
                 "random_k,bottom_k,random_mag_k", "--seeds", "0,1"]
SCORING_BOUND = 0.65  # multi-metric scoring time <= this x the sum of the single runs' scoring times
WALL_BOUND = 0.70  # multi-metric wall time <= this x the sum of the single runs' wall times


@contextlib.contextmanager
def counting_passes() -> Iterator[Counter]:
    """Inside the block every scoring pass of this process is counted by kind (``{kind: calls}``); the
    pass functions are put back on exit."""
    from esa.metrics import passes
    from esa.metrics.registry import METRICS, Collector

    counts: Counter[str] = Counter()
    saved = [(passes, "forward_pass", passes.forward_pass), (passes, "window_pass", passes.window_pass)]
    own = {n: METRICS[n].collector for n in METRICS if METRICS[n].collector.own_passes is not Collector.own_passes}
    saved += [(cls, "own_passes", cls.own_passes) for cls in own.values()]

    def counting(fn, kind):
        def wrapper(*args, **kwargs):
            counts[kind(*args)] += 1
            return fn(*args, **kwargs)
        return wrapper

    # forward_pass(model, targets, windows, batch_size, observers, n_tokens, ...): n_tokens None = no backward
    passes.forward_pass = counting(passes.forward_pass, lambda *a: "batch forward" + ("+backward" if a[5] else ""))
    passes.window_pass = counting(passes.window_pass, lambda *a: "window forward+backward")
    for name, cls in own.items():
        cls.own_passes = counting(cls.own_passes, lambda *a, _n=name: f"own passes of {_n}")
    try:
        yield counts
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def counted_run(argv: list[str], counts_file: Path) -> int:
    """``esa_runner.main(argv)`` in this process with its passes counted into ``counts_file`` (JSON)."""
    import esa_runner

    with counting_passes() as counts:
        rc = esa_runner.main(argv)
    counts_file.write_text(json.dumps(dict(counts)))
    return rc


def for_metric(metric: str, flags: list[str]) -> list[str]:
    """``flags`` for ``metric``'s own run: without the controls the run of several metrics skips for it."""
    from esa.experiment.controls import unmatched_controls
    from esa.experiment.perturbation import parse_controls

    if "--controls" not in flags:
        return flags
    i = flags.index("--controls") + 1
    wanted = parse_controls(flags[i])
    skipped = unmatched_controls(metric, wanted)
    return [*flags[:i], ",".join(c for c in wanted if c not in skipped) or "none", *flags[i + 1:]]


def timed_run(out: Path, metric: str, flags: list[str]) -> dict:
    """One esa_runner.py process (counting its passes); its wall time, phase timings and pass counts."""
    counts = out.parent / f"{out.name}.passes.json"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--counts", str(counts), "--", "--metric", metric, "--out-dir",
                    str(out), *flags], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    return {"metric": metric, "wall_s": wall, "phases_s": manifest["timings_s"],
            "passes": json.loads(counts.read_text()), "peak_rss_mb": manifest["peak_memory"]["rss_peak_mb"]}


def same_results(folder: Path, single: Path) -> dict[str, bool]:
    """Whether a metric's folder of the multi-metric run holds its own run's Top-K and perturbation results
    (a control skipped for the metric, noted under ``controls``, aside)."""
    out = {"top_weights.csv": compare(folder, single).get("top_weights.csv") == "identical"}
    pert = [folder / "perturbation_results.json", single / "perturbation_results.json"]
    if all(p.is_file() for p in pert):
        a, b = (strip_volatile(json.loads(p.read_text())) for p in pert)
        for res in (a, b):
            controls = {c: v for c, v in (res.pop("controls", None) or {}).items() if not v.get("skipped")}
            if controls:
                res["controls"] = controls
        out["perturbation_results.json"] = a == b
    return out


def verdict(singles: dict[str, dict], multi: dict, seeds: int, same: dict[str, dict[str, bool]]) -> dict:
    """The ratios, the pass counts against once per seed, and every failed check (``failures``)."""
    total_scoring = sum(r["phases_s"].get("scoring", 0.0) for r in singles.values())
    total_wall = sum(r["wall_s"] for r in singles.values())
    ratio_scoring = multi["phases_s"].get("scoring", 0.0) / total_scoring if total_scoring else float("inf")
    ratio_wall = multi["wall_s"] / total_wall
    failures = []
    if ratio_scoring > SCORING_BOUND:
        failures.append(f"scoring {ratio_scoring:.2f}x the single runs' sum > {SCORING_BOUND}")
    if ratio_wall > WALL_BOUND:
        failures.append(f"wall time {ratio_wall:.2f}x the single runs' sum > {WALL_BOUND}")
    # each kind the run of several metrics makes, once per seed (an observer's own forward is no kind of its
    # own there when a gradient metric's forward+backward carries its hooks); the per-window pass and each
    # metric's own passes, which nothing else replaces, as often as in the single runs
    for kind, n in sorted(multi["passes"].items()):
        if n != seeds:
            failures.append(f"{kind}: {n} in the multi-metric run, not once per seed ({seeds})")
    unshared = {k for r in singles.values() for k in r["passes"] if not k.startswith("batch")}
    failures += [f"{kind}: missing from the multi-metric run" for kind in sorted(unshared - set(multi["passes"]))]
    failures += [f"{m}: {name} differs from its own run" for m, files in same.items()
                 for name, ok in files.items() if not ok]
    return {"ratio_scoring": ratio_scoring, "ratio_wall": ratio_wall, "bounds": {"scoring": SCORING_BOUND,
            "wall": WALL_BOUND}, "passes": multi["passes"], "seeds": seeds, "failures": failures}


def seed_count(flags: list[str]) -> int:
    """How many seeds the runs score (``--seeds``; the default is one)."""
    return len(flags[flags.index("--seeds") + 1].split(",")) if "--seeds" in flags else 1


def table(singles: dict[str, dict], multi: dict, v: dict) -> str:
    lines = [f"{'run':<45} {'wall s':>8} {'scoring s':>10} {'evaluation s':>13} {'peak RSS MB':>12}  passes"]
    for r in [*singles.values(), multi]:
        ph = r["phases_s"]
        lines.append(f"{r['metric']:<45} {r['wall_s']:8.1f} {ph.get('scoring', 0):10.2f} "
                     f"{ph.get('evaluation', 0):13.1f} {r['peak_rss_mb']:12.0f}  "
                     + ", ".join(f"{k} x{n}" for k, n in sorted(r["passes"].items())))
    lines.append(f"multi / sum of singles: scoring {v['ratio_scoring']:.2f}x (bound {SCORING_BOUND}), wall "
                 f"{v['ratio_wall']:.2f}x (bound {WALL_BOUND}); each kind of pass once per seed "
                 f"({v['seeds']}): {'yes' if not any('once per seed' in f for f in v['failures']) else 'NO'}")
    lines += [f"FAIL: {f}" for f in v["failures"]] or ["PASS"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--metrics", default=DEFAULT_METRICS)
    p.add_argument("--out", type=Path, help="folder for the runs' out-dirs (must not exist)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--counts", type=Path, help=argparse.SUPPRESS)  # internal: one counted esa_runner run
    args = p.parse_args(argv[:split])
    flags = argv[split + 1:]
    if args.counts is not None:
        return counted_run(flags, args.counts)
    if args.out is None:
        p.error("--out is required")
    flags = flags or DEFAULT_FLAGS
    metrics = args.metrics.split(",")
    args.out.mkdir(parents=True)
    singles = {m: timed_run(args.out / m, m, for_metric(m, flags)) for m in metrics}
    multi = timed_run(args.out / "multi", args.metrics, flags)
    same = {m: same_results(args.out / "multi" / "metrics" / m, args.out / m) for m in metrics}
    v = verdict(singles, multi, seed_count(flags), same)
    print(table(singles, multi, v))
    if args.json:
        args.json.write_text(json.dumps({"flags": flags, "singles": singles, "multi": multi, "same_as_single": same,
                                         **v}, indent=2))
    return 1 if v["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
