"""The residual stream of a decoder: what each block writes (its output hidden state), observed and
written back with forward hooks, never copied.

Layer ``i`` is the ``i``-th decoder block in module order (:func:`esa.model.introspect.decoder_blocks`:
the model's never-split block classes, so every family, mixture-of-experts included, without a
module path).  A block returns its hidden state ``[B, L, H]`` alone or first in a tuple; that
tensor is the residual stream after the block (the last one is taken *before* the final norm).

:class:`ResidualPass` folds the hidden states of one pass over evaluation windows into O(layers x
windows) statistics plus at most one kept value per token and layer (the largest above a floor), and
reads the values at given :class:`Points`; :func:`observing` feeds it from hooks during whatever
forward passes run inside the block (they must be the windows in order: checked batch by batch).
:func:`writing` sets given points of the stream to given values during every forward over those
windows (the "restore the activation" intervention).  Hooks always remove themselves.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from esa.model import distributed
from esa.model.forward import is_dummy
from esa.model.introspect import decoder_blocks


def hidden_of(output) -> torch.Tensor:
    """A block's output hidden state ``[B, L, H]`` (blocks return it alone or first in a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks (layer order); a model without ``_no_split_modules`` blocks is a UsageError."""
    return decoder_blocks(model, "the residual stream (--evaluate activations)")


@dataclass(frozen=True)
class Points:
    """Points of the residual stream: parallel ``[N]`` int64 ``layer``, ``window`` (index into the
    evaluation windows), ``position`` (token), ``channel``, and float64 ``value``."""

    layer: torch.Tensor
    window: torch.Tensor
    position: torch.Tensor
    channel: torch.Tensor
    value: torch.Tensor

    @classmethod
    def of(cls, columns: dict) -> Points:
        """From JSON-able columns ``{"layer": [...], "window": [...], ...}`` (a record's ``entries``)."""
        ints = {k: torch.tensor(columns[k], dtype=torch.int64) for k in ("layer", "window", "position", "channel")}
        return cls(**ints, value=torch.tensor(columns["value"], dtype=torch.float64))

    def columns(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("layer", "window", "position", "channel", "value")}

    def __len__(self) -> int:
        return len(self.layer)

    def in_layer(self, layer: int) -> tuple[torch.Tensor, Points]:
        """The indices of this layer's points and those points."""
        idx = (self.layer == layer).nonzero()[:, 0]
        return idx, Points(*(getattr(self, k)[idx] for k in ("layer", "window", "position", "channel", "value")))


def concat(parts: list[Points]) -> Points:
    return Points(*(torch.cat([getattr(p, k) for p in parts]) for k in ("layer", "window", "position", "channel",
                                                                          "value")))


def _empty() -> Points:
    z = torch.zeros(0, dtype=torch.int64)
    return Points(z, z, z, z, torch.zeros(0, dtype=torch.float64))


