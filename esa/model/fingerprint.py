"""Fingerprints that tell whether a resumed run sees the same model and the same data.

``weights_fingerprint``: SHA-256 over every parameter's name, shape and dtype and two 64-bit
checksums of its stored bits (the plain sum and a position-weighted sum of the integer view,
computed in chunks on the parameter's own device), so a change of any single weight changes it,
at the cost of one read of the weights.  ``data_fingerprint``: SHA-256 of the token ids of the
evaluation windows and of the calibration pool (which depend on the text file, the tokenizer and
the window length) and of the data source; ``file_fingerprint``: SHA-256 of a --data-file's bytes
(text after the windows in use changes it too).
"""

from __future__ import annotations

import hashlib

import torch

from esa.model import distributed

INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CHUNK = 1 << 24


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Under ``--shard fsdp`` each rank sums its own rows at their positions in the whole weight and the
    sums are added over the ranks (modulo 2^64), so the fingerprint is the one a single process computes."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        if p.device.type == "meta":  # offloaded by accelerate: nothing resident to read
            h.update(b"meta")
            continue
        flat = distributed.local(p).detach().reshape(-1)
        first = distributed.first_row(p) * (p.numel() // p.shape[0]) if p.dim() else 0
        ints = flat.view(INT_VIEW[flat.element_size()]) if flat.is_floating_point() else flat
        total = weighted = 0
        for start in range(0, ints.numel(), CHUNK):
            c = ints[start:start + CHUNK].to(torch.int64)
            at = first + start
            pos = torch.arange(at, at + c.numel(), device=c.device, dtype=torch.int64) % 65521 + 1
            total += int(c.sum())
            weighted += int((c * pos).sum())
        if distributed.sharded(p):  # each rank's sum as a signed int64 (minus 2^63), added with wrap-around
            shift = distributed.world_size() * 2**63
            total, weighted = (v + shift for v in distributed.all_reduce_ints([total % 2**64 - 2**63,
                                                                                weighted % 2**64 - 2**63]))
        h.update(f"{total % 2**64}|{weighted % 2**64}".encode())
    return h.hexdigest()


def data_fingerprint(eval_windows: torch.Tensor, calib_pool: torch.Tensor, source: str) -> str:
    h = hashlib.sha256(source.encode())
    for t in (eval_windows, calib_pool):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def file_fingerprint(path: str) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()
