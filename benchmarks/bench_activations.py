#!/usr/bin/env python
"""What the ``activations`` evaluator costs on top of perplexity: one condition measured with
perplexity alone, and with ``perplexity,activations`` (the activation hooks riding perplexity's
forward), alternately, ``--repeats`` times each, on the same model and windows.

Each repeat measures, with a fresh measurer, the baseline (activations: the per-layer statistics and
the massive set) and one condition that changes nothing (activations: also the values at every
baseline massive activation), so both paths of the hooks are timed.  Prints the median seconds of
each and their ratio (the issue's target: at most 1.20x), and checks that perplexity is bit-identical.

    python benchmarks/bench_activations.py --data-file "$ESA_WIKITEXT2_RAW" --eval-samples 16 --max-length 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from esa.data import load_data  # noqa: E402
from esa.evaluators import EvalInputs  # noqa: E402
from esa.evaluators.activations import Activations  # noqa: E402
from esa.evaluators.measure import Measurer, unchanged  # noqa: E402
from esa.evaluators.perplexity import Perplexity  # noqa: E402
from esa.experiment.registry import Condition  # noqa: E402
from esa.model.loading import load_model  # noqa: E402
from esa.options import Options  # noqa: E402


def timed(model, inputs: EvalInputs, with_activations: bool) -> tuple[float, dict]:
    """Seconds to measure the baseline and one unchanged condition; the condition's row."""
    evaluators = [Perplexity(Options(), inputs)] + ([Activations(Options(), inputs)] if with_activations else [])
    m = Measurer(model, evaluators)
    t0 = time.perf_counter()
    m.baseline()
    row = m.measure(Condition("unchanged", "unchanged", unchanged, "unchanged"))
    return time.perf_counter() - t0, row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--data-file", required=True)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's); 1 makes "
                   "timings on a shared machine far less noisy")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, args.device, args.dtype)
    windows = load_data(tok, args.data_file, None, args.max_length, args.eval_samples, 0).eval_windows
    inputs = EvalInputs(windows, args.batch_size)
    timed(model, inputs, True)  # warm-up (allocator, first-call overheads)
    alone, both, rows = [], [], []
    for _ in range(args.repeats):  # alternating, so that a neighbour's load hits both alike
        t, row_alone = timed(model, inputs, False)
        alone.append(t)
        t, row_both = timed(model, inputs, True)
        both.append(t)
        rows.append((row_alone, row_both))
    identical = all(a == {k: v for k, v in b.items() if k != "activations"} for a, b in rows)
    result = {"model": args.model, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "windows": list(windows.shape),
              "batch_size": args.batch_size, "repeats": args.repeats, "perplexity_s": alone,
              "perplexity_activations_s": both, "ratio_median": statistics.median(both) / statistics.median(alone),
              "perplexity_bit_identical": identical,
              "baseline_massive": rows[0][1]["activations"]["n_massive"]}
    print(f"{args.model} {args.device} {args.dtype}, {windows.shape[0]} windows x {windows.shape[1]} tokens, batch "
          f"{args.batch_size}: baseline + one condition")
    print(f"  perplexity alone:            median {statistics.median(alone):.2f} s  {[round(t, 2) for t in alone]}")
    print(f"  perplexity + activations:    median {statistics.median(both):.2f} s  {[round(t, 2) for t in both]}")
    print(f"  ratio {result['ratio_median']:.3f}x; perplexity bit-identical: {identical}; "
          f"{result['baseline_massive']} massive activations in the baseline")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
