"""Small questions about a loaded model that compute code asks: where inputs go, whether it is in
eval mode, and what it is (for the records).  Torch only: no transformers import."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from esa.errors import UsageError


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids must go: the input embedding's device (the first device under a device map)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def model_record(model: torch.nn.Module) -> dict:
    """The model's class, type, parameter count and tying, as recorded in config.json."""
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
    }


def decoder_blocks(model: torch.nn.Module, flag: str) -> list[torch.nn.Module]:
    """The repeated decoder blocks, in module order, found generically from the class names
    transformers lists as never-split (``_no_split_modules``) rather than from model-specific
    attribute paths.  None found: a UsageError naming ``flag``, the option that needs them."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    # by the names of all its classes: fully_shard swaps a block's class for a subclass FSDP<Class>
    blocks = [m for m in model.modules() if names.intersection(c.__name__ for c in type(m).__mro__)]
    if not blocks:
        raise UsageError(f"{flag}: cannot find this model's decoder blocks (it declares no _no_split_modules)")
    return blocks


def assert_eval(model: torch.nn.Module) -> None:
    """Scores and perplexities are only meaningful with dropout off: refuse otherwise."""
    training = [n for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(f"model must be in eval mode; modules in training mode: {training[:3]}")


@contextlib.contextmanager
def using_implementation(model: torch.nn.Module, kind: str, wanted: str) -> Iterator[None]:
    """Run the model with transformers' ``kind`` implementation ("attn" or "experts") set to ``wanted``
    (e.g. "eager") inside the block, and restore the previous one; a no-op when the model has no
    such switch or already uses ``wanted``."""
    setter = getattr(model, f"set_{kind}_implementation", None)
    previous = getattr(getattr(model, "config", None), f"_{kind}_implementation", None)
    if setter is None or previous in (None, wanted):
        yield
        return
    setter(wanted)
    try:
        yield
    finally:
        setter(previous)
