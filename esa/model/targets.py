"""Find the weights ESA scores, generically: every floating-point parameter with two or more
dimensions (``--targets matrices``, the default), or every floating-point parameter
(``--targets all``: norms and biases too).  Nothing is assumed to be an ``nn.Linear``.

A tied weight (e.g. input embedding == lm_head) is one parameter used by several modules; it is
one target, named by its first name in ``model.named_parameters()``, with one :class:`Use` per
module that reads it.  Each target knows the role of each axis (``layout``): ``out`` and ``in``
(the output and input features of the map it computes) and ``expert`` (which expert of a fused
mixture-of-experts tensor):

* ``nn.Linear``: weight ``[out, in]``, ``y = x W^T``;
* HF ``Conv1D`` (GPT-2): weight ``[in, out]``, ``y = x W`` (transposed!);
* ``nn.Embedding`` (and subclasses): weight ``[vocab, dim]``; a lookup is a one-hot ``[vocab]``
  input times the weight, so the token axis is ``in``;
* fused experts (transformers 5: a module with 3-D ``gate_up_proj``/``down_proj`` whose forward
  calls ``F.linear(x, W[e])``): ``[expert, out, in]``, or ``[expert, in, out]`` when the module says
  ``is_transposed``;
* any other 2-D weight (MoE routers, which call ``F.linear(x, W)``): ``[out, in]``; act_mag checks
  this against the calls it observes;
* 1-D parameters (``--targets all``): ``[out]``.

:func:`coverage` records what was scored against everything the model holds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from esa.errors import UsageError
from esa.model import distributed
from esa.naming import compile_patterns

SCOPES = ("matrices", "all")


@dataclass(frozen=True)
class Use:
    """One module reading the weight: ``kind`` "linear" | "conv1d" | "embedding" (a module whose
    forward hooks see the input directly) or "parameter" (any other owner: experts, routers, norms;
    act_mag observes its inputs at the ``F.linear``/``F.embedding`` calls); ``in_axis`` indexes the
    input feature (None when the weight has none, e.g. a 1-D norm scale)."""

    module_name: str
    module: nn.Module
    kind: str
    in_axis: int | None
    attr: str = "weight"  # the module attribute holding it (FSDP swaps in the gathered tensor there in forward)


@dataclass(frozen=True)
class Target:
    name: str  # canonical parameter name
    param: nn.Parameter
    uses: tuple[Use, ...]
    aliases: tuple[str, ...]  # every parameter name (several when tied)
    layout: tuple[str, ...] = field(default=())  # role of each axis: "out", "in", "expert"

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    def axis(self, role: str) -> int | None:
        """The axis playing ``role`` ("out", "in", "expert"), or None."""
        return self.layout.index(role) if role in self.layout else None

    def local(self) -> torch.Tensor:
        """This rank's rows of the weight (all of it unless ``--shard fsdp`` split it on dim 0), detached;
        writes reach the stored weight."""
        return distributed.local(self.param).detach()

    def local_rows(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (broadcastable against the whole weight) cut to this rank's rows where it spans dim 0,
        so that it broadcasts against :meth:`local`."""
        if not distributed.sharded(self.param) or v.dim() < self.param.dim() or v.shape[0] != self.shape[0]:
            return v
        start = distributed.first_row(self.param)
        return v[start:start + self.local().shape[0]]


@functools.cache
def conv1d_class() -> type:
    """transformers' GPT-2 style linear layer with transposed weight (imported on first use, so that
    importing this module, e.g. for --help, does not load transformers)."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _kind(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    """(use kind, layout) of a module whose ``weight`` is read directly by its own forward."""
    if isinstance(module, nn.Linear):
        return "linear", ("out", "in")
    if isinstance(module, conv1d_class()):
        return "conv1d", ("in", "out")
    if isinstance(module, nn.Embedding):
        return "embedding", ("in", "out")
    return None


def _parameter_layout(module: nn.Module, param: nn.Parameter) -> tuple[str, ...]:
    """Layout of a weight read through functional calls inside its owner's forward."""
    if param.ndim == 3:
        return ("expert", "in", "out") if getattr(module, "is_transposed", False) else ("expert", "out", "in")
    if param.ndim == 2:
        return ("out", "in")
    if param.ndim == 1:
        return ("out",)
    return ()


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(param) -> every (module name, module, attribute) that holds it directly."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            out.setdefault(id(p), []).append((mname, module, attr))
    return out


