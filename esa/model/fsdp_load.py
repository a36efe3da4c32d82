"""Load a model sharded with FSDP2 without holding the whole of it in any one process (``--shard fsdp``).

The model is built from its config with parameters on the meta device (no memory), sharded with
:func:`esa.model.fsdp.shard`, given empty local storage, and each rank then reads only its own rows
of every tensor from the safetensors files (``safe_open(...).get_slice(name)[start:stop]``), so a
rank reads and holds 1/W of the weights.  Checkpoint names are mapped to the model's by
transformers' own conversion rules (``conversion_mapping``: the renamings and the converters its
``from_pretrained`` applies), so the names match what ``from_pretrained`` would load.  MoE
checkpoints store one tensor per expert (``mlp.experts.{e}.gate_proj.weight``, Mixtral's
``block_sparse_moe.experts.{e}.w1.weight``) while the model holds them fused (``experts.gate_up_proj``
``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``): rows are experts, so a rank reads just its
experts and stacks them with transformers' own operations.  A checkpoint tensor that cannot be
mapped, or a parameter left unfilled, is a UsageError naming it; nothing is left uninitialised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from esa.errors import UsageError
from esa.model import distributed
from esa.model.device import DTYPES
from esa.model.fsdp import FLAG, local, row_range, shard
from esa.model.loading import frozen_eval, load_tokenizer, loading_errors, model_source

log = logging.getLogger("esa")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def load_sharded(model_id: str, device: str, dtype: str, mesh: DeviceMesh):
    """``(model, tokenizer)``: ``model_id`` (hub id, local directory, the embedded model, a .gguf file)
    sharded over ``mesh`` on ``device`` ("cpu"; "cuda" is this rank's ``cuda:$LOCAL_RANK``), weights in
    ``dtype`` ("fp32", "bf16", "fp16"), in eval mode with ``requires_grad=False`` everywhere; every
    parameter a DTensor ``Shard(0)``.  Every rank calls it with the same arguments.

    A safetensors checkpoint (``model.safetensors``, or shards listed in ``model.safetensors.index.json``)
    is read slice by slice: no process ever holds the whole model.  A ``.gguf`` file cannot be sliced:
    every process loads it whole (and dequantises it) before sharding, so each needs the memory of the
    whole model while loading (a warning says so).  The embedded model is converted to safetensors once
    and read in slices.  The ranks on a node wait while their local rank 0 downloads or converts.
    """
    device = distributed.local_device(device)
    # the local rank 0 converts the embedded model or downloads from the hub first; the others wait
    # and then find it cached (a local directory needs no turns)
    found = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not Path(model_source(model_id)[0]).is_dir():
        found = _resolve(model_id)
    distributed.barrier()
    src, kwargs, tok, config, files = found or _resolve(model_id)
    if files is not None:
        return frozen_eval(load_checkpoint(config, files, dtype, mesh, device)), tok
    log.warning("%s: a GGUF file cannot be read in slices; every rank loads the whole model before "
                "sharding it (peak memory: the whole model per process)", model_id)
    with loading_errors(model_id, src):
        return load_whole(src, kwargs, dtype, mesh), tok


def load_whole(src: str, kwargs: dict, dtype: str, mesh: DeviceMesh) -> torch.nn.Module:
    """For a checkpoint that cannot be read in slices (GGUF): ``from_pretrained`` whole in this process
    (memory: the whole model), then sharded; ``fully_shard`` keeps this rank's rows, moves them to the
    mesh's device and frees the rest.  Same result as :func:`load_checkpoint`."""
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], **kwargs)
    shard(net, mesh)
    return frozen_eval(net)


def _resolve(model_id: str) -> tuple[str, dict, object, object, list[Path] | None]:
    """``(src, kwargs, tokenizer, config, safetensors files)`` of ``model_id``; config and files are
    None for a GGUF file."""
    src, kwargs = model_source(model_id)
    with loading_errors(model_id, src):
        from transformers import AutoConfig

        tok = load_tokenizer(src, kwargs)
        if "gguf_file" in kwargs:
            return src, kwargs, tok, None, None
        return src, kwargs, tok, AutoConfig.from_pretrained(src), checkpoint_files(model_id, src)


def checkpoint_files(model_id: str, src: str) -> list[Path]:
    """The safetensors files of ``src`` (a local directory or a hub id, fetched into the HF cache):
    the shards the index lists, else ``model.safetensors``."""
    from transformers.utils import cached_file

    index = cached_file(src, INDEX_FILE, _raise_exceptions_for_missing_entries=False)
    if index is not None:
        names = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [Path(cached_file(src, name)) for name in names]
    single = cached_file(src, SINGLE_FILE, _raise_exceptions_for_missing_entries=False)
    if single is None:
        raise UsageError(f"{FLAG} reads safetensors checkpoints, and {model_id!r} has neither {SINGLE_FILE} "
                         f"nor {INDEX_FILE}")
    return [Path(single)]


