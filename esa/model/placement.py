"""Models bigger than one device: accelerate's big-model dispatch, and gradient checkpointing in eval mode.

Memory arithmetic (per parameter, b = bytes of the model dtype: 2 for bf16/fp16, 4 for fp32):
weights b, fp32 score accumulators 4, and a model-dtype gradient b that lives only from its
backward hook to the accumulator (one tensor at a time, not the whole model).  So a device holding
a share ``w`` bytes of weights needs ``w * (b + 4) / b`` bytes plus activations: 3x the weights for
bf16, 2x for fp32.  :func:`weight_budget` turns a device's free memory into the weight bytes
accelerate may put there, and ``--device-map auto`` hands accelerate those budgets, so the
accumulators (allocated next to each weight) fit too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from esa.errors import UsageError
from esa.model.introspect import decoder_blocks

log = logging.getLogger("esa")

ACC_BYTES = 4  # one fp32 accumulator per scored weight
HEADROOM = 0.15  # share of each device kept for activations, the transient gradient and the CUDA context
GPU_BUDGET_ENV = "ESA_GPU_BUDGET_BYTES"  # optional cap on every GPU's weight budget (bytes)


def weight_budget(free_bytes: int, dtype: torch.dtype, headroom: float = HEADROOM) -> int:
    """Bytes of weights that fit in ``free_bytes`` together with their fp32 accumulators."""
    b = torch.finfo(dtype).bits // 8
    return int(free_bytes * (1.0 - headroom) * b / (b + ACC_BYTES))


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); falls back to total physical memory."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_budget_cap() -> int | None:
    """The per-GPU weight budget cap in bytes from ``$ESA_GPU_BUDGET_BYTES`` (None when unset or empty)."""
    value = os.environ.get(GPU_BUDGET_ENV, "").strip()
    if not value:
        return None
    try:
        cap = int(value)
    except ValueError:
        cap = 0
    if cap <= 0:
        raise UsageError(f"{GPU_BUDGET_ENV}={value!r} must be a positive whole number of bytes (e.g. 300000000)")
    return cap


def max_memory(dtype: torch.dtype, offload: bool, gpu_free: dict[int, int] | None = None,
               cpu_free: int | None = None) -> dict[int | str, int]:
    """Weight budgets per device for accelerate: every visible GPU, and the CPU with ``offload`` (or
    when there is no GPU at all).  ``gpu_free``/``cpu_free`` (bytes) default to what is free now.

    The environment variable ``ESA_GPU_BUDGET_BYTES`` (a positive integer, bytes of weights), when
    set, caps every GPU's weight budget: each becomes min(computed budget, that value).  It forces a
    small GPU share, e.g. to check ``--offload`` with some blocks on the CPU on a GPU that would hold
    the whole model (``benchmarks/gpu_check.sh``).  Any other value is a :class:`UsageError`.
    """
    cap = gpu_budget_cap()
    if gpu_free is None:
        gpu_free = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    budgets: dict[int | str, int] = {i: weight_budget(free, dtype) for i, free in gpu_free.items()}
    if cap is not None:
        budgets = {i: min(b, cap) for i, b in budgets.items()}
    if offload or not gpu_free:
        budgets["cpu"] = weight_budget(available_ram() if cpu_free is None else cpu_free, dtype)
    return budgets


def plan_device_map(config, dtype: torch.dtype, budgets: dict[int | str, int]) -> dict[str, int | str]:
    """accelerate's placement of a model built from ``config`` (on the meta device, no memory) under
    ``budgets``; whole decoder blocks are never split.  Refuses a plan that would need the disk."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    meta.tie_weights()
    plan = infer_auto_device_map(meta, max_memory=budgets, no_split_module_classes=meta._no_split_modules or [],
                                 dtype=dtype)
    if "disk" in plan.values() or not plan:
        where = "GPUs and CPU" if "cpu" in budgets else "GPUs (add --offload to use CPU memory too)"
        raise UsageError(f"the model does not fit on the {where}: each weight needs its fp32 score "
                         f"accumulator beside it ({ACC_BYTES} bytes per weight), see README 'Large models'")
    return plan


def load_dispatched(src: str, kwargs: dict, dtype: torch.dtype, offload: bool):
    """Load a causal LM spread over the devices by ``--device-map auto`` (and the CPU with ``offload``).

    GPU-only plans load straight onto the GPUs (transformers' device_map loading).  A plan with
    modules on the CPU is loaded in CPU memory and dispatched with the CPU as an *execution* device
    (``main_device="cpu"``): those modules compute on the CPU with their real parameters.
    accelerate's default would stream them to a GPU as temporary copies, which the gradient hooks
    never see, so their scores would be silently missing.
    """
    from accelerate import dispatch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src, **kwargs)
    plan = plan_device_map(config, dtype, max_memory(dtype, offload))
    devices = set(plan.values())
    log.info("device map: %s", {d: sum(v == d for v in plan.values()) for d in devices})
    if devices == {"cpu"} or "cpu" not in devices:
        net = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map=plan, **kwargs)
    else:
        net = dispatch_model(AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs), device_map=plan,
                             main_device="cpu")
    net.esa_device_map = {k: str(v) for k, v in plan.items()}  # recorded in config.json
    return net


@contextlib.contextmanager
def checkpointed_blocks(model: torch.nn.Module) -> Iterator[int]:
    """Recompute each decoder block's activations in backward instead of storing them.

    transformers' own ``gradient_checkpointing_enable`` only acts in training mode, and scores
    must be computed in eval mode (no dropout), so each block's ``forward`` is wrapped in
    non-reentrant ``torch.utils.checkpoint`` for the duration of the block and always unwrapped.
    Yields the number of wrapped blocks.  Results equal the plain path up to float rounding.
    """
    from torch.utils.checkpoint import checkpoint

    blocks = decoder_blocks(model, "--gradient-checkpointing")
    saved: list[tuple[torch.nn.Module, object]] = []
    try:
        for block in blocks:
            # keep an instance-level forward (e.g. an accelerate hook) to put back exactly
            saved.append((block, block.__dict__.get("forward")))
            inner = block.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.forward = forward
        yield len(blocks)
    finally:
        for block, previous in saved:
            if previous is None:
                del block.forward
            else:
                block.forward = previous
