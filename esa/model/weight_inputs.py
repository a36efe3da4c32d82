"""What reaches a weight that no module hook can see: inputs of functional calls on (slices of) it.

A fused mixture-of-experts tensor ``W [expert, out, in]`` is read inside its module's forward as
``F.linear(x_e, W[e])``, where ``x_e`` are the tokens routed to expert ``e`` (and, for
``down_proj``, the intermediate activations computed in the same forward).  A router weight is read
as ``F.linear(x, W)``; an ``nn.Embedding`` subclass with its own forward (OPT's learned positions)
looks up indices that are not its module input.  :class:`WeightInputs` is a ``TorchFunctionMode``
active only inside the forward of the modules that own such weights; it watches
``Tensor.__getitem__`` on them (to learn which expert a slice is) and ``F.linear`` / ``matmul`` /
``F.embedding`` calls whose weight is one of them or such a slice, and accumulates, per expert and
input feature, the sum over tokens of ``x_j^2`` (fp32; token counts for embeddings).

:func:`eager_experts` runs transformers' experts modules with their plain per-expert loop (the
grouped-matmul kernels read all experts at once and expose no per-expert input).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from esa.model.introspect import input_device, using_implementation
from esa.model.targets import Target

_MATMULS = {F.linear: 1, torch.matmul: 0, torch.Tensor.matmul: 0, torch.Tensor.__matmul__: 0}  # in-axis of W


class UnobservedWeightError(RuntimeError):
    """A watched weight was read in a way whose input features cannot be attributed."""


def eager_experts(model: torch.nn.Module):
    """Run transformers' fused-experts modules with the eager per-expert loop inside the block."""
    return using_implementation(model, "experts", "eager")


def input_shape(t: Target) -> tuple[int, ...]:
    """Shape of the per-input-feature sums of ``t``: ``[expert, in]`` or ``[in]``."""
    return tuple(t.shape[t.axis(role)] for role in ("expert", "in") if t.axis(role) is not None)


def broadcast_to_weight(t: Target, v: torch.Tensor) -> torch.Tensor:
    """``v`` of :func:`input_shape` viewed so that it broadcasts against the weight (1 on other axes);
    ``expert`` precedes ``in`` in every layout, so the order of ``v``'s dims already matches."""
    return v.reshape([n if role in ("expert", "in") else 1 for n, role in zip(t.shape, t.layout)])


class WeightInputs(TorchFunctionMode):
    """Accumulates ``sums[name]`` (fp32): ``[in]`` for a 2-D weight, ``[expert, in]`` for a 3-D one,
    ``[vocab]`` token counts for an embedding, from the calls that read the watched targets.

    ``batch_shape``: the ``[B, L]`` of the forward in progress (an index tensor broadcast over the
    batch, such as ``[1, L]`` position ids, counts once per token of the batch).
    """

    def __init__(self, targets: list[Target], probe: bool = False) -> None:
        super().__init__()
        self.probe = probe  # record the axis each read takes its input features from, check and sum nothing
        self.read_axes: dict[str, int] = {}
        self.targets = {id(t.param): t for t in targets}
        # under --shard fsdp a module's attribute holds a gathered tensor (a new object) during its forward,
        # so the weights are looked up again as each owner's forward starts (rebind)
        self.owned = {id(u.module): [] for t in targets for u in t.uses}
        for t in targets:
            for u in t.uses:
                self.owned[id(u.module)].append((u.attr, t))
        self.bound: dict[tuple[int, str], int] = {}
        self.sums = {t.name: torch.zeros(input_shape(t), dtype=torch.float32, device=t.param.device) for t in targets}
        self.observed: set[str] = set()
        self.slices: dict[int, tuple[Target, int, torch.Tensor]] = {}  # id(slice) -> (target, expert, slice)
        self.batch_shape: torch.Size | None = None

    def rebind(self, module: torch.nn.Module) -> None:
        """Watch the objects ``module``'s attributes hold now (the weights its forward reads)."""
        for attr, t in self.owned.get(id(module), []):
            now = getattr(module, attr, None)
            if now is None or self.bound.get((id(module), attr)) == id(now):
                continue
            self.targets.pop(self.bound.get((id(module), attr)), None)
            self.targets[id(now)] = t
            self.bound[(id(module), attr)] = id(now)

    def _watched(self, w) -> tuple[Target, int | None] | None:
        t = self.targets.get(id(w))
        if t is not None:
            return t, None
        hit = self.slices.get(id(w))
        return (hit[0], hit[1]) if hit is not None and hit[2] is w else None

    def _add(self, t: Target, expert: int | None, v: torch.Tensor) -> None:
        self.observed.add(t.name)
        (self.sums[t.name][expert] if expert is not None else self.sums[t.name]).add_(v.to(t.param.device))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.targets and self.targets[id(args[0])].axis(
                "expert") == 0 and isinstance(out, torch.Tensor) and out.dim() == args[0].dim() - 1:
            t = self.targets[id(args[0])]
            expert = (out.storage_offset() - args[0].storage_offset()) // args[0].stride(0)
            self.slices[id(out)] = (t, int(expert), out)
        elif func in _MATMULS and len(args) >= 2:
            hit = self._watched(args[1])
            if hit is not None and self.probe:  # x @ W: W is [in, out]; F.linear(x, W): W is [out, in]
                self.read_axes[hit[0].name] = (0 if _MATMULS[func] == 0 else 1) + (hit[1] is not None)
            elif hit is not None:
                x = args[0].detach().float()
                self._check_axis(hit, 0 if _MATMULS[func] == 0 else 1)
                self._add(*hit, x.square().reshape(-1, x.shape[-1]).sum(0))
        elif func is F.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self._watched(weight)
            if hit is not None and self.probe:
                self.read_axes[hit[0].name] = 0
            elif hit is not None:
                ids = args[0]
                if self.batch_shape is not None and ids.shape != self.batch_shape:
                    with contextlib.suppress(RuntimeError):
                        ids = ids.expand(self.batch_shape)
                self._add(*hit, torch.bincount(ids.reshape(-1).long(), minlength=weight.shape[0]).float())
        return out

    @staticmethod
    def _check_axis(hit: tuple[Target, int | None], slice_in_axis: int) -> None:
        t, expert = hit
        axis = slice_in_axis + (1 if expert is not None else 0)
        if t.axis("in") != axis:
            raise UnobservedWeightError(f"{t.name} is read with its input features on axis {axis}, but its layout "
                                        f"{t.layout} says {t.axis('in')}")


