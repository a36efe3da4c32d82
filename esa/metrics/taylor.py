"""``taylor2``: LLM-Pruner's second-order Taylor importance (Ma et al. 2023, "LLM-Pruner: On the
Structural Pruning of Large Language Models"), per weight:

    |g·w − ½·F·w²|,   g = ∂L/∂w,   F = (1/W) Σ_windows g_w²,

with L the mean token loss and g_w the gradient of window w's mean token loss: the loss change of
removing w to second order, the Hessian diagonal approximated by the empirical Fisher diagonal.
``g`` is the ``batch`` gradient sum, the very gradient ``grad_x_weight`` uses (so ``|g·w|`` *is*
grad_x_weight's score, bit for bit), and ``F`` is the ``window_sq`` sum, exactly ``grad_squared``:
``taylor2`` is ``grad_x_weight`` corrected by ``grad_squared``'s curvature term.  Alone it costs
one forward+backward per batch plus one per window; with grad_x_weight and grad_squared in the same
run (``--metric a,b,c``) it adds no pass at all.
"""

from __future__ import annotations

from esa.metrics.registry import PER_WINDOW_SQUARES, Collector, metric


@metric("taylor2", aliases=("llm_pruner", "second_order_taylor"), needs=("forward", "backward", "per_window"),
        help="|g*w - 0.5*F*w^2|, g = mean gradient, F = empirical Fisher diagonal over windows "
             "(LLM-Pruner's second-order Taylor importance, Ma et al. 2023)",
        unit="|g·w − ½F·w²| (nats; second-order loss change)",
        not_on_shards=PER_WINDOW_SQUARES)
class Taylor2(Collector):
    gradients = ("batch", "window_sq")

    def score(self, t, grads):
        w = t.local().float()
        g = grads("batch")  # in place: the accumulators become the score
        fisher = grads("window_sq").div_(self.ctx.n_windows)
        return g.mul_(w).sub_(fisher.mul_(w).mul_(w).mul_(0.5)).abs_()
