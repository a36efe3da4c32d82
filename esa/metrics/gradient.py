"""Gradient metrics of the mean token loss ``L = (1/N) sum NLL`` over the N predicted tokens of the
W calibration windows (fp32 accumulators whatever the model dtype).

* ``grad_x_weight``: ``|w * g|`` with ``g = dL/dw``: first-order Taylor estimate of the loss change
  when w is removed.  One forward+backward per batch (the ``batch`` gradient sum).
* ``grad_squared``: empirical Fisher diagonal ``(1/W) sum_windows (d/dw mean-NLL(window))^2``;
  granularity is one window (squared per window, then averaged), so each window gets its own
  backward pass (``--batch-size`` does not batch this metric; the ``window_sq`` sum).
"""

from __future__ import annotations

from esa.metrics.registry import PER_WINDOW_SQUARES, Collector, metric


@metric("grad_x_weight", aliases=("gradxweight", "grad_weight", "taylor"), needs=("forward", "backward"),
        help="|w * dL/dw| (first-order Taylor)",
        unit="|w·∂L/∂w| (nats; first-order loss change)")
class GradXWeight(Collector):
    gradients = ("batch",)

    def score(self, t, grads):
        # in place: the fp32 accumulator becomes the score, so no second model-sized buffer is made
        return grads("batch").mul_(t.local()).abs_()  # this rank's rows under --shard fsdp


@metric("grad_squared", aliases=("fisher", "grad_sq"), needs=("forward", "backward", "per_window"),
        help="empirical Fisher diagonal, mean over windows of the per-window gradient squared",
        unit="mean (∂L/∂w)² (nats² / weight unit²; empirical Fisher)",
        not_on_shards=PER_WINDOW_SQUARES)
class GradSquared(Collector):
    gradients = ("window_sq",)

    def score(self, t, grads):
        return grads("window_sq").div_(self.ctx.n_windows)