@contextlib.contextmanager
def watching(model: torch.nn.Module, targets: list[Target], modules: list[torch.nn.Module] | None = None,
             probe: bool = False) -> Iterator[WeightInputs]:
    """Activate a :class:`WeightInputs` inside the forward of ``modules`` (default: every module owning
    one of ``targets``; a tied weight's other uses, seen by ordinary hooks, are left out by passing
    only the owners to watch); forward pre-hook enters, forward hook leaves; all undone on exit."""
    mode = WeightInputs(targets, probe)
    owners = {id(m): m for m in (modules if modules is not None else [u.module for t in targets for u in t.uses])}
    depth = [0]
    handles = []

    def enter(m, _args):
        mode.rebind(m)
        if depth[0] == 0:
            mode.__enter__()
        depth[0] += 1

    def leave(_m, _args, _out):
        depth[0] -= 1
        if depth[0] == 0:
            mode.__exit__(None, None, None)
            mode.slices.clear()

    try:
        for module in owners.values():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        with eager_experts(model):
            yield mode
    finally:
        for h in handles:
            h.remove()
        while depth[0] > 0:  # a forward that raised left the mode active
            depth[0] -= 1
            if depth[0] == 0:
                mode.__exit__(None, None, None)


PROBE_TOKENS = 16


@torch.no_grad()
def read_layouts(model: torch.nn.Module, targets: list[Target]) -> list[Target]:
    """``targets`` with the layout of every weight read inside its owner's forward (fused experts,
    routers, any 2-D or 3-D parameter that is not a Linear/Conv1D/Embedding weight) taken from how one
    short forward really reads it, before any scoring:

    * read by ``F.linear``/``matmul``/``F.embedding`` (whole, or per expert slice): its input-feature
      axis is the one the call contracts (``x @ W[e]`` reads ``[expert, in, out]``, ``F.linear(x, W[e])``
      ``[expert, out, in]``), whatever the module's attributes claim;
    * never read that way (a stacked per-expert bias ``[experts, out]`` is added, not multiplied):
      no input-feature axis, so a metric that needs one (act_mag, obs) says so before scoring and the
      weight is excluded with that reason, instead of failing mid-run.

    The forward runs ``PROBE_TOKENS`` token ids ``0, 1, ...`` (enough for a router to reach at least
    one expert of every layer); weights already laid out by their module are returned unchanged.
    """
    read = [t for t in targets if t.param.ndim >= 2 and any(u.kind == "parameter" for u in t.uses)]
    probed = {id(t.param) for t in read}
    if not read:
        return targets
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or PROBE_TOKENS
    ids = (torch.arange(PROBE_TOKENS) % vocab)[None].to(input_device(model))
    with watching(model, read, probe=True) as mode:
        model(input_ids=ids, use_cache=False)
    out = []
    for t in targets:
        if id(t.param) in probed:
            axis = mode.read_axes.get(t.name)
            t = dataclasses.replace(t, layout=_layout(t, axis), uses=tuple(
                dataclasses.replace(u, in_axis=axis) if u.kind == "parameter" else u for u in t.uses))
        out.append(t)
    return out


def _layout(t: Target, in_axis: int | None) -> tuple[str, ...]:
    """Roles of ``t``'s axes given the axis its input features lie on (None: not read as a linear map;
    a 2-D weight beside 3-D fused experts of as many experts is then a per-expert stack ``[expert, out]``)."""
    owner_stacks = any(p.ndim == 3 and p.shape[0] == t.shape[0] for u in t.uses
                       for p in u.module.parameters(recurse=False))
    expert = ("expert",) if t.param.ndim == 3 or (in_axis is None and t.param.ndim == 2 and owner_stacks) else ()
    if in_axis is None:
        return (*expert, "out") if t.param.ndim == 1 + len(expert) else ()
    rest = ["out"] * (t.param.ndim - len(expert))
    rest[in_axis - len(expert)] = "in"
    return (*expert, *rest)
