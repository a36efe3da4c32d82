#!/usr/bin/env python
"""Memory of loading a model sharded over the ranks (``--shard fsdp``), per rank, against loading it whole.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp_load.py --json load_w2.json
    python benchmarks/bench_fsdp_load.py --whole --json load_whole.json

Per rank (CPU, fp32 unless ``--dtype``): the bytes of its parameter shards (``local_bytes``) and of
the whole model's parameters, the RSS before the load (imports done), the peak RSS during the load
(the high-water mark reset just before it; it counts the pages of the safetensors files being read,
which are page cache, not the process's own memory) and the RSS after it, with its anonymous and
file-backed parts.  ``--whole``: the same for
``load_model`` in one process, the reference.  Rank 0 writes every rank's numbers to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_sensitivity import PeakMemory  # noqa: E402
from esa.model.fsdp import local_bytes, process_mesh  # noqa: E402
from esa.model.fsdp_load import load_sharded  # noqa: E402
from esa.model.loading import load_model, prepare_source  # noqa: E402

MB = 2**20


def rss_mb(field: str = "VmRSS") -> float:
    """A memory figure of /proc/self/status in MB: VmRSS, or its parts RssAnon (heap: the weights) and
    RssFile (file pages mapped in, e.g. safetensors files being read: page cache the kernel can drop)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(load) -> dict:
    """Load with ``load()`` -> model; the memory around it (MB) and the parameter bytes held."""
    before, peak = rss_mb(), []
    with PeakMemory("cpu").measure(peak):
        model = load()
    params = list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    return {"rss_before_mb": before, "peak_rss_during_load_mb": peak[0], "rss_after_mb": rss_mb(),
            "rss_anon_after_mb": rss_mb("RssAnon"), "rss_file_after_mb": rss_mb("RssFile"),
            "load_growth_peak_mb": peak[0] - before, "local_param_mb": local_bytes(params) / MB,
            "model_param_mb": total / MB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--whole", action="store_true", help="load_model in this one process (the reference)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prepare_source(args.model)  # a one-time conversion of the embedded model is not part of the load
    if args.whole:
        rec = measure(lambda: load_model(args.model, "cpu", args.dtype)[0])
        Path(args.json).write_text(json.dumps({"world": 1, "whole": True, "ranks": [rec]}, indent=1))
        print(json.dumps(rec, indent=1))
        return
    with process_mesh("cpu") as mesh:
        rec = measure(lambda: load_sharded(args.model, "cpu", args.dtype, mesh)[0])
        ranks = [None] * tdist.get_world_size()
        tdist.all_gather_object(ranks, rec)
        if tdist.get_rank() == 0:
            Path(args.json).write_text(json.dumps({"world": len(ranks), "whole": False, "ranks": ranks}, indent=1))
            print(json.dumps(ranks, indent=1))


if __name__ == "__main__":
    main()