class ResidualPass:
    """What one pass over ``n_windows`` evaluation windows writes into the residual stream of
    ``n_layers`` layers.

    Per (layer, window), ``[n_layers, n_windows]`` float64 / int64: ``max`` |h| of the window's
    ``[L, H]`` hidden state, its ``position``, ``channel`` and signed ``value``, and ``median`` |h|
    (exact, the lower median of the L x H values, as ``torch.median``).  Per layer, ``kept``: the
    points with |h| > ``floor``, at most ``cap`` (the largest; ``dropped`` counts the others).  At
    ``watch`` (points of another pass), ``watched``: this pass's values there (float64 ``[N]``).
    """

    def __init__(self, n_layers: int, n_windows: int, floor: float, cap: int, watch: Points | None = None) -> None:
        shape = (n_layers, n_windows)
        self.max = torch.zeros(shape, dtype=torch.float64)
        self.value = torch.zeros(shape, dtype=torch.float64)
        self.median = torch.zeros(shape, dtype=torch.float64)
        self.position = torch.zeros(shape, dtype=torch.int64)
        self.channel = torch.zeros(shape, dtype=torch.int64)
        self.seen = torch.zeros(shape, dtype=torch.int64)  # how often each (layer, window) was recorded
        self.floor, self.cap = floor, cap
        self.kept = [_empty() for _ in range(n_layers)]
        self.dropped = [0] * n_layers
        self.watch = watch
        self.watched = torch.zeros(len(watch) if watch is not None else 0, dtype=torch.float64)
        self._watch_by_layer = [watch.in_layer(i) if watch is not None else None for i in range(n_layers)]

    @torch.no_grad()
    def record(self, layer: int, rows: torch.Tensor, h: torch.Tensor) -> None:
        """Fold layer ``layer``'s hidden state ``h`` ``[B, L, H]`` of windows ``rows`` (int64 ``[B]``) in."""
        b, _, n_ch = h.shape
        h = h.detach()
        a = h.abs().reshape(b, -1)  # transient, one layer of one batch
        top, arg = a.max(dim=1)
        self.max[layer, rows] = top.double().cpu()
        self.value[layer, rows] = h.reshape(b, -1).gather(1, arg[:, None])[:, 0].double().cpu()
        self.position[layer, rows] = (arg // n_ch).cpu()
        self.channel[layer, rows] = (arg % n_ch).cpu()
        self.median[layer, rows] = lower_median(a)
        self.seen[layer, rows] += 1
        self._keep(layer, rows, h, a)
        if self.watch is not None:
            self._read(layer, rows, h)

    def _keep(self, layer: int, rows: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> None:
        flat = a.reshape(-1)
        idx = (flat > self.floor).nonzero()[:, 0]  # NaN is never over
        if not len(idx):
            return
        if len(idx) > self.cap:  # more than the cap (tokens in the pass): keep the largest, count the rest
            self.dropped[layer] += len(idx) - self.cap
            idx = idx[flat[idx].topk(self.cap).indices]
        per_window = a.shape[1]
        n_ch = h.shape[-1]
        row, rest = idx // per_window, idx % per_window
        found = Points(torch.full((len(idx),), layer, dtype=torch.int64), rows[row.cpu()], (rest // n_ch).cpu(),
                       (rest % n_ch).cpu(), h.reshape(-1)[idx].double().cpu())
        self.kept[layer] = self._capped(layer, concat([self.kept[layer], found]))

    def _capped(self, layer: int, pts: Points) -> Points:
        if len(pts) <= self.cap:
            return pts
        keep = pts.value.abs().topk(self.cap).indices.sort().values
        self.dropped[layer] += len(pts) - self.cap
        return Points(*(getattr(pts, k)[keep] for k in ("layer", "window", "position", "channel", "value")))

    def _read(self, layer: int, rows: torch.Tensor, h: torch.Tensor) -> None:
        idx, pts = self._watch_by_layer[layer]
        if not len(idx):
            return
        row_of = torch.full((int(self.max.shape[1]),), -1, dtype=torch.int64)
        row_of[rows] = torch.arange(len(rows))
        r = row_of[pts.window]
        hit = r >= 0
        if hit.any():
            dev = h.device
            got = h[r[hit].to(dev), pts.position[hit].to(dev), pts.channel[hit].to(dev)]
            self.watched[idx[hit]] = got.double().cpu()

    def merge(self) -> None:
        """Under torchrun, combine every rank's share of the windows (each (layer, window) was recorded
        by one rank; the arrays are zero elsewhere); a no-op in one process."""
        if not distributed.active():
            return
        distributed.all_reduce_host([self.max, self.value, self.median, self.position, self.channel, self.seen,
                                    self.watched])
        gathered = distributed.all_gather_object([(p.columns(), d) for p, d in zip(self.kept, self.dropped)])
        for layer in range(len(self.kept)):
            self.dropped[layer] = sum(g[layer][1] for g in gathered)
            self.kept[layer] = self._capped(layer, concat([Points.of(g[layer][0]) for g in gathered]))

    def complete(self) -> bool:
        """Whether every (layer, window) was recorded exactly once."""
        return bool((self.seen == 1).all())


def lower_median(a: torch.Tensor) -> torch.Tensor:
    """The lower median of each row of ``a`` ``[B, N]`` (``torch.median``'s: the ``(N - 1) // 2``-th
    smallest; NaN when the row holds a NaN), float64 ``[B]`` on the CPU.  On the CPU numpy's
    introselect finds it about ten times faster than ``torch.median`` (benchmarks/bench_activations.py);
    elsewhere ``torch.median`` runs on the device."""
    if a.device.type != "cpu":
        return a.median(dim=1).values.double().cpu()
    k = (a.shape[1] - 1) // 2
    out = torch.from_numpy(np.partition(a.float().numpy(), k, axis=1)[:, k]).double()
    return out.masked_fill(a.isnan().any(dim=1), math.nan)


def _ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if isinstance(ids, torch.Tensor) else None


@contextlib.contextmanager
def observing(model: torch.nn.Module, windows: torch.Tensor, start: int, sink: ResidualPass) -> Iterator[None]:
    """Record every block output of the forward passes run inside the block into ``sink``.

    The passes must be over ``windows`` ``[W, L]`` (this rank's share, whose first row is evaluation
    window ``start``) in order, in batches of any size: each batch is checked against the next rows
    (a forward over anything else is an error, never a silently wrong record).  A sharded model's
    dummy steps (:func:`esa.model.forward.dummy_step`) are not recorded.
    """
    blocks = blocks_of(model)
    state = {"next": 0, "rows": None}

    def before(_m, args, kwargs):
        ids = _ids(args, kwargs)
        if ids is not None and is_dummy(ids):
            state["rows"] = None
            return
        n = 0 if ids is None else ids.shape[0]
        i = state["next"]
        if ids is None or not torch.equal(ids.detach().cpu(), windows[i:i + n]):
            raise RuntimeError(f"observing the residual stream: forward pass {i} is not over the next evaluation "
                               "windows in order")
        state["next"], state["rows"] = i + n, torch.arange(start + i, start + i + n)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True)]
    try:
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_hook(
                lambda _m, _a, out, layer=layer: None if state["rows"] is None
                else sink.record(layer, state["rows"], hidden_of(out))))
        yield
    finally:
        for h in handles:
            h.remove()


