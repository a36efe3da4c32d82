"""fp32 gradient accumulators folded in by post-accumulate-grad hooks (the shared gradient sums
of :mod:`esa.metrics.passes` and the curvature metrics' own passes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from esa.metrics.registry import Scores
from esa.model import distributed

if TYPE_CHECKING:
    from esa.model.targets import Target


@contextlib.contextmanager
def grad_accumulators(targets: list[Target], square: bool = False) -> Iterator[Scores]:
    """Enable grads on targets and fold each backward's gradient (``square``: its square) into an
    fp32 accumulator.

    A post-accumulate-grad hook folds ``grad.float()`` into the accumulator and frees ``param.grad``
    at once, so no model-dtype gradient outlives its backward pass.  The first backward's gradient
    *becomes* the accumulator (squared in place), later ones are added by one fused pass
    (``add_`` / ``addcmul_``): no zero-filled buffer, no temporary, which keeps scoring within a few
    percent of a plain backward.  In-place work on the gradient is safe: once ``param.grad`` is
    cleared nothing else references it.  For a tied weight autograd sums all uses before the hook
    fires, so the hook sees the full gradient.  A target that no backward reached gets a zero
    accumulator; the dict is in target order when the block ends.
    """
    acc: Scores = {}
    handles = []

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            if distributed.sharded(p.grad):
                # --shard fsdp: this rank's rows, already summed over the ranks by FSDP's reduce-scatter.
                # Copied: the local gradient is a view into FSDP's flat reduce buffer, which must not be kept.
                g = p.grad.to_local().float().clone()
            else:
                g = p.grad.float().contiguous()  # fp32 and contiguous: p.grad itself, else a fresh copy
            p.grad = None
            if name not in acc:
                acc[name] = g.square_() if square else g
            elif square:
                acc[name].addcmul_(g, g)
            else:
                acc[name].add_(g)
        return hook

    try:
        for t in targets:
            t.param.requires_grad_(True)
            handles.append(t.param.register_post_accumulate_grad_hook(make_hook(t.name)))
        yield acc
        # back in target order (hooks fire in backward order), zeros for a target no backward reached
        filled = dict(acc)
        acc.clear()
        for t in targets:
            acc[t.name] = filled.pop(t.name, None)
            if acc[t.name] is None:
                acc[t.name] = torch.zeros(t.local().shape, dtype=torch.float32, device=t.param.device)
    finally:
        for h in handles:
            h.remove()
        for t in targets:
            t.param.requires_grad_(False)
            t.param.grad = None
