"""``magnitude``: ``|w|``, the data-free baseline every other metric should beat (no pass)."""

from __future__ import annotations

from esa.metrics.registry import Collector, metric


@metric("magnitude", aliases=("weight_magnitude",), needs=(), help="|w|", unit="|w| (weight units)")
class Magnitude(Collector):
    def score(self, t, grads):
        return t.local().float().abs()