def load_checkpoint(config, files: list[Path], dtype: str, mesh: DeviceMesh, device: str) -> torch.nn.Module:
    """The model of ``config`` sharded over ``mesh`` on ``device``, each rank's rows read from ``files``.

    The meta build keeps real buffers (see :func:`meta_model`), but ``to_empty`` gives every tensor
    fresh uninitialised storage, so the constructor's buffers are copied back (the non-persistent
    ones, e.g. rotary ``inv_freq``, are in no checkpoint; left as ``to_empty`` leaves them, the logits
    were off by 1e-4..1e-2) before the checkpoint fills the parameters and persistent buffers.
    """
    net = meta_model(config, dtype)
    with Checkpoint(files) as ckpt:
        sources = plan(net, ckpt.keys)  # before any work: a bad checkpoint fails on every rank alike
        built = {n: b.clone() for n, b in net.named_buffers(remove_duplicate=False)}
        shard(net, mesh)
        net.to_empty(device=device)
        with torch.no_grad():
            for name, buf in net.named_buffers(remove_duplicate=False):
                buf.copy_(built[name])
            fill(net, sources, ckpt)
    log.info("loaded %d tensors from %d safetensors file(s), this rank's rows only", len(sources), len(files))
    return net


def meta_model(config, dtype: str) -> torch.nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (no memory) in ``dtype``
    and its buffers real (computed by the constructor, as ``from_pretrained`` gets them), tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if getattr(config, "quantization_config", None) is not None:
        raise UsageError(f"{FLAG} loads unquantized checkpoints; this one is quantized "
                         f"({config.quantization_config.get('quant_method', '?')})")
    with init_empty_weights(include_buffers=False):
        net = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    net.tie_weights()  # init_empty_weights re-creates every assigned parameter, which unties them
    return net


class Checkpoint:
    """The tensor names of safetensors ``files`` and read access to them (a context manager).

    Files are memory-mapped, and the pages a read touches count in the process's resident memory
    until the file is closed; so one file is open at a time (read tensors file by file, see
    :meth:`file_of`), which bounds that to this rank's rows of one file.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._open = safe_open
        self._where: dict[str, Path] = {}
        for path in files:
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    if key in self._where:
                        raise UsageError(f"checkpoint tensor {key!r} is in both {self._where[key].name} "
                                         f"and {path.name}")
                    self._where[key] = path
        self._stack = contextlib.ExitStack()
        self._path: Path | None = None
        self._handle = None

    @property
    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def handle(self, key: str):
        path = self._where[key]
        if path != self._path:
            self._stack.close()  # unmaps the previous file: its touched pages leave this process's RSS
            self._handle, self._path = self._stack.enter_context(self._open(path, "pt")), path
        return self._handle

    def shape(self, key: str) -> list[int]:
        return list(self.handle(key).get_slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of dim 0 of ``key``; only those bytes are read."""
        return self.handle(key).get_slice(key)[start:stop]

    def tensor(self, key: str) -> torch.Tensor:
        return self.handle(key).get_tensor(key)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@dataclass
class Source:
    """Where one model tensor's values are in the checkpoint: one tensor (``key``), or one tensor per
    expert (``experts[pattern][e]``, one list per source pattern of ``converter``) that the converter's
    operations stack along dim 0 (experts)."""

    key: str | None = None
    converter: object | None = None
    experts: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def first_key(self) -> str:
        """A checkpoint key it reads (for messages, and for the file it is in)."""
        return self.key or next(iter(next(iter(self.experts.values())).values()))


