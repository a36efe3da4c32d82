"""``act_mag`` (Wanda, Sun et al. 2023): ``|w_ij| * ||x_j||_2``, forward passes only.

``||x_j||_2`` is taken over all calibration tokens of the input feature j of the module that reads
the weight (its input axis: see :mod:`esa.model.targets`).  For a fused mixture-of-experts tensor
the norm is per expert, over the tokens routed to that expert (:mod:`esa.model.weight_inputs`);
an expert no calibration token reached scores 0.  For an embedding the input is the
one-hot token vector, so ``||x_v||_2 = sqrt(count of token v)``.  A tied weight sums the score of
each of its uses.  Scores are not comparable across layers: ``||x||`` grows with depth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from esa.metrics.registry import Collector, metric
from esa.model import distributed
from esa.model.targets import Target, Use
from esa.model.weight_inputs import UnobservedWeightError, broadcast_to_weight, watching


def hooked_use(use: Use) -> bool:
    """Whether a forward hook on the module sees the weight's input: a Linear or Conv1D, or an
    Embedding with the stock forward (a subclass such as OPT's learned positions is called with the
    attention mask, not the ids: its lookups are observed at ``F.embedding`` instead)."""
    if use.kind == "embedding":
        return type(use.module).forward is nn.Embedding.forward
    return use.kind in ("linear", "conv1d")


def can_score(t: Target) -> str | None:
    """Why act_mag cannot score ``t`` (it has no input-feature axis: a norm scale or bias, or a weight
    the model never reads as a linear map), or None."""
    if t.axis("in") is not None:
        return None
    if t.param.ndim < 2:
        return "act_mag needs an input-feature axis (1-D norm scale or bias)"
    return ("act_mag needs an input-feature axis: not read as a linear map by any F.linear/matmul/F.embedding "
            "call (e.g. a stacked per-expert bias)")


@metric("act_mag", aliases=("activation_magnitude", "act_magnitude", "wanda"), needs=("forward",),
        help="|w_ij| * ||x_j||_2 (Wanda)", unit="|w|·‖x‖₂ (weight × activation units; Wanda)", can_score=can_score)
class ActMag(Collector):
    """One fp32 vector per hooked use: sum over tokens of x_j^2 (or token counts for embeddings); the
    other reads (fused experts per expert, routers, embedding subclasses) are observed by
    WeightInputs, one ``[expert, in]`` or ``[in]`` sum per target."""

    observes = True

    @contextlib.contextmanager
    def observe(self, model, targets) -> Iterator[None]:
        self.sumsq: dict[tuple[str, int], torch.Tensor] = {}
        self.batch_shape: list[torch.Size] = []  # shape of the input_ids of the forward in progress
        self.watched = {t.name for t in targets if any(not hooked_use(u) for u in t.uses)}
        sumsq, batch_shape = self.sumsq, self.batch_shape

        def make_hook(key: tuple[str, int], kind: str, size: int):
            def hook(module, inputs, output) -> None:
                x = inputs[0]
                if kind == "embedding":
                    # An index tensor broadcast over the batch (GPT-2 position ids [1, L]) is read by
                    # every window: count it once per token of the batch, not once per forward call.
                    x = broadcast_ids(x, batch_shape[-1])
                    v = torch.bincount(x.flatten(), minlength=size).float()
                else:
                    v = x.detach().float().square().sum(dim=tuple(range(x.ndim - 1)))
                sumsq[key].add_(v)
            return hook

        handles = []
        try:
            for t in targets:
                for i, use in enumerate(t.uses):
                    if hooked_use(use):
                        key = (t.name, i)
                        sumsq[key] = torch.zeros(t.shape[use.in_axis], dtype=torch.float32, device=t.param.device)
                        handles.append(use.module.register_forward_hook(make_hook(key, use.kind, t.shape[use.in_axis])))
            watched = [t for t in targets if t.name in self.watched]
            unhooked = [u.module for t in watched for u in t.uses if not hooked_use(u)]
            with watching(model, watched, unhooked) as self.seen:
                yield
        finally:
            for h in handles:
                h.remove()

    def before_batch(self, batch) -> None:
        self.batch_shape.append(batch.shape)
        self.seen.batch_shape = batch.shape

    def reduce(self) -> None:
        # observed on any rank (a rank may have had no window at all, or no token routed to an expert)
        watched = sorted(self.watched)  # the same order on every rank (a set's order is per process)
        seen = distributed.all_reduce_ints([int(n in self.seen.observed) for n in watched]) if watched else []
        missing = [n for n, count in zip(watched, seen) if not count]
        if missing:
            raise UnobservedWeightError(f"act_mag saw no F.linear/matmul/F.embedding read of {', '.join(missing)}; "
                                        "its input features are unknown (exclude it with --exclude)")
        distributed.all_reduce_sum([*self.sumsq.values(), *self.seen.sums.values()])

    def score(self, t, grads):
        # a hooked use broadcasts along its own input axis (a tied embedding reads rows, lm_head columns)
        norms = [self.sumsq[(t.name, i)][None, :] if u.in_axis == 1 else self.sumsq[(t.name, i)][:, None]
                 for i, u in enumerate(t.uses) if hooked_use(u)]
        if t.name in self.watched:
            norms.append(broadcast_to_weight(t, self.seen.sums[t.name]))
        w = t.local().float().abs()  # a fresh fp32 buffer (abs copies): it becomes the score
        norms = [t.local_rows(n).sqrt_() for n in norms]  # this rank's rows under --shard fsdp
        if len(norms) == 1:
            return w.mul_(norms[0])
        out = w * norms[0]  # tied: |w| * sum of the uses' norms (each broadcast along its own input axis)
        for n in norms[1:]:
            out.addcmul_(w, n)
        return out


def broadcast_ids(ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``ids`` expanded to the batch ``shape`` when it broadcasts to it (else unchanged)."""
    try:
        if ids.shape != shape and torch.broadcast_shapes(ids.shape, shape) == shape:
            return ids.expand(shape)
    except RuntimeError:
        pass
    return ids
