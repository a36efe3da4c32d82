#!/usr/bin/env python
"""How a pruning condition is applied: the per-forward swap the tool uses against zeroing in place.

On the embedded SmolLM2-135M (fp32, CPU by default), 50 % magnitude pruning per row of every linear
weight, the same evaluation windows:

* ``swap`` (:func:`esa.experiment.prune.pruned`): each target's masked copy made from its 1-bit
  mask just before the module runs, swapped back after; the stored model is never written.
  Extra memory: the bit-packed masks (1 bit per pruned weight) + one tensor's masked copy.
* ``in_place``: the removed values saved, then zeroed in the model, restored after the forwards.
  Extra memory: every removed value (half the pruned weights at 50 %) plus their indices.

Reports the wall time of the evaluation forwards of each (median of ``--repeat``), the extra bytes
each holds, that both give the same logits, and that the model is bit-exact after each.

    python benchmarks/bench_pruning.py --windows 4 --length 256 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from esa.experiment.prune import Level, pruned, score_masks, unpack  # noqa: E402
from esa.experiment.pruning import magnitude_score  # noqa: E402
from esa.experiment.quantization import quantizable  # noqa: E402
from esa.model.loading import load_model  # noqa: E402
from esa.model.targets import find_targets  # noqa: E402
from esa.model.weight_inputs import read_layouts  # noqa: E402
from tests.realmodels import embedded_dir  # noqa: E402


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def forwards(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(w[None]).logits for w in ids])


def timed(fn, repeat: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    model, _ = load_model(str(embedded_dir()), "cpu", "fp32")
    targets, _ = quantizable(model, read_layouts(model, find_targets(model)), False)
    by_name = {t.name: t for t in targets}
    t0 = time.perf_counter()
    masks = score_masks(targets, lambda n: magnitude_score(by_name[n]), "per_row", [Level.of("0.5")])["0.5"]
    mask_s = time.perf_counter() - t0
    ids = torch.randint(0, model.config.vocab_size, (a.windows, a.length), generator=torch.Generator().manual_seed(0))
    before = state_hash(model)
    plain_s, _ = timed(lambda: forwards(model, ids), a.repeat)

    def swap():
        with pruned(targets, masks):
            return forwards(model, ids)

    def in_place():
        saved = {}
        try:
            with torch.no_grad():
                for t in targets:
                    m = unpack(masks[t.name], t.shape)
                    saved[t.name] = (m.nonzero(as_tuple=True), t.param[m].clone())
                    t.param[m] = 0.0
            return forwards(model, ids)
        finally:
            with torch.no_grad():
                for t in targets:
                    if t.name in saved:
                        idx, values = saved[t.name]
                        t.param[idx] = values

    swap_s, swap_out = timed(swap, a.repeat)
    assert state_hash(model) == before
    place_s, place_out = timed(in_place, a.repeat)
    assert state_hash(model) == before
    removed = sum(int(unpack(m, by_name[n].shape).sum()) for n, m in masks.items())
    largest = max(t.numel for t in targets)
    report = {
        "model": "SmolLM2-135M (embedded), fp32, CPU", "windows": a.windows, "length": a.length,
        "pruned_weights": sum(t.numel for t in targets), "removed": removed, "mask_seconds": round(mask_s, 3),
        "plain_forward_s": round(plain_s, 3), "swap_forward_s": round(swap_s, 3),
        "in_place_forward_s": round(place_s, 3), "swap_overhead": round(swap_s / plain_s - 1, 4),
        "same_logits": bool(torch.equal(swap_out, place_out)),
        "swap_extra_bytes": sum(m.numel() for m in masks.values()) + 4 * largest,
        "in_place_extra_bytes": removed * (4 + 8 * 2),  # fp32 values + a 2-D int64 index each
    }
    print(json.dumps(report, indent=2))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
