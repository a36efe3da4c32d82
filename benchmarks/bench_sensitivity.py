#!/usr/bin/env python
"""Cost of each sensitivity metric relative to the passes it cannot avoid, on the same tokens.

In one process, on the same calibration tokens: plain forward, plain forward+backward (gradients
for all target weights, nothing kept) and each metric's full scoring including a global Top-K
(k=100); the peak memory of each (RSS high-water mark on CPU, reset before each measurement
through /proc/self/clear_refs; CUDA peak allocated on GPU); global Top-K alone; perturb+restore of
k = 1, 1000, 100000 weights (the Top-K, and as many random weights spread over every tensor).
Then, in fresh child processes, the peak memory of a whole ``esa.runner.pipeline.run`` scoring 1 seed
and 4 seeds.  Timings are medians of ``--repeats`` runs after one warm-up run.  Ratios:

* ``ratio.<metric>`` = metric / plain fwd+bwd (gradient and curvature metrics; targets <= 1.10,
  Hutchinson <= 3 per probe), ``ratio.act_mag`` = act_mag / plain forward (target <= 1.10),
  ``ratio.hutchinson_per_probe`` = hutchinson_diag / (probes * plain fwd+bwd);
* ``ratio_b1.<metric>`` = grad_squared or hessian_diag / plain fwd+bwd at batch size 1 (both need
  one backward per window, so this is their cost net of the batching they cannot use);
* ``memory_ratio.<metric>`` = peak of the metric / peak of plain fwd+bwd (target <= 1.3);
* ``memory_seeds_1_mb`` / ``memory_seeds_4_mb`` (target: within 10 %);
* ``perturb_restore_ms.k<k>`` (target k1000 <= 50 ms on CPU).

    python benchmarks/bench_sensitivity.py --data-file "$ESA_WIKITEXT2_RAW" \
        --tokens 2048 --json bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.data import bos_policy, from_text  # noqa: E402
from esa.experiment.controls import control  # noqa: E402
from esa.experiment.perturb import perturbed  # noqa: E402
from esa.experiment.selection import top_k  # noqa: E402
from esa.metrics import MetricContext, compute_scores  # noqa: E402
from esa.model.device import resolve_device  # noqa: E402
from esa.model.forward import batches, nll_sum  # noqa: E402
from esa.model.introspect import input_device  # noqa: E402
from esa.model.loading import load_model  # noqa: E402
from esa.model.targets import find_targets  # noqa: E402
from esa.runner.seeds import release_memory  # noqa: E402

GRADIENT_METRICS = ("grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag")
PER_WINDOW_METRICS = ("grad_squared", "hessian_diag")
TARGETS = {"ratio.grad_x_weight": 1.10, "ratio.grad_squared": 1.10, "ratio.act_mag": 1.10,
           "ratio.hutchinson_per_probe": 3.0, "memory_ratio.grad_x_weight": 1.3, "perturb_restore_ms.k1000": 50.0}


class PeakMemory:
    """Peak memory of the block in MB: CUDA peak allocated on GPU, else the RSS high-water mark."""

    def __init__(self, device: str):
        self.device = device

    @contextlib.contextmanager
    def measure(self, into: list[float]):
        release_memory()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        yield
        into.append(self.peak_mb())

    def peak_mb(self) -> float:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")


def timed(fn, device: str, repeats: int, mem: PeakMemory, peaks: list[float]) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run (peak kept in ``peaks``)."""
    with mem.measure(peaks):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def seeds_child(args) -> int:
    """Child process: a whole scoring run (no perturbation) with ``--seeds-child`` seeds; prints its peak."""
    from esa.config import RunConfig
    from esa.runner.pipeline import run

    n = max(1, args.tokens // args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig.of(model=args.model, device=args.device, device_explicit=True, dtype=args.dtype or "bf16",
                           dtype_explicit=args.dtype is not None, metrics=("grad_x_weight",), mode="global", topk=100,
                           seeds=tuple(range(args.seeds_child)), data_file=args.data_file, max_samples=n,
                           eval_samples=1, max_length=args.max_length, batch_size=args.batch_size,
                           out_dir=str(Path(tmp) / "run"))
        with contextlib.redirect_stdout(sys.stderr):
            run(cfg)
    print(json.dumps({"peak_mb": PeakMemory(args.device).peak_mb()}))
    return 0