def plan(model: torch.nn.Module, keys: list[str]) -> dict[str, Source]:
    """``{model tensor name: Source}`` for every checkpoint key in ``keys``, by transformers' rules.

    Raises UsageError for a key that maps to nothing the model has (unless transformers itself
    ignores it, e.g. an old per-layer ``rotary_emb.inv_freq``), for a conversion other than stacking
    per-expert tensors, for an expert set with gaps, and for a parameter nothing fills.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, apply_renamings, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = _persistent(model)
    present = dict.fromkeys(wanted, True)  # how rename_source_key decides to add or drop the base model prefix
    sources: dict[str, Source] = {}
    unexpected = []
    for key in keys:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, present)
        if target not in wanted:
            unexpected.append(key)
        elif pattern is None:
            if target in sources:
                raise UsageError(f"checkpoint tensors {sources[target].key!r} and {key!r} both map to {target!r}")
            sources[target] = Source(key=key)
        else:
            conv = next(c for c in converters if pattern in c.source_patterns)
            source = sources.setdefault(target, Source(converter=conv))
            source.experts.setdefault(pattern, {})[_expert(apply_renamings(key, renamings), pattern, key)] = key
    unexpected = _not_ignored(model, unexpected, "unexpected_keys")
    if unexpected:
        raise UsageError(f"{FLAG} cannot map checkpoint tensor {unexpected[0]!r} to a parameter of "
                         f"{type(model).__name__} ({len(unexpected)} unmapped)")
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in sources.items():
        if source.converter is not None:
            _check_stacking(target, source, params[target].shape[0])
    filled = {id(params[t]) for t in sources if t in params}
    missing = [n for n, p in params.items() if id(p) not in filled]
    missing += _not_ignored(model, [n for n in wanted if n not in params and n not in sources], "missing_keys")
    if missing:
        raise UsageError(f"{FLAG}: the checkpoint has no tensor for {missing[0]!r} ({len(missing)} missing)")
    return sources


def fill(model: torch.nn.Module, sources: dict[str, Source], ckpt: Checkpoint) -> None:
    """Copy this rank's rows of every tensor in ``sources`` from ``ckpt`` into ``model`` (a tied
    parameter once), cast to the model's dtype; a shape that differs from the model's is a UsageError."""
    tensors = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}
    done: set[int] = set()
    for target in sorted(sources, key=lambda t: (str(ckpt.file_of(sources[t].first_key)), t)):  # file by file
        source, t = sources[target], tensors[target]
        if id(t) in done:
            continue
        done.add(id(t))
        if source.key is not None and ckpt.shape(source.key) != list(t.shape):
            raise UsageError(f"checkpoint tensor {source.key!r} has shape {ckpt.shape(source.key)}, but the "
                             f"model's {target!r} has {list(t.shape)}")
        if t.dim() == 0:
            local(t).copy_(ckpt.tensor(source.key))
            continue
        start, n = row_range(t)
        if n == 0:
            continue  # a trailing rank of an uneven split holds no rows of this tensor
        rows = ckpt.rows(source.key, start, start + n) if source.key is not None else _stacked(source, ckpt, start, n)
        if rows.shape != local(t).shape:
            raise UsageError(f"the checkpoint's rows {start}..{start + n} of {target!r} have shape "
                             f"{list(rows.shape)}, not {list(local(t).shape)}")
        local(t).copy_(rows)
    # plan() saw every parameter covered; a tie that to_empty broke would leave an alias unfilled
    unfilled = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in done]
    if unfilled:
        raise RuntimeError(f"parameters left unfilled (a tied alias untied?): {unfilled[:3]}")


def _stacked(source: Source, ckpt: Checkpoint, start: int, n: int) -> torch.Tensor:
    """Experts ``[start, start + n)`` of a fused expert tensor, stacked by the converter's own
    operations (MergeModulelist along dim 0, then e.g. Concatenate of gate and up along dim 1), so
    the layout is exactly what ``from_pretrained`` builds."""
    conv = source.converter
    collected = {pattern: [ckpt.tensor(source.experts[pattern][e]) for e in range(start, start + n)]
                 for pattern in conv.source_patterns}
    for op in conv.operations:
        collected = op.convert(collected, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns)
    (rows,) = collected.values()
    return rows


def _check_stacking(target: str, source: Source, n_experts: int) -> None:
    """Refuse a converter whose result is not per-expert rows, and an incomplete set of experts."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = source.converter.operations
    row_local = (isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
                 and all(isinstance(op, Concatenate) and op.dim >= 1 for op in ops[1:]))
    if not row_local:
        raise UsageError(f"{FLAG} cannot read checkpoint tensor {source.first_key!r} in slices: transformers "
                         f"converts it with {[type(op).__name__ for op in ops]} into {target!r}")
    for pattern in source.converter.source_patterns:
        found = source.experts.get(pattern, {})
        if sorted(found) != list(range(n_experts)):
            raise UsageError(f"{FLAG}: the checkpoint has experts {sorted(found)} of {pattern!r} for {target!r}, "
                             f"which has {n_experts}")


def _expert(renamed: str, pattern: str, key: str) -> int:
    """The expert index that the ``*`` of a converter's source ``pattern`` stands for in ``renamed``."""
    before, star, after = pattern.partition("*")
    match = re.search(re.escape(before) + r"(\d+)" + re.escape(after), renamed) if star else None
    if match is None:
        raise UsageError(f"{FLAG} cannot find the expert index of checkpoint tensor {key!r} (pattern {pattern!r})")
    return int(match.group(1))


def _persistent(model: torch.nn.Module) -> set[str]:
    """Names of every parameter (tied aliases included) and persistent buffer: what a checkpoint holds."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, _ in model.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            names.add(name)
    return names


def _not_ignored(model: torch.nn.Module, keys: list[str], kind: str) -> list[str]:
    """``keys`` less those transformers' ``from_pretrained`` ignores as ``kind`` ("unexpected_keys" or
    "missing_keys"): the model's ``_keys_to_ignore_on_load_*`` and its own exceptions, by its own rule."""
    info = types.SimpleNamespace(missing_keys=set(), unexpected_keys=set())
    setattr(info, kind, set(keys))
    model._adjust_missing_and_unexpected_keys(info)
    kept = getattr(info, kind)
    return [k for k in keys if k in kept]
