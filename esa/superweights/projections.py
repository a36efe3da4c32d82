"""Where super weights can live: every MLP output (down) projection, found generically, and what
one forward pass records at each (:class:`LayerStat`).

Ordinary projections (``nn.Linear``, HF ``Conv1D``) are watched with forward hooks.  A fused
mixture-of-experts down projection (transformers 5: one ``[expert, out, in]`` parameter read as
``F.linear(h, W[e])`` inside the experts module's forward, for the tokens routed to expert ``e``)
is one projection per expert; :class:`ExpertCalls` observes those calls while the experts run
eagerly (:func:`esa.model.weight_inputs.eager_experts`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from esa.model.targets import conv1d_class
from esa.naming import layer_index

OUT_NAMES = frozenset({"down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "wo", "fc_out", "out_proj", "proj_out"})
# a module-path component that marks an MLP / feed-forward container (matched lower-case, whole component)
MLP_PARENT_RE = re.compile(r"^(.*mlp.*|.*ffn.*|.*feed_?forward.*|ff|ffw|.*moe.*|experts?|densereludense)$")
ATTN_RE = re.compile(r"attn|attention")


@dataclass(frozen=True)
class Projection:
    """An MLP output projection: ``kind`` "linear" (weight ``[out, in]``), "conv1d" (``[in, out]``) or
    "expert" (expert ``expert`` of a fused ``[expert, out, in]`` tensor, ``[expert, in, out]`` when
    the module is ``is_transposed``; ``weight`` is that expert's 2-D slice)."""

    module_name: str
    param_name: str  # canonical name in model.named_parameters() (the name Top-K selections use)
    module: nn.Module
    layer: int | None
    kind: str
    in_features: int
    out_features: int
    rule: str  # "name" or "structure" (see find_mlp_output_projections)
    expert: int | None = None
    attr: str = "weight"  # the module attribute holding the parameter

    @property
    def param(self) -> torch.Tensor:
        """The whole parameter (all experts of a fused tensor)."""
        return getattr(self.module, self.attr)

    @property
    def weight(self) -> torch.Tensor:
        return self.param if self.expert is None else self.param[self.expert]

    @property
    def transposed(self) -> bool:
        return self.kind == "conv1d" or (self.kind == "expert" and bool(getattr(self.module, "is_transposed", False)))

    def weight_index(self, out_channel: int, in_channel: int) -> tuple[int, int]:
        """(row, col) of the weight element mapping ``in_channel`` to ``out_channel`` in the (expert's)
        matrix's own layout."""
        return (in_channel, out_channel) if self.transposed else (out_channel, in_channel)

    def flat_index(self, row: int, col: int) -> int:
        """Row-major index of (row, col) in the whole parameter (the identity Top-K selections use)."""
        w = self.weight
        return (self.expert or 0) * w.numel() + row * w.shape[1] + col

    def describe(self) -> dict:
        return {"module": self.module_name, "param": self.param_name, "layer": self.layer, "kind": self.kind,
                "expert": self.expert, "in_features": self.in_features, "out_features": self.out_features,
                "rule": self.rule, "shape": list(self.weight.shape)}


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "embedding_dim", None)


