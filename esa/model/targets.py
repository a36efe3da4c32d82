"""Find the weights ESA scores, generically: every nn.Linear, HF Conv1D and nn.Embedding weight.

A tied weight (e.g. input embedding == lm_head) is one parameter used by several modules; it is
one target, named by its first name in ``model.named_parameters()``, with one :class:`Use` per
module that reads it.  Each use records which weight axis is the *input* axis:

* ``nn.Linear``: weight ``[out, in]``, ``y = x W^T`` -> input axis 1;
* HF ``Conv1D`` (GPT-2): weight ``[in, out]``, ``y = x W`` -> input axis 0 (transposed!);
* ``nn.Embedding``: weight ``[vocab, dim]``; a lookup is a one-hot ``[vocab]`` input times the
  weight, so row ``v`` is the input channel of token ``v`` -> input axis 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from esa.errors import UsageError
from esa.naming import compile_patterns


@dataclass(frozen=True)
class Use:
    module_name: str
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "embedding"
    in_axis: int  # axis of the weight indexed by the input feature (or token id)


@dataclass(frozen=True)
class Target:
    name: str  # canonical parameter name
    param: nn.Parameter
    uses: tuple[Use, ...]
    aliases: tuple[str, ...]  # every parameter name (several when tied)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


@functools.cache
def conv1d_class() -> type:
    """transformers' GPT-2 style linear layer with transposed weight (imported on first use, so that
    importing this module, e.g. for --help, does not load transformers)."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _kind(module: nn.Module) -> tuple[str, int] | None:
    if isinstance(module, nn.Linear):
        return "linear", 1
    if isinstance(module, conv1d_class()):
        return "conv1d", 0
    if isinstance(module, nn.Embedding):
        return "embedding", 0
    return None


def find_targets(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
                 ) -> list[Target]:
    """Return the target weights in ``model.named_parameters()`` order, tied weights once.

    ``include``/``exclude`` are regexes searched in every alias of a parameter name: a weight is
    kept when some alias matches an include (or there are none) and no alias matches an exclude.
    """
    inc = compile_patterns(include, "--include")
    exc = compile_patterns(exclude, "--exclude")
    canonical: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    uses: dict[int, list[Use]] = {}
    for mname, module in model.named_modules():
        k = _kind(module)
        weight = getattr(module, "weight", None)
        if k is None or not isinstance(weight, nn.Parameter):
            continue
        uses.setdefault(id(weight), []).append(Use(mname, module, k[0], k[1]))
    out = []
    for _name, param in model.named_parameters():
        if id(param) not in uses:
            continue
        names = aliases[id(param)]
        if inc and not any(r.search(a) for r in inc for a in names):
            continue
        if any(r.search(a) for r in exc for a in names):
            continue
        out.append(Target(canonical[id(param)], param, tuple(uses[id(param)]), tuple(names)))
    if not out:
        raise UsageError("no target weights left after --include/--exclude "
                         f"(include={list(include)}, exclude={list(exclude)})")
    for t in out:
        if not t.param.is_contiguous():
            raise RuntimeError(f"target {t.name} is not contiguous; flat indexing would be wrong")
    return out


def flat_view(param: torch.Tensor) -> torch.Tensor:
    """A 1-D view sharing storage with ``param`` (flat index = row-major index)."""
    return param.data.view(-1)