def seeds_memory(argv: list[str], n_seeds: int) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--seeds-child", str(n_seeds)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def perturb_restore_ms(targets, sel, repeats: int) -> float:
    by_name = {t.name: t for t in targets}
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with perturbed(by_name, sel, "sign_flip", 1.0, 1.0, gen):
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-file", required=True)
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens per measurement")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=("cuda", "cpu", "auto"))
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"))
    p.add_argument("--metrics", default="grad_x_weight,grad_squared,act_mag,magnitude,hessian_diag,hutchinson_diag")
    p.add_argument("--hutchinson-samples", type=int, default=4)
    p.add_argument("--perturb-ks", default="1,1000,100000")
    p.add_argument("--no-seeds-memory", action="store_true", help="skip the 1-seed / 4-seed child runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--seeds-child", type=int, default=0, help=argparse.SUPPRESS)
    return p, p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _, args = parse_args(argv)
    choice = resolve_device(args.device, True, args.dtype or "bf16", args.dtype is not None)
    args.device, args.dtype = choice.device, choice.dtype
    if args.seeds_child:
        return seeds_child(args)
    model, tok = load_model(args.model, choice.device, choice.dtype)
    targets = find_targets(model)
    names = [t.name for t in targets]
    n_windows = max(1, args.tokens // args.max_length)
    text = Path(args.data_file).read_text(encoding="utf-8")
    data = from_text(text, args.data_file, tok, args.max_length, 1, n_windows, bos_policy(tok))
    windows = data.calib_pool[:n_windows]
    device = str(input_device(model))
    mem = PeakMemory(device)

    def forward():
        with torch.no_grad():
            for b in batches(windows, args.batch_size, device, "fwd"):
                nll_sum(model, b)

    def forward_backward(batch_size: int = args.batch_size):
        for t in targets:
            t.param.requires_grad_(True)
        try:
            for b in batches(windows, batch_size, device, "fwd+bwd"):
                nll_sum(model, b).backward()
        finally:
            for t in targets:
                t.param.requires_grad_(False)
                t.param.grad = None

    res: dict = {"model": args.model, "device": device, "dtype": choice.dtype, "tokens": int(windows.numel()),
                 "windows": n_windows, "max_length": args.max_length, "batch_size": args.batch_size,
                 "repeats": args.repeats, "hutchinson_samples": args.hutchinson_samples, "torch_threads":
                 torch.get_num_threads(), "seconds": {}, "peak_mb": {}, "ratio": {}, "ratio_b1": {}, "memory_ratio": {}}
    # grad_squared and hessian_diag need one backward per window (per-window granularity), so the
    # same pass at batch size 1 is reported too: it separates the batching loss from the metric's cost
    passes = [("forward", forward), ("forward_backward", forward_backward),
              ("forward_backward_b1", lambda: forward_backward(1))]
    for name, fn in passes:
        peaks: list[float] = []
        res["seconds"][name] = timed(fn, device, args.repeats, mem, peaks)
        res["peak_mb"][name] = peaks[0]
    for metric in args.metrics.split(","):
        ctx = MetricContext(seed=0, hutchinson_samples=args.hutchinson_samples)

        def score(metric=metric, ctx=ctx):
            s = compute_scores(metric, model, targets, windows, args.batch_size, ctx)
            top_k(s, names, 100, "global")
            return s

        peaks = []
        res["seconds"][metric] = timed(score, device, args.repeats, mem, peaks)
        res["peak_mb"][metric] = peaks[0]
        res["memory_ratio"][metric] = peaks[0] / res["peak_mb"]["forward_backward"]
        base = "forward" if metric == "act_mag" else "forward_backward"
        if metric in GRADIENT_METRICS or metric == "act_mag":
            res["ratio"][metric] = res["seconds"][metric] / res["seconds"][base]
        if metric in PER_WINDOW_METRICS:
            res["ratio_b1"][metric] = res["seconds"][metric] / res["seconds"]["forward_backward_b1"]
    if "hutchinson_diag" in res["ratio"]:
        res["ratio"]["hutchinson_per_probe"] = res["ratio"]["hutchinson_diag"] / args.hutchinson_samples
    release_memory()
    scores = compute_scores("grad_x_weight", model, targets, windows, args.batch_size)  # a realistic score set
    res["seconds"]["global_top_k_100"] = timed(lambda s=scores: top_k(s, names, 100, "global"), device, args.repeats,
                                               mem, [])
    res["perturb_restore_ms"], res["perturb_restore_ms_random"] = {}, {}
    for k in (int(x) for x in args.perturb_ks.split(",")):
        top = top_k(scores, names, k, "global")
        res["perturb_restore_ms"][f"k{k}"] = perturb_restore_ms(targets, top, args.repeats)
        rand = control("random_k", scores, names, k, "global", top, np.random.default_rng(0))
        res["perturb_restore_ms_random"][f"k{k}"] = perturb_restore_ms(targets, rand, args.repeats)
    del scores
    if not args.no_seeds_memory:
        child = _without_json(argv)
        res["memory_seeds_1_mb"] = seeds_memory(child, 1)
        res["memory_seeds_4_mb"] = seeds_memory(child, 4)
        res["memory_seeds_ratio"] = res["memory_seeds_4_mb"] / res["memory_seeds_1_mb"]
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _without_json(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def print_table(res: dict) -> None:
    print(f"{res['model']} on {res['device']} ({res['dtype']}, {res['torch_threads']} threads), "
          f"{res['tokens']} tokens, median of {res['repeats']}")
    print(f"{'measurement':<24}{'seconds':>10}{'ratio':>8}{'peak MB':>10}{'mem ratio':>10}")
    for k, v in res["seconds"].items():
        r, m, mr = res["ratio"].get(k), res["peak_mb"].get(k), res["memory_ratio"].get(k)
        print(f"{k:<24}{v:>10.3f}{'' if r is None else f'{r:>8.3f}':>8}{'' if m is None else f'{m:>10.0f}':>10}"
              f"{'' if mr is None else f'{mr:>10.3f}':>10}")
    if "hutchinson_per_probe" in res["ratio"]:
        print(f"{'hutchinson per probe':<24}{'':>10}{res['ratio']['hutchinson_per_probe']:>8.3f}"
              f"   ({res['hutchinson_samples']} probes)")
    for k, v in res["ratio_b1"].items():
        print(f"{k + ' / fwd+bwd at batch 1':<40}{v:>8.3f}")
    for k, v in res["perturb_restore_ms"].items():
        print(f"perturb+restore {k:<8} {v:>8.2f} ms (Top-K), {res['perturb_restore_ms_random'][k]:>8.2f} ms (random)")
    if "memory_seeds_1_mb" in res:
        print(f"pipeline peak: 1 seed {res['memory_seeds_1_mb']:.0f} MB, 4 seeds {res['memory_seeds_4_mb']:.0f} MB "
              f"(x{res['memory_seeds_ratio']:.3f})")
    flat = {**{f"ratio.{k}": v for k, v in res["ratio"].items()},
            **{f"memory_ratio.{k}": v for k, v in res["memory_ratio"].items()},
            **{f"perturb_restore_ms.{k}": v for k, v in res["perturb_restore_ms"].items()}}
    for key, target in TARGETS.items():
        if key in flat:
            print(f"target {key:<32} {flat[key]:>9.3f} <= {target:<5} {'met' if flat[key] <= target else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