def _features(module: nn.Module) -> tuple[str, int, int] | None:
    """(kind, in_features, out_features) of a Linear or HF Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, conv1d_class()):
        return "conv1d", module.weight.shape[0], module.weight.shape[1]
    return None


def find_mlp_output_projections(model: nn.Module) -> list[Projection]:
    """Every MLP output projection of ``model``, in module (forward) order.

    Rule 1 (by name): an ``nn.Linear`` or HF ``Conv1D`` whose last name component is in
    :data:`OUT_NAMES` (down_proj, fc2, c_proj, dense_4h_to_h, w2, wo, fc_out, ...) and one of whose
    ancestor components looks like an MLP container (:data:`MLP_PARENT_RE`: mlp, ffn, feed_forward,
    ff, moe, experts, ...) and none like attention.  So GPT-2's ``transformer.h.N.mlp.c_proj`` is
    found and ``transformer.h.N.attn.c_proj`` is not.
    Fused experts (transformers 5 mixture-of-experts modules): every expert of a 3-D parameter named
    in :data:`OUT_NAMES` is one projection (``kind`` "expert").
    Rule 2 (by structure, used only when rule 1 finds nothing, e.g. OPT's ``layers.N.fc2`` without an
    MLP container): inside a numbered block (:func:`esa.naming.layer_index`), outside attention, the
    projection maps ``in_features > hidden_size`` to ``out_features == hidden_size``.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    hidden = _hidden_size(model)
    by_name: list[Projection] = []
    by_shape: list[Projection] = []
    for name, module in model.named_modules():
        by_name += _expert_projections(name, module, canonical)
        feats = _features(module)
        if feats is None or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        parts = name.lower().split(".")
        ancestors = parts[:-1]
        if any(ATTN_RE.search(p) for p in ancestors):
            continue
        kind, n_in, n_out = feats
        proj = dict(module_name=name, param_name=canonical[id(module.weight)], module=module,
                    layer=layer_index(name), kind=kind, in_features=n_in, out_features=n_out)
        if parts[-1] in OUT_NAMES and any(MLP_PARENT_RE.match(p) for p in ancestors):
            by_name.append(Projection(**proj, rule="name"))
        elif proj["layer"] is not None and hidden is not None and n_out == hidden and n_in > hidden:
            by_shape.append(Projection(**proj, rule="structure"))
    return by_name or by_shape


def _expert_projections(name: str, module: nn.Module, canonical: dict[int, str]) -> list[Projection]:
    """One projection per expert of a fused 3-D down projection held by ``module`` (if any)."""
    out = []
    for attr, p in module.named_parameters(recurse=False):
        if p.ndim != 3 or attr not in OUT_NAMES or any(ATTN_RE.search(c) for c in name.lower().split(".")):
            continue
        transposed = bool(getattr(module, "is_transposed", False))
        n_in, n_out = (p.shape[1], p.shape[2]) if transposed else (p.shape[2], p.shape[1])
        out += [Projection(name, canonical[id(p)], module, layer_index(name), "expert", n_in, n_out, "name", e, attr)
                for e in range(p.shape[0])]
    return out


@dataclass
class LayerStat:
    """One projection in one forward pass: activation maxima in fp32 and where they occur.

    ``*_row`` is the flattened index over the leading (batch, position) dims; the spike's
    ``contributor`` is the input channel with the largest ``|w * x|`` at the output-max token.
    """

    module: str
    layer: int | None
    in_max: float = -1.0
    in_channel: int = -1
    in_row: int = -1
    out_max: float = -1.0
    out_channel: int = -1
    out_row: int = -1
    out_value: float = 0.0  # signed output at the max
    contributor: int = -1
    contribution: float = 0.0  # signed w * x of the contributor
    contributor_input: float = 0.0  # signed x of the contributor at the spike token
    seq_len: int = 0  # positions per sequence (rows -> batch, position), 0 if the input is 2-D

    def record(self, proj: Projection, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None,
               seq_len: int = 0) -> None:
        """Fold one call of the projection (``x`` ``[..., in]``, ``y`` ``[..., out]``) into the maxima.

        ``rows`` (an expert's call): the flattened (batch, position) of each row of ``x``, with
        ``seq_len`` positions per sequence, so that rows are stored as positions in the input."""
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        yf = y.detach().reshape(-1, y.shape[-1]).float()
        self.seq_len = seq_len if rows is not None else (x.shape[-2] if x.dim() == 3 else 0)
        place = (lambda r: int(rows[r])) if rows is not None and len(rows) == len(xf) else (lambda r: r)
        xa, ya = xf.abs().view(-1), yf.abs().view(-1)
        i, o = int(xa.argmax()), int(ya.argmax())
        if float(xa[i]) > self.in_max:  # a module called several times per pass keeps its largest call
            row, self.in_channel = divmod(i, xf.shape[1])
            self.in_row = place(row)
            self.in_max = float(xa[i])
        if float(ya[o]) > self.out_max:
            row, self.out_channel = divmod(o, yf.shape[1])
            self.out_row = place(row)
            self.out_max = float(ya[o])
            self.out_value = float(yf.view(-1)[o])
            w = proj.weight[:, self.out_channel] if proj.transposed else proj.weight[self.out_channel]
            contrib = xf[row] * w.detach().float()  # [in]: each input channel's share of the spike
            self.contributor = int(contrib.abs().argmax())
            self.contribution = float(contrib[self.contributor])
            self.contributor_input = float(xf[row, self.contributor])

    def where(self, row: int) -> tuple[int | None, int]:
        """(batch, position) of a flattened row (batch None when the input was not [B, T, C])."""
        return divmod(row, self.seq_len) if self.seq_len else (None, row)


