"""Data parallelism over torch.distributed, for ``torchrun --nproc_per_node N esa_runner.py ...``.

Every rank holds the whole model (use ``--device-map auto`` instead when one device cannot) and
the same token windows.  Each rank scores a contiguous share of the calibration windows and
evaluates a contiguous share of the evaluation windows; the fp32 score accumulators and the NLL
sums are all-reduced (summed), so every rank ends with the scores and perplexities one process
would compute, up to float summation order.  Selection is then computed on every rank from the
identical reduced scores (and checked to agree); only rank 0 writes files and prints.

Work that cannot be split (an lm-evaluation-harness run on an in-memory model) runs on rank 0
alone, and its result is broadcast to every rank (:func:`from_main`), so that every rank holds the
same records and takes the same path afterwards.

Backend: nccl for CUDA (one GPU per rank, ``cuda:$LOCAL_RANK``), gloo on CPU.  Without torchrun
(no ``WORLD_SIZE`` > 1 in the environment) every function here is the single-process identity.

Every collective waits at most ``$ESA_DIST_TIMEOUT_S`` seconds (default 600) for the other ranks, so a
rank that stops making the same calls as the others (a crash, a mismatched loop) ends the run with an
error instead of torch's default 30-minute hang.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as tdist

from esa.errors import UsageError

TIMEOUT_ENV = "ESA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600
T = TypeVar("T")
# How long the other ranks wait for rank 0's work in from_main (an lm-eval run of a large model on
# large tasks can take an hour per condition).  Waiting happens on a gloo group of its own, so neither
# the run's collective timeout ($ESA_DIST_TIMEOUT_S) nor the nccl watchdog fires meanwhile.
MAIN_ONLY_TIMEOUT = datetime.timedelta(hours=12)


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun) started, from ``WORLD_SIZE``: the one place
    that reads it, valid before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def requested() -> bool:
    """True when launched by torchrun (or any launcher) with more than one process."""
    return launched_world_size() > 1


def launched() -> bool:
    """True when started by torchrun (``RANK`` and ``WORLD_SIZE`` in the environment), with one
    process or several; plain ``python`` sets neither."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """The device of this rank: ``cuda:$LOCAL_RANK`` for cuda under torchrun, else ``device``."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: ``$ESA_DIST_TIMEOUT_S`` seconds (default 600)."""
    value = os.environ.get(TIMEOUT_ENV, "").strip() or str(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds (e.g. 600)")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def joined(device: str) -> Iterator[None]:
    """Be a member of the process group torchrun describes (nccl on ``cuda:N``, gloo on cpu) for the
    block, with :func:`collective_timeout`; one process counts too.  A group that already exists
    (created by the caller) is used as it is and left alone."""
    if tdist.is_initialized():
        yield
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    tdist.init_process_group(backend=backend, timeout=collective_timeout())
    try:
        yield
    finally:
        tdist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the process group torchrun describes when it started several processes, and leave it after."""
    if not requested():
        yield
        return
    with joined(device):
        yield


def shard_bounds(n: int) -> tuple[int, int]:
    """``[start, end)`` of this rank's contiguous share of ``n`` items (sizes differ by at most 1)."""
    r, w = rank(), world_size()
    return n * r // w, n * (r + 1) // w


def shard(windows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's share of ``windows`` ``[W, L]`` and the global index of its first row."""
    start, end = shard_bounds(len(windows))
    return windows[start:end], start


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over ranks in place (every rank gets the sum); no-op in one process."""
    if not active():
        return
    for t in tensors:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)


def all_reduce_host(tensors: Iterable[torch.Tensor]) -> None:
    """Sum CPU tensors over ranks in place, through the backend's device (nccl reduces CUDA tensors
    only); no-op in one process."""
    if not active():
        return
    dev = _comm_device()
    for t in tensors:
        x = t.to(dev)
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        t.copy_(x.cpu())


def all_reduce_floats(values: list[float]) -> list[float]:
    """Sum Python floats over ranks in float64 (NLL sums and token counts)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_ints(values: list[int]) -> list[int]:
    """Sum int64 values over ranks (two's-complement wrap-around, as torch's own int64 sums)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process.  For O(k) payloads
    only (selection candidates, small records), never for per-weight data."""
    if not active():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer, so all raise or none does)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def sharded(obj) -> bool:
    """Whether ``obj`` (a model or a parameter) is sharded over the ranks by FSDP2 (``--shard fsdp``):
    every rank then holds only its rows of each weight (:mod:`esa.model.fsdp`).  Code that would
    all-reduce gradients (FSDP already summed them) or assume whole tensors asks here."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return isinstance(obj, (FSDPModule, DTensor))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local rows of a sharded parameter or gradient (writes reach the
    shard), ``t`` itself otherwise."""
    return t.to_local() if sharded(t) else t


