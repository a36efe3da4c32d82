"""Round-to-nearest (RTN) weight quantization that never changes the stored model.

**Quantizer** (:func:`rtn_blocks`): asymmetric min-max with an integer zero point, per block of
weights, computed in fp32::

    lo = min(min(block), 0), hi = max(max(block), 0)      # 0 always in range, as in GPTQ
    scale = (hi - lo) / (2^bits - 1)                       # 1 for an all-zero block
    zero = round(-lo / scale)                              # in [0, 2^bits - 1]
    q = clamp(round(w / scale) + zero, 0, 2^bits - 1)
    w_q = (q - zero) * scale                               # then cast to the model dtype

``round`` is torch's: half to even (2.5 -> 2, 3.5 -> 4).  **Protected** weights are left out of the
block's min/max (so the scale shrinks when they are the outliers) and keep their exact original
value.  ``clip_z``: before the scale, the range is clipped to mean ± z·std of the block's
unprotected weights (population std); weights beyond it saturate at the clamp.

**Blocks** (:func:`block_rows`): ``"channel"`` = one block per output row (the row of
:mod:`esa.experiment.rows`: a Linear ``[out, in]`` row, a Conv1D ``[in, out]`` column, one
(expert, output) of fused experts); ``"tensor"`` = the whole tensor; an integer B = B contiguous
weights of the flattened (row-major, as stored) tensor, as in Yu et al. 2024, the last block
holding the remainder.

**Applying it** (:func:`quantized`): each target's dequantized weight is made in the model's dtype
just before a module that reads it runs and swapped in for that forward only
(:mod:`esa.experiment.swap`).  The stored tensors are never written, so the model is bit-exactly
itself after every condition, and memory beyond the model is one tensor's quantized copy at a time
(never a copy of the whole model).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from esa.experiment.rows import as_rows, from_rows
from esa.experiment.swap import swapped
from esa.model import distributed
from esa.model.targets import Target

CHUNK = 1 << 22  # weights quantized at once (bounds the fp32 temporaries)


@dataclass(frozen=True)
class RTN:
    """``bits`` in 2..8; ``block``: "channel", "tensor" or a positive count of contiguous weights."""

    bits: int
    block: str | int
    clip_z: float | None = None


def rtn_blocks(x: torch.Tensor, bits: int, protect: torch.Tensor | None = None, clip_z: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize-dequantize ``x`` ``[blocks, B]`` (any float dtype) row by row; returns ``(w_q, scale,
    zero)``: ``w_q`` fp32 ``[blocks, B]`` (protected entries: their original value), ``scale`` and
    ``zero`` fp32 ``[blocks]``.  ``protect``: bool ``[blocks, B]`` or None."""
    x = x.float()
    qmax = 2 ** bits - 1
    free = torch.ones_like(x, dtype=torch.bool) if protect is None else ~protect
    lo = torch.where(free, x, torch.inf).amin(dim=1)
    hi = torch.where(free, x, -torch.inf).amax(dim=1)
    if clip_z is not None:
        n = free.sum(dim=1).clamp_min(1)
        mean = torch.where(free, x, 0.0).sum(dim=1) / n
        std = (torch.where(free, x - mean[:, None], 0.0).square().sum(dim=1) / n).sqrt()
        lo, hi = torch.maximum(lo, mean - clip_z * std), torch.minimum(hi, mean + clip_z * std)
    lo = lo.clamp(max=0.0).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # a fully protected block: nothing to fit
    hi = hi.clamp(min=0.0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, qmax)
    w_q = (q - zero[:, None]) * scale[:, None]
    if protect is not None:
        w_q = torch.where(protect, x, w_q)
    return w_q, scale, zero


def whole(t: Target) -> torch.Tensor:
    """``t``'s whole weight, detached (under ``--shard fsdp`` gathered from the ranks: one tensor at a time)."""
    return t.param.full_tensor().detach() if distributed.sharded(t.param) else t.param.detach()


def block_rows(t: Target, block: str | int, w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t``'s whole weight ``w`` as ``[blocks, B]`` for the whole-row layouts (channel, tensor), or its
    flat view with the block size for a count layout (the last block may be shorter)."""
    if block == "channel":
        return as_rows(w, t.axis("in")), 0
    if block == "tensor":
        return w.reshape(1, -1), 0
    return w.reshape(-1), int(block)


def _rtn_rows(rows: torch.Tensor, mask: torch.Tensor | None, spec: RTN) -> torch.Tensor:
    """``rows`` ``[blocks, B]`` quantized in chunks of whole blocks; fp32."""
    per = max(1, CHUNK // max(1, rows.shape[1]))
    parts = [rtn_blocks(rows[i:i + per], spec.bits, None if mask is None else mask[i:i + per], spec.clip_z)[0]
             for i in range(0, rows.shape[0], per)]
    return torch.cat(parts)


def quantize_tensor(t: Target, spec: RTN, protect: torch.Tensor | None = None, w: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The dequantized weight of ``t`` (or of ``w``, its whole weight as a forward reads it) in its own
    shape (fp32); ``protect``: flat indices kept exact."""
    w = whole(t) if w is None else w.detach()
    mask = None
    if protect is not None and len(protect):
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[protect.to(w.device)] = True
        mask = mask.reshape(w.shape)
    rows, size = block_rows(t, spec.block, w)
    if size == 0:  # channel or tensor: rows are the blocks
        row_mask = None if mask is None else (as_rows(mask, t.axis("in")) if spec.block == "channel"
                                              else mask.reshape(1, -1))
        out = _rtn_rows(rows, row_mask, spec)
        return from_rows(out, t.shape, t.axis("in")) if spec.block == "channel" else out.reshape(t.shape)
    flat_mask = None if mask is None else mask.reshape(-1)
    full = (rows.numel() // size) * size
    parts = []
    if full:
        parts.append(_rtn_rows(rows[:full].reshape(-1, size), None if flat_mask is None
                               else flat_mask[:full].reshape(-1, size), spec).reshape(-1))
    if full < rows.numel():
        parts.append(_rtn_rows(rows[full:].reshape(1, -1), None if flat_mask is None
                               else flat_mask[full:].reshape(1, -1), spec).reshape(-1))
    return torch.cat(parts).reshape(t.shape)


def quantization_error(targets: list[Target], spec: RTN, protect: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Mean squared error (float64 sum) between each unprotected weight and its dequantized value in
    the model's dtype, over all ``targets``, and the number of such weights."""
    total, count = 0.0, 0
    for t in targets:
        idx = protect.get(t.name)
        w = whole(t)
        err = (quantize_tensor(t, spec, idx, w).to(w.dtype).float() - w.float()).square().reshape(-1)
        if idx is not None and len(idx):
            err[idx.to(err.device)] = 0.0
        total += float(err.sum(dtype=torch.float64))
        count += w.numel() - (0 if idx is None else len(idx))
    return (total / count if count else 0.0), count


def quantized(targets: list[Target], spec: RTN, protect: dict[str, torch.Tensor] | None = None
              ) -> AbstractContextManager[None]:
    """Inside the block every forward reads each target's RTN-quantized weight (model dtype); the
    stored weights are never written (:func:`esa.experiment.swap.swapped`)."""
    protect = protect or {}
    return swapped(targets, lambda t, w: quantize_tensor(t, spec, protect.get(t.name), w))