@contextlib.contextmanager
def recording(projections: Sequence[Projection], seq_len: int = 0) -> Iterator[list[LayerStat]]:
    """Fill one :class:`LayerStat` per projection during the forward passes of the block: forward
    hooks for Linear/Conv1D, and for fused experts a :class:`ExpertCalls` mode inside the experts
    module's forward (``seq_len``: positions per sequence, to place the routed rows); always undone."""
    stats = [LayerStat(p.module_name, p.layer) for p in projections]
    handles = []
    experts: dict[int, ExpertCalls] = {}
    try:
        for proj, stat in zip(projections, stats):
            if proj.kind == "expert":
                experts.setdefault(id(proj.module), ExpertCalls(proj.module, seq_len)).watch(proj, stat)
                continue

            def hook(_m, args, kwargs, out, proj=proj, stat=stat):
                x = args[0] if args else next(iter(kwargs.values()))  # called as module(x) or module(input=x)
                stat.record(proj, x, out)
            handles.append(proj.module.register_forward_hook(hook, with_kwargs=True))
        for calls in experts.values():
            handles += calls.attach()
        yield stats
    finally:
        for h in handles:
            h.remove()
        for calls in experts.values():
            calls.detach()


class ExpertCalls(TorchFunctionMode):
    """Inside a fused-experts module's eager forward: the rows gathered from its input (which tokens
    an expert gets) and each ``F.linear(h, W_down[e])``, recorded into that expert's LayerStat."""

    def __init__(self, module: nn.Module, seq_len: int) -> None:
        super().__init__()
        self.module, self.seq_len = module, seq_len
        self.by_expert: dict[int, tuple[Projection, LayerStat]] = {}
        self.slices: dict[int, tuple[int, torch.Tensor]] = {}
        self.input: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.active = False

    def watch(self, proj: Projection, stat: LayerStat) -> None:
        self.by_expert[proj.expert] = (proj, stat)

    def attach(self) -> list:
        def enter(_m, args):
            self.input = args[0] if args else None
            self.__enter__()
            self.active = True

        def leave(_m, _args, _out):
            self.detach()
        return [self.module.register_forward_pre_hook(enter), self.module.register_forward_hook(leave)]

    def detach(self) -> None:
        if self.active:
            self.active = False
            self.__exit__(None, None, None)
        self.slices.clear()
        self.input = self.rows = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        proj = next(iter(self.by_expert.values()))[0]
        if func is torch.Tensor.__getitem__ and args[0] is proj.param and isinstance(out, torch.Tensor):
            self.slices[id(out)] = ((out.storage_offset() - proj.param.storage_offset()) // proj.param.stride(0), out)
        elif func is torch.Tensor.__getitem__ and args[0] is self.input and torch.is_tensor(args[1]) \
                and args[1].dim() == 1 and not args[1].is_floating_point():
            self.rows = args[1]  # the token rows this expert is about to process
        elif func in (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) >= 2:
            hit = self.slices.get(id(args[1]))
            if hit is not None and hit[1] is args[1] and int(hit[0]) in self.by_expert:
                proj, stat = self.by_expert[int(hit[0])]
                stat.record(proj, args[0], out, rows=self.rows, seq_len=self.seq_len)
        return out