def row_range(t: torch.Tensor) -> tuple[int, int]:
    """``(start_row, n_rows)``: the rows ``[start_row, start_row + n_rows)`` of dim 0 this rank holds of
    ``t``: all of them unless FSDP2 sharded it, which splits dim 0 as ``torch.chunk`` does (ceil(N / W)
    rows per rank, the last ranks fewer or none)."""
    if t.dim() == 0:
        raise ValueError("a 0-dim tensor has no rows")
    n = t.shape[0]
    if not sharded(t):
        return 0, n
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"expected a DTensor sharded on dim 0, got placements {t.placements}")
    chunk = -(-n // t.device_mesh.size())
    start = min(t.device_mesh.get_local_rank() * chunk, n)
    return start, min(chunk, n - start)


def first_row(t: torch.Tensor) -> int:
    """The global index (dim 0) of this rank's first local row of ``t`` (0 unless sharded)."""
    return row_range(t)[0] if sharded(t) else 0


def steps(n_windows: int, batch_size: int) -> int:
    """Forward calls every rank makes over its share of ``n_windows`` in batches of ``batch_size``:
    the largest share's count.  A sharded model all-gathers weights inside every forward, so every
    rank must make the same number of calls (a rank with fewer real batches runs dummy ones)."""
    most = -(-n_windows // world_size())
    return -(-most // batch_size)


def barrier() -> None:
    if active():
        tdist.barrier()


def check_same(label: str, payload: bytes) -> None:
    """Raise on every rank unless all ranks hold the same ``payload`` (e.g. the Top-K they chose).

    Selections are computed on every rank from identical all-reduced scores, so they must agree;
    a mismatch would mean ranks perturb different weights and the perplexities mix conditions.
    """
    if not active():
        return
    digest = int.from_bytes(hashlib.sha256(payload).digest()[:7], "little")
    t = torch.tensor([digest, -digest], dtype=torch.int64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    if int(t[0]) != digest or int(-t[1]) != digest:
        raise RuntimeError(f"ranks disagree on {label}; refusing to mix different selections")


def _comm_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 alone; every rank returns its (picklable) result.

    The other ranks wait in a broadcast on a temporary gloo group (timeout
    :data:`MAIN_ONLY_TIMEOUT`) while rank 0 works.  An exception on rank 0 reaches every rank: a
    :class:`UsageError` as the same one-line error (exit 2 everywhere), anything else as a
    RuntimeError naming it, so no rank is left waiting.  Every rank must call this at the same point.
    """
    if not active():
        return compute()
    group = tdist.new_group(backend="gloo", timeout=MAIN_ONLY_TIMEOUT)
    try:
        box: list = [None]
        if is_main():
            try:
                box[0] = ("ok", compute())
            except BaseException as exc:
                tdist.broadcast_object_list([("error", type(exc).__name__, str(exc),
                                              isinstance(exc, UsageError))], src=0, group=group)
                raise
        tdist.broadcast_object_list(box, src=0, group=group)
    finally:
        tdist.destroy_process_group(group)
    if box[0][0] == "error":
        _, kind, message, usage = box[0]
        raise UsageError(message) if usage else RuntimeError(f"rank 0 failed: {kind}: {message}")
    return box[0][1]
