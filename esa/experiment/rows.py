"""``per_row`` selection (Wanda's comparison group): the k extreme scores in each output row.

A row is one output feature of a tensor: every weight that shares all coordinates but the input
one (the axis holding input features, from the target layout; see :mod:`esa.model.targets`).  So a
Linear ``[out, in]`` has ``out`` rows of ``in`` weights, an HF Conv1D ``[in, out]`` the same rows read
down its columns, a fused expert tensor one row per (expert, output).  A tensor without an input
axis (a 1-D norm scale or bias under ``--targets all``) is one row.

Rows are handled as a ``[rows, n_in]`` view (a copy when the input axis is not last), ranked in
chunks of rows by a stable sort: ties go to the lower input index, which is also the lower flat
index, as in the other modes.  Memory beyond the scores: one chunk of sorted values (≤ 2^24
entries) and the selected ``[rows, k]`` indices.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 24  # entries sorted at once


def _perm(ndim: int, in_axis: int | None) -> list[int]:
    """Axis order with the input axis last (unchanged when it already is, or there is none)."""
    if in_axis is None:
        return list(range(ndim))
    return [a for a in range(ndim) if a != in_axis] + [in_axis]


def row_length(shape: tuple[int, ...], in_axis: int | None) -> int:
    """Weights per row: the input-feature count, or the whole tensor when it has no input axis."""
    if in_axis is None:
        return int(torch.Size(shape).numel())
    return shape[in_axis]


def as_rows(x: torch.Tensor, in_axis: int | None) -> torch.Tensor:
    """``x`` as ``[rows, n_in]`` (input features last)."""
    return x.permute(_perm(x.ndim, in_axis)).reshape(-1, row_length(tuple(x.shape), in_axis))


def flat_indices(shape: tuple[int, ...], in_axis: int | None, cols: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) indices in the original tensor of ``cols`` ``[rows, k]`` (input-feature
    positions of each row, rows in :func:`as_rows` order)."""
    n_in = row_length(shape, in_axis)
    if in_axis is None or in_axis == len(shape) - 1:
        return (torch.arange(cols.shape[0], dtype=torch.int64)[:, None] * n_in + cols).reshape(-1)
    strides = torch.tensor([int(torch.Size(shape[a + 1:]).numel()) for a in range(len(shape))], dtype=torch.int64)
    perm = _perm(len(shape), in_axis)
    other = perm[:-1]
    rows = torch.arange(cols.shape[0], dtype=torch.int64)
    offset = torch.zeros_like(rows)
    for a in reversed(other):  # unravel the row number over the non-input axes (last varies fastest)
        offset += (rows % shape[a]) * strides[a]
        rows = rows // shape[a]
    return (offset[:, None] + cols * strides[in_axis]).reshape(-1)


def row_extreme_k(x: torch.Tensor, in_axis: int | None, k: int, largest: bool = True) -> torch.Tensor:
    """``[rows, k]`` input-feature positions of each row's k largest (smallest) values of ``x``, in rank
    order (ties: lower position first); on the CPU, int64."""
    rows = as_rows(x, in_axis)
    per_chunk = max(1, CHUNK // max(1, rows.shape[1]))
    out = []
    for chunk in rows.split(per_chunk):
        order = torch.sort(chunk, dim=1, descending=largest, stable=True).indices
        out.append(order[:, :k].cpu())
    return torch.cat(out)


def from_rows(rows: torch.Tensor, shape: tuple[int, ...], in_axis: int | None) -> torch.Tensor:
    """Inverse of :func:`as_rows`: ``[rows, n_in]`` back to ``shape`` (a copy when the input axis is
    not last)."""
    perm = _perm(len(shape), in_axis)
    permuted = rows.reshape([shape[a] for a in perm])
    inverse = [perm.index(a) for a in range(len(shape))]
    return permuted.permute(inverse)
