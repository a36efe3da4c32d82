"""Gradient metrics of the mean token loss ``L = (1/N) sum NLL`` over the N predicted tokens of the
W calibration windows (fp32 accumulators whatever the model dtype).

* ``grad_x_weight``: ``|w * g|`` with ``g = dL/dw``: first-order Taylor estimate of the loss change
  when w is removed.  One forward+backward per batch.
* ``grad_squared``: empirical Fisher diagonal ``(1/W) sum_windows (d/dw mean-NLL(window))^2``;
  granularity is one window (squared per window, then averaged), so each window gets its own
  backward pass (``--batch-size`` does not batch this metric).

:func:`grad_accumulators` is the gradient-folding machinery the curvature metrics share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from esa.metrics.registry import Scores, metric
from esa.model import distributed
from esa.model.forward import batches, nll_sum
from esa.model.introspect import input_device

if TYPE_CHECKING:
    from esa.model.targets import Target


@contextlib.contextmanager
def grad_accumulators(targets: list[Target], square: bool = False, squares: Scores | None = None
                      ) -> Iterator[Scores]:
    """Enable grads on targets and fold each backward's gradient (``square``: its square) into an
    fp32 accumulator; ``squares`` (a dict to fill): also fold each gradient's square into a second
    accumulator (filled in target order too), for metrics that need both moments of one backward.

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
            g = p.grad.float().contiguous()  # fp32 and contiguous: p.grad itself, else a fresh copy
            p.grad = None
            if squares is not None:  # before g may become the plain accumulator (and change in place)
                if name in squares:
                    squares[name].addcmul_(g, g)
                else:
                    squares[name] = g.square()
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
        for d in (acc, squares) if squares is not None else (acc,):
            filled = dict(d)
            d.clear()
            for t in targets:
                d[t.name] = filled.pop(t.name, None)
                if d[t.name] is None:
                    d[t.name] = torch.zeros(t.shape, dtype=torch.float32, device=t.param.device)
    finally:
        for h in handles:
            h.remove()
        for t in targets:
            t.param.requires_grad_(False)
            t.param.grad = None


@metric("grad_x_weight", aliases=("gradxweight", "grad_weight", "taylor"), needs=("forward", "backward"),
        help="|w * dL/dw| (first-order Taylor)",
        unit="|w·∂L/∂w| (nats; first-order loss change)")
def grad_x_weight(model, targets, windows, batch_size, ctx) -> Scores:
    n_tokens = ctx.n_windows * (windows.shape[1] - 1)
    with grad_accumulators(targets) as acc:
        for batch in batches(windows, batch_size, input_device(model), "grad_x_weight"):
            (nll_sum(model, batch) / n_tokens).backward()
    distributed.all_reduce_sum(acc.values())
    # in place: the fp32 accumulator becomes the score, so no second model-sized buffer is made
    return {t.name: acc[t.name].mul_(t.param.detach()).abs_() for t in targets}


@metric("grad_squared", aliases=("fisher", "grad_sq"), needs=("forward", "backward", "per_window"),
        help="empirical Fisher diagonal, mean over windows of the per-window gradient squared",
        unit="mean (∂L/∂w)² (nats² / weight unit²; empirical Fisher)")
def grad_squared(model, targets, windows, batch_size, ctx) -> Scores:
    n_predicted = windows.shape[1] - 1
    with grad_accumulators(targets, square=True) as acc:
        for window in batches(windows, 1, input_device(model), "grad_squared"):
            (nll_sum(model, window) / n_predicted).backward()
    distributed.all_reduce_sum(acc.values())
    return {name: a.div_(ctx.n_windows) for name, a in acc.items()}
