#!/usr/bin/env python
"""Cost of each sensitivity metric relative to the passes it cannot avoid, on the same tokens.

In one process: plain forward, plain forward+backward (gradients for all target weights, nothing
kept), and each metric's full scoring including Top-K selection (global, k=100).  Reports the median
of ``--repeats`` timings and the ratios
``ratio.<metric>`` = metric / plain fwd+bwd (gradient and curvature metrics),
``ratio.act_mag`` = act_mag / plain forward, and
``ratio.hutchinson_per_probe`` = hutchinson_diag / (probes * plain fwd+bwd).

    python benchmarks/bench_sensitivity.py --data-file ../shared/data/wikitext-2-raw/wiki.test.raw \
        --tokens 2048 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esa.data import bos_policy, from_text  # noqa: E402
from esa.evaluate import batches, nll_sum  # noqa: E402
from esa.models import load_model, resolve_device  # noqa: E402
from esa.selection import top_k  # noqa: E402
from esa.sensitivity import MetricContext, compute_scores  # noqa: E402
from esa.targets import find_targets  # noqa: E402

GRADIENT_METRICS = ("grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-file", required=True)
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens per measurement")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=("cuda", "cpu", "auto"))
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"))
    p.add_argument("--metrics", default="grad_x_weight,grad_squared,act_mag,magnitude,hessian_diag,hutchinson_diag")
    p.add_argument("--hutchinson-samples", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    choice = resolve_device(args.device, True, args.dtype or "bf16", args.dtype is not None)
    model, tok = load_model(args.model, choice.device, choice.dtype)
    targets = find_targets(model)
    n_windows = max(1, args.tokens // args.max_length)
    text = Path(args.data_file).read_text(encoding="utf-8")
    data = from_text(text, args.data_file, tok, args.max_length, 1, n_windows, bos_policy(tok))
    windows = data.calib_pool[:n_windows]
    device = choice.device
    names = [t.name for t in targets]

    def forward():
        with torch.no_grad():
            for b in batches(windows, args.batch_size, device, "fwd"):
                nll_sum(model, b)

    def forward_backward():
        for t in targets:
            t.param.requires_grad_(True)
        try:
            for b in batches(windows, args.batch_size, device, "fwd+bwd"):
                nll_sum(model, b).backward()
        finally:
            for t in targets:
                t.param.requires_grad_(False)
                t.param.grad = None

    res: dict = {"model": args.model, "device": device, "dtype": choice.dtype, "tokens": int(windows.numel()),
                 "windows": n_windows, "max_length": args.max_length, "batch_size": args.batch_size,
                 "repeats": args.repeats, "hutchinson_samples": args.hutchinson_samples, "seconds": {}, "ratio": {}}
    res["seconds"]["forward"] = timed(forward, device, args.repeats)
    res["seconds"]["forward_backward"] = timed(forward_backward, device, args.repeats)
    for metric in args.metrics.split(","):
        ctx = MetricContext(seed=0, hutchinson_samples=args.hutchinson_samples)

        def score(metric=metric, ctx=ctx):
            scores = compute_scores(metric, model, targets, windows, args.batch_size, ctx)
            top_k(scores, names, 100, "global")

        res["seconds"][metric] = timed(score, device, args.repeats)
        if metric in GRADIENT_METRICS:
            res["ratio"][metric] = res["seconds"][metric] / res["seconds"]["forward_backward"]
        elif metric == "act_mag":
            res["ratio"][metric] = res["seconds"][metric] / res["seconds"]["forward"]
    if "hutchinson_diag" in res["seconds"]:
        res["ratio"]["hutchinson_per_probe"] = res["ratio"]["hutchinson_diag"] / args.hutchinson_samples
    print(f"{res['model']} on {device} ({choice.dtype}), {res['tokens']} tokens, median of {args.repeats}")
    print(f"{'measurement':<24}{'seconds':>10}{'ratio':>10}")
    for k, v in res["seconds"].items():
        r = res["ratio"].get(k)
        print(f"{k:<24}{v:>10.3f}{'' if r is None else f'{r:>10.2f}'}")
    if "hutchinson_per_probe" in res["ratio"]:
        print(f"{'hutchinson per probe':<24}{'':>10}{res['ratio']['hutchinson_per_probe']:>10.2f}  (target <= 3)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
