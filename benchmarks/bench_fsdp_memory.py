"""Per-rank memory under ``--shard fsdp``: the bytes each rank holds for parameters, gradients and fp32
score buffers, against the whole model's, and the run's wall time and peak RSS.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp_memory.py --data-file "$ESA_WIKITEXT2_RAW" \\
        --json fsdp_memory.json

Each rank loads its shard of the model (``esa.model.fsdp.load_sharded``), scores ``grad_x_weight`` on
the same calibration windows as ``esa_runner`` would (split over the ranks), and counts:

* parameters: the bytes of its local shards (``to_local()``);
* gradients: the bytes of one backward's local gradients (each reaches the rank already
  reduce-scattered: its rows only; a hook sees it before the accumulator folds and frees it);
* score buffers: the bytes of its fp32 accumulators / scores (its rows only).

Each is reported beside the whole model's number divided by W; the target is 1/W within 10 %.
Rank 0 prints the table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from esa.data import load_data  # noqa: E402
from esa.metrics import MetricContext, compute_scores  # noqa: E402
from esa.model import distributed, fsdp  # noqa: E402
from esa.model.fsdp_load import load_sharded  # noqa: E402
from esa.model.targets import find_targets  # noqa: E402
from esa.seeding import numpy_rng  # noqa: E402


def local_bytes(tensors) -> int:
    return sum(distributed.local(t).numel() * t.element_size() for t in tensors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-file", required=True)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-samples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with fsdp.process_mesh("cpu") as mesh:
        world = distributed.world_size()
        model, tok = load_sharded(args.model, "cpu", "fp32", mesh)
        loaded = time.perf_counter() - t0
        targets = find_targets(model)
        params = list(model.parameters())
        whole_params = sum(p.numel() * p.element_size() for p in params)
        data = load_data(tok, args.data_file, None, args.max_length, 1, args.max_samples)
        windows = data.calib_pool[torch.from_numpy(data.calibration_indices(numpy_rng(0, "calibration"),
                                                                            args.max_samples))]
        grad_bytes: dict[int, int] = {}

        def seen(p: torch.Tensor) -> None:  # runs before the accumulator's hook frees the gradient
            grad_bytes[id(p)] = distributed.local(p.grad).numel() * p.grad.element_size()

        for t in targets:  # a hook needs requires_grad; the metric sets it itself and clears it after
            t.param.requires_grad_(True)
        handles = [t.param.register_post_accumulate_grad_hook(seen) for t in targets]
        t1 = time.perf_counter()
        scores = compute_scores("grad_x_weight", model, targets, windows, args.batch_size, MetricContext())
        scoring = time.perf_counter() - t1
        for h in handles:
            h.remove()
        row = {"rank": distributed.rank(), "world": world,
               "param_bytes": local_bytes(params), "param_bytes_whole": whole_params,
               "grad_bytes": sum(grad_bytes.values()),
               "grad_bytes_whole": sum(t.numel * t.param.element_size() for t in targets),
               "score_bytes": sum(s.numel() * s.element_size() for s in scores.values()),
               "score_bytes_whole": sum(t.numel * 4 for t in targets),
               "load_s": loaded, "scoring_s": scoring,
               "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        rows = distributed.all_gather_object(row)
    if rows[0]["rank"] == 0 and distributed.rank() == 0:
        print(f"{'rank':>4} {'what':<8} {'bytes':>14} {'whole / W':>14} {'ratio':>7}")
        for r in rows:
            for what, key in (("params", "param_bytes"), ("grads", "grad_bytes"), ("scores", "score_bytes")):
                share = r[f"{key}_whole"] / r["world"]
                print(f"{r['rank']:>4} {what:<8} {r[key]:>14,} {share:>14,.0f} {r[key] / share:>7.3f}")
            print(f"{r['rank']:>4} load {r['load_s']:.1f} s, scoring {r['scoring_s']:.1f} s, peak RSS "
                  f"{r['rss_peak_mb']:.0f} MB")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