class _WindowLookup:
    """Window index of a row of token ids, by content (-1: not an evaluation window)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.index: dict[bytes, int] = {}
        for i, row in enumerate(windows.numpy()):
            self.index.setdefault(row.tobytes(), i)  # identical windows have identical streams

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.index.get(r.tobytes(), -1) for r in ids.detach().cpu().numpy()], dtype=torch.int64)


@contextlib.contextmanager
def writing(model: torch.nn.Module, windows: torch.Tensor, points: Points) -> Iterator[dict]:
    """Set the residual stream to ``points.value`` at ``points`` (layer, window, position, channel) in
    every forward pass inside the block whose input rows are evaluation windows ``windows`` ``[W, L]``
    (found by content, in any batch and order); other rows are left alone.  Yields counts, updated
    as passes run: ``forwards`` (passes seen), ``rows_written`` and ``rows_other`` (rows that were
    not an evaluation window, hence unchanged)."""
    blocks = blocks_of(model)
    lookup = _WindowLookup(windows)
    by_layer = [points.in_layer(i)[1] for i in range(len(blocks))]
    state: dict = {"rows": None}
    counts = {"forwards": 0, "rows_written": 0, "rows_other": 0}

    def before(_m, args, kwargs):
        ids = _ids(args, kwargs)
        state["rows"] = None if ids is None or is_dummy(ids) else lookup.rows(ids)
        counts["forwards"] += 1
        if state["rows"] is not None:
            counts["rows_written"] += int((state["rows"] >= 0).sum())
            counts["rows_other"] += int((state["rows"] < 0).sum())

    def write(layer: int, out) -> None:
        pts, rows = by_layer[layer], state["rows"]
        if rows is None or not len(pts):
            return
        h = hidden_of(out)
        for b, w in enumerate(rows.tolist()):  # row by row: a batch may hold the same window twice
            hit = pts.window == w
            if w >= 0 and hit.any():
                dev = h.device
                h[b, pts.position[hit].to(dev), pts.channel[hit].to(dev)] = pts.value[hit].to(dev, h.dtype)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True)]
    try:
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_hook(lambda _m, _a, out, layer=layer: write(layer, out)))
        yield counts
    finally:
        for h in handles:
            h.remove()
