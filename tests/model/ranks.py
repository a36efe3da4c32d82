"""A worker for ``mp.spawn`` that imports nothing heavy (each rank re-imports its module): rank 0's
work reaching every rank through :func:`esa.model.distributed.from_main`."""

from __future__ import annotations

import torch
import torch.distributed as tdist

from esa.errors import UsageError
from esa.model import distributed


def main_only_worker(rank: int, store: str, dest: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    out: dict = {}
    try:
        def work():
            if rank != 0:
                raise AssertionError("only rank 0 computes")
            return {"acc": 0.25, "rank": rank}
        out["value"] = distributed.from_main(work)

        def bad_input():
            raise UsageError("--tasks-dir lacks piqa")
        try:
            distributed.from_main(bad_input)
        except UsageError as exc:
            out["usage"] = str(exc)

        def crash():
            raise KeyError("boom")
        try:
            distributed.from_main(crash)
        except (KeyError, RuntimeError) as exc:
            out["crash"] = type(exc).__name__
        out["after"] = distributed.all_reduce_floats([1.0])  # the default group still works
    finally:
        tdist.destroy_process_group()
    torch.save(out, f"{dest}.{rank}")
