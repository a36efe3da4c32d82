"""Sharded models under torchrun with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): ``--shard fsdp``.

Every rank keeps 1/W of every parameter (W = number of ranks): each parameter becomes a DTensor
sharded on dim 0 over a 1-D mesh of all ranks.  Rows follow ``torch.chunk``: ceil(N/W) rows per
rank, so for uneven N the last ranks hold fewer rows, or none (N=5, W=4: 2, 2, 1, 0).  Decoder
blocks are all-gathered just in time for their forward and resharded right after it.  Loading
(:mod:`esa.model.fsdp_load`) never holds the whole model in one process.

The layout per kind of weight, which is what a rank can score on its own: an ``nn.Linear`` weight
``[out, in]`` splits by output rows, a GPT-2 ``Conv1D`` ``[in, out]`` by input features, and fused
experts ``[E, 2I, H]`` / ``[E, H, I]`` (and the router ``[E, H]``) by whole experts.

Rules for code that works on a sharded model (each was seen to fail otherwise, see the tests):

- Read and write a parameter through :func:`local` (this rank's rows), with local indices
  ``global_flat_index - flat_offset(p)``.  Writes land in FSDP's sharded storage, the input of the
  next all-gather; ``p.data.view(-1)[i] = v`` on a DTensor parameter silently changes nothing.
- Keep the parameter objects of ``model.named_parameters()`` taken after :func:`shard`; every
  ``fully_shard`` replaces the parameters, so references taken before are stale.
- Every rank must make the same forward (and backward) calls in the same order: each one
  all-gathers.  A rank without work runs a dummy call; a mismatch fails after the collective
  timeout (:func:`esa.model.distributed.collective_timeout`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from esa.errors import UsageError
from esa.model import distributed
from esa.model.device import SHARD_LAUNCH
from esa.model.distributed import local, row_range
from esa.model.introspect import decoder_blocks
from esa.model.targets import flat_offset

__all__ = ["flat_offset", "local", "local_bytes", "process_mesh", "row_range", "shard", "unsharded"]

FLAG = "--shard fsdp"


@contextlib.contextmanager
def process_mesh(device: str) -> Iterator[DeviceMesh]:
    """Join torchrun's process group (gloo on cpu, nccl on ``cuda:$LOCAL_RANK``; one process counts
    too) with a finite collective timeout, and yield a 1-D mesh of all ranks on ``device``'s type;
    the group is destroyed on exit unless it existed before.  ``device``: "cpu", "cuda" or "cuda:N"."""
    if not distributed.launched():
        raise UsageError(f"{FLAG} needs torchrun (one process per device: {SHARD_LAUNCH})")
    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):  # see shard(); tested with torch 2.13
        raise UsageError(f"{FLAG} needs a newer PyTorch: {torch.__version__} has no FSDP2 forced-SUM reduction")
    device = distributed.local_device(device)
    with distributed.joined(device):
        yield init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))


def shard(model: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``model`` in place over ``mesh``: one FSDP group per decoder block, one for the input
    embedding and one for the output head (one group for both when they are tied), then the root
    (what is left: final norm, position embeddings).  Every parameter becomes a DTensor ``Shard(0)``.

    ``reshard_after_forward=True`` everywhere: with the default (None) the root group stays gathered
    after a no-grad forward, so an edit of its shards would not be seen by the next forward.
    Gradients are reduced as an exact SUM over ranks (each rank back-propagates its share of one
    global loss): divide factor 1 and forced SUM, since gloo has no PREMUL_SUM.  Must be called
    identically on every rank, before any reference to a parameter is kept.
    """
    def group(modules: torch.nn.Module | list[torch.nn.Module]) -> None:
        fully_shard(modules, mesh=mesh, reshard_after_forward=True)

    scalar = next((n for n, p in model.named_parameters() if p.dim() == 0), None)
    if scalar is not None:  # fully_shard raises a ValueError deep inside otherwise
        raise UsageError(f"{FLAG} cannot shard this model: FSDP2 does not support scalar parameters ({scalar!r})")
    for block in reversed(decoder_blocks(model, FLAG)):  # a nested group must exist before its parent's
        group(block)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        group([embed, head])  # a tied weight must live in exactly one group
    else:
        # separate groups: with a large vocabulary these are the biggest tensors, and in the root
        # group they would stay gathered for the whole forward
        group(embed)
        if head is not None:
            group(head)
    group(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def local_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of this rank's shards of ``tensors`` (None entries, e.g. absent grads, count 0).  FSDP
    pads a rank's storage to ceil(N/W) rows; the padding is not counted."""
    return sum(local(t).numel() * t.element_size() for t in tensors if t is not None)


@contextlib.contextmanager
def unsharded(module: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """All-gather the parameters of one FSDP group (a decoder block, say) for the block, yielding
    ``{name: full tensor}`` (plain tensors, global shapes) for reading, e.g. a whole weight for a
    quantization error; writes to them are lost.  Resharded in ``finally``.  A collective: every
    rank must enter it for the same module.  Parameters of nested groups are not gathered."""
    if not isinstance(module, FSDPModule):
        raise TypeError(f"{type(module).__name__} is not an FSDP group (fully_shard was not applied to it)")
    module.unshard()
    try:
        # after unshard() the module attributes are the gathered parameters; a nested group's
        # parameters (still DTensors) belong to that group and are left out
        yield {n: p for n, p in module.named_parameters() if not isinstance(p, DTensor)}
    finally:
        module.reshard()
