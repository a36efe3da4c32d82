"""``magnitude``: ``|w|``, the data-free baseline every other metric should beat."""

from __future__ import annotations

from esa.metrics.registry import Scores, metric


@metric("magnitude", aliases=("weight_magnitude",), needs=(), help="|w|", unit="|w| (weight units)")
def magnitude(model, targets, windows, batch_size, ctx) -> Scores:
    return {t.name: t.param.detach().float().abs() for t in targets}
