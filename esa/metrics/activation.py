"""``act_mag`` (Wanda, Sun et al. 2023): ``|w_ij| * ||x_j||_2``, forward passes only.

``||x_j||_2`` is taken over all calibration tokens of the input feature j of the module that reads
the weight (its input axis: see :mod:`esa.model.targets`).  For an embedding the input is the
one-hot token vector, so ``||x_v||_2 = sqrt(count of token v)``.  A tied weight sums the score of
each of its uses.  Scores are not comparable across layers: ``||x||`` grows with depth.
"""

from __future__ import annotations

import torch

from esa.metrics.registry import Scores, metric
from esa.model import distributed
from esa.model.forward import batches
from esa.model.introspect import input_device


@metric("act_mag", aliases=("activation_magnitude", "act_magnitude", "wanda"), needs=("forward",),
        help="|w_ij| * ||x_j||_2 (Wanda)", unit="|w|·‖x‖₂ (weight × activation units; Wanda)")
def act_mag(model, targets, windows, batch_size, ctx) -> Scores:
    # One fp32 vector per use: sum over tokens of x_j^2 (or token counts for embeddings).
    sumsq: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    batch_shape: list[torch.Size] = []  # shape of the input_ids of the forward in progress

    def make_hook(key: tuple[str, int], kind: str, size: int):
        def hook(module, inputs, output) -> None:
            x = inputs[0]
            if kind == "embedding":
                # An index tensor broadcast over the batch (GPT-2 position ids [1, L]) is read by
                # every window: count it once per token of the batch, not once per forward call.
                x = _broadcast_ids(x, batch_shape[-1])
                v = torch.bincount(x.flatten(), minlength=size).float()
            else:
                v = x.detach().float().square().sum(dim=tuple(range(x.ndim - 1)))
            sumsq[key].add_(v)
        return hook

    try:
        for t in targets:
            for i, use in enumerate(t.uses):
                key = (t.name, i)
                sumsq[key] = torch.zeros(t.shape[use.in_axis], dtype=torch.float32, device=t.param.device)
                handles.append(use.module.register_forward_hook(make_hook(key, use.kind, t.shape[use.in_axis])))
        with torch.no_grad():
            for batch in batches(windows, batch_size, input_device(model), "act_mag"):
                batch_shape.append(batch.shape)
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    distributed.all_reduce_sum(sumsq.values())
    out: Scores = {}
    for t in targets:
        w = t.param.detach().float().abs()  # a fresh fp32 buffer (abs copies): it becomes the score
        norms = [sumsq[(t.name, i)].sqrt_() for i in range(len(t.uses))]
        axes = [use.in_axis for use in t.uses]
        bcast = [n[None, :] if a == 1 else n[:, None] for n, a in zip(norms, axes)]
        if len(bcast) == 1:
            out[t.name] = w.mul_(bcast[0])
        else:  # tied: |w| * sum of the uses' norms (each broadcast along its own input axis)
            out[t.name] = w * bcast[0]
            for b in bcast[1:]:
                out[t.name].addcmul_(w, b)
    return out


def _broadcast_ids(ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``ids`` expanded to the batch ``shape`` when it broadcasts to it (else unchanged)."""
    try:
        if ids.shape != shape and torch.broadcast_shapes(ids.shape, shape) == shape:
            return ids.expand(shape)
    except RuntimeError:
        pass
    return ids