def find_targets(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                 scope: str = "matrices") -> list[Target]:
    """Return the target weights in ``model.named_parameters()`` order, tied weights once.

    ``scope``: "matrices" = every floating-point parameter with ndim >= 2, "all" = every
    floating-point parameter.  ``include``/``exclude`` are regexes searched in every alias of a
    parameter name: a weight is kept when some alias matches an include (or there are none) and no
    alias matches an exclude.
    """
    if scope not in SCOPES:
        raise UsageError(f"unknown --targets {scope!r}; choose from {', '.join(SCOPES)}")
    inc = compile_patterns(include, "--include")
    exc = compile_patterns(exclude, "--exclude")
    canonical: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    owners = _owners(model)
    out = []
    for _name, param in model.named_parameters():
        if not param.is_floating_point() or (scope == "matrices" and param.ndim < 2):
            continue
        names = aliases[id(param)]
        if inc and not any(r.search(a) for r in inc for a in names):
            continue
        if any(r.search(a) for r in exc for a in names):
            continue
        uses, layout = [], ()
        for mname, module, attr in owners[id(param)]:
            kind = _kind(module) if attr == "weight" else None
            lay = kind[1] if kind else _parameter_layout(module, param)
            layout = layout or lay
            uses.append(Use(mname, module, kind[0] if kind else "parameter", lay.index("in") if "in" in lay else None,
                            attr))
        out.append(Target(canonical[id(param)], param, tuple(uses), tuple(names), layout))
    if not out:
        raise UsageError("no target weights left after --include/--exclude "
                         f"(include={list(include)}, exclude={list(exclude)})")
    for t in out:
        if not t.param.is_contiguous():
            raise RuntimeError(f"target {t.name} is not contiguous; flat indexing would be wrong")
    return out


def coverage(model: nn.Module, targets: list[Target], excluded: dict[str, str] | None = None) -> dict:
    """What was scored against what the model holds (tied weights counted once): ``scored_weights``,
    ``matrix_weights`` (floating point, ndim >= 2), ``all_weights`` (floating point), ``excluded``
    (name -> reason, for every floating-point parameter not scored) and the scored share."""
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    scored = {id(t.param) for t in targets}
    reasons = dict(excluded or {})
    for n, p in params:
        if id(p) not in scored and n not in reasons:
            reasons[n] = "1-D (norm scale or bias): add --targets all" if p.ndim < 2 else "--include/--exclude"
    matrix = sum(p.numel() for _, p in params if p.ndim >= 2)
    n_scored = sum(t.numel for t in targets)
    return {"scored_weights": n_scored, "matrix_weights": matrix, "all_weights": sum(p.numel() for _, p in params),
            "scored_share_of_matrix_weights": n_scored / matrix if matrix else 0.0,
            "excluded": {n: {"reason": r, "numel": int(dict(params)[n].numel())} for n, r in reasons.items()}}


def flat_view(param: torch.Tensor) -> torch.Tensor:
    """A 1-D view sharing storage with this rank's rows of ``param`` (flat index = row-major index,
    minus :func:`flat_offset` when ``--shard fsdp`` split it)."""
    return (param.to_local() if distributed.sharded(param) else param.data).view(-1)


def flat_offset(param: torch.Tensor) -> int:
    """The whole weight's flat index of :func:`flat_view`'s element 0 (0 unless sharded)."""
    return distributed.first_row(param) * (param.numel() // param.shape[0]) if param.dim() and param.shape[0] else 0
