"""``taylor2``: LLM-Pruner's second-order Taylor importance (Ma et al. 2023, "LLM-Pruner: On the
Structural Pruning of Large Language Models"), per weight:

    |g·w − ½·F·w²|,   g = (1/W) Σ_windows g_w,   F = (1/W) Σ_windows g_w²,

with g_w the gradient of window w's mean token loss: the loss change of removing w to second
order, the Hessian diagonal approximated by the empirical Fisher diagonal.  ``g`` is exactly the
gradient ``grad_x_weight`` uses (windows are equal-length, so the mean over windows of their mean
losses is the mean token loss): ``taylor2`` is ``grad_x_weight``'s first-order term corrected by
the curvature term, and ``F`` is exactly ``grad_squared``.  One backward per window gives both.
"""

from __future__ import annotations

from esa.metrics.gradient import grad_accumulators
from esa.metrics.registry import Scores, metric
from esa.model import distributed
from esa.model.forward import batches, nll_sum
from esa.model.introspect import input_device


@metric("taylor2", aliases=("llm_pruner", "second_order_taylor"), needs=("forward", "backward", "per_window"),
        help="|g*w - 0.5*F*w^2|, g = mean gradient, F = empirical Fisher diagonal over windows "
             "(LLM-Pruner's second-order Taylor importance, Ma et al. 2023)",
        unit="|g·w − ½F·w²| (nats; second-order loss change)")
def taylor2(model, targets, windows, batch_size, ctx) -> Scores:
    n_predicted = windows.shape[1] - 1
    squares: Scores = {}
    with grad_accumulators(targets, squares=squares) as acc:
        for window in batches(windows, 1, input_device(model), "taylor2"):
            (nll_sum(model, window) / n_predicted).backward()
    distributed.all_reduce_sum([*acc.values(), *squares.values()])
    out: Scores = {}
    for t in targets:
        w = t.param.detach().float()
        g = acc[t.name].div_(ctx.n_windows)  # in place: the accumulators become the score
        fisher = squares.pop(t.name).div_(ctx.n_windows)
        out[t.name] = g.mul_(w).sub_(fisher.mul_(w).mul_(w).mul_(0.5)).abs_()
    return out
