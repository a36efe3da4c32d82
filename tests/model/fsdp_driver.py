"""Checks of --shard fsdp loading, run by tests/model/test_fsdp.py under torchrun (gloo, CPU):

    torchrun --standalone --nproc_per_node W tests/model/fsdp_driver.py OUT.json NAME=DIR ...

Inside one process group, each saved tiny model ``DIR`` is loaded twice: sharded by
``load_sharded`` and plainly by ``load_model`` (the reference every rank holds whole).  Every rank
records what it saw; rank 0 writes all ranks' records to OUT.json and the test asserts on them.
A NAME ending in ``@bf16`` loads in bf16, ``@whole`` through ``load_whole`` (the GGUF path).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch.distributed.tensor import DTensor, Shard  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from esa.model.device import DTYPES  # noqa: E402
from esa.model.fsdp import flat_offset, local, local_bytes, process_mesh, row_range, unsharded  # noqa: E402
from esa.model.fsdp_load import load_sharded, load_whole  # noqa: E402
from esa.model.introspect import decoder_blocks  # noqa: E402

IDS = torch.tensor([[1, 17, 400, 9000, 23, 5, 77, 301, 12, 48000, 2, 640],
                    [7, 7, 7, 1000, 2000, 3000, 44, 55, 66, 77, 88, 99]])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def chunk_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """torch.chunk's split of n rows: (start, length) of chunk ``rank`` ((n, 0) past the last chunk)."""
    chunks = torch.arange(n).chunk(world)
    return (int(chunks[rank][0]), len(chunks[rank])) if rank < len(chunks) else (n, 0)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits


def edit_indices(p: torch.Tensor) -> torch.Tensor:
    """Global flat indices to zero: the 3 largest |w|, the first and the last element (on every rank)."""
    flat = p.detach().reshape(-1)
    return torch.unique(torch.cat([flat.abs().topk(min(3, flat.numel())).indices,
                                   torch.tensor([0, flat.numel() - 1])]))


def check_edits(model, ref, params, ref_params, base) -> dict:
    """Zero the same weights in the sharded model (through local()) and in the plain one: equal logits;
    then restore both: the shards' bits and the logits are back."""
    chosen = {n: edit_indices(ref_params[n]) for n in params}
    snapshot = {n: local(p).clone() for n, p in params.items()}
    saved, ref_saved = {}, {}
    with torch.no_grad():
        for n, idx in chosen.items():
            ref_flat = ref_params[n].view(-1)
            ref_saved[n] = ref_flat[idx].clone()
            ref_flat[idx] = 0.0
            off, flat = flat_offset(params[n]), local(params[n]).view(-1)
            mine = idx[(idx >= off) & (idx < off + flat.numel())] - off
            saved[n] = (mine, flat[mine].clone())
            flat[mine] = 0.0
    edited, ref_edited = logits(model), logits(ref)
    with torch.no_grad():
        for n, (mine, values) in saved.items():
            local(params[n]).view(-1)[mine] = values
            ref_params[n].view(-1)[chosen[n]] = ref_saved[n]
    return {"edit_equal": same_bits(edited, ref_edited), "edit_changed": not torch.equal(edited, base),
            "restore_logits_equal": same_bits(logits(model), base),
            "restore_bits_equal": all(same_bits(local(p), snapshot[n]) for n, p in params.items())}


def check_layout(params, ref_params, world: int, rank: int) -> dict:
    """Every parameter: a DTensor Shard(0) with torch.chunk's rows, those rows equal to the plain
    model's, and flat_offset/row_range agreeing with full_tensor()."""
    bad = {"not_dtensor": [], "rows": [], "values": [], "full": [], "flat": []}
    share = 0
    for n, p in params.items():
        ref = ref_params[n]
        if not (isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),)):
            bad["not_dtensor"].append(n)
            continue
        start, rows = row_range(p)
        if (start, rows) != chunk_rows(ref.shape[0], world, rank) or local(p).shape[0] != rows:
            bad["rows"].append(n)
        if not same_bits(local(p), ref[start:start + rows]):
            bad["values"].append(n)
        full = p.full_tensor()  # a collective: every rank, same order
        if not same_bits(full, ref.detach()):
            bad["full"].append(n)
        off = flat_offset(p)
        if not same_bits(local(p).reshape(-1), full.reshape(-1)[off:off + local(p).numel()]):
            bad["flat"].append(n)
        share += -(-ref.shape[0] // world) * (ref.numel() // ref.shape[0]) * ref.element_size()
    total = sum(p.numel() * p.element_size() for p in ref_params.values())
    return {**bad, "local_bytes": local_bytes(params.values()), "total_bytes": total, "padded_share": share,
            "row_bytes": sum(p.numel() // p.shape[0] * p.element_size() for p in ref_params.values())}


def check_gathered(model, ref) -> dict:
    """unsharded(block 0) yields the block's full weights; afterwards its parameters are shards again."""
    block, ref_block = decoder_blocks(model, "test")[0], decoder_blocks(ref, "test")[0]
    with unsharded(block) as full:
        ref_full = dict(ref_block.named_parameters())
        equal = full.keys() == ref_full.keys() and all(same_bits(full[n], ref_full[n].detach()) for n in full)
    return {"unsharded_equal": equal, "resharded": all(isinstance(p, DTensor) for p in block.parameters())}


def check_grad_sum(model, ref, world: int) -> float:
    """Every rank back-propagates the same loss: the sharded gradient is the exact SUM over ranks (W x
    one process's), which needs the divide factor 1 and the forced SUM shard() sets (gloo)."""
    p, q = model.get_input_embeddings().weight, ref.get_input_embeddings().weight
    p.requires_grad_(True)
    q.requires_grad_(True)
    try:
        model(input_ids=IDS).logits.float().square().mean().backward()
        ref(input_ids=IDS).logits.float().square().mean().backward()
        want = world * q.grad
        return float((p.grad.full_tensor() - want).abs().max() / want.abs().max())
    finally:
        p.requires_grad_(False)
        q.requires_grad_(False)
        p.grad = q.grad = None


def check_model(name: str, path: str, mesh, world: int, rank: int) -> dict:
    dtype = "bf16" if name.endswith("@bf16") else "fp32"
    if name.endswith("@whole"):
        model = load_whole(path, {}, dtype, mesh)
    else:
        model, tok = load_sharded(path, "cpu", dtype, mesh)
        assert tok.pad_token is not None
    # the plain model, as load_model loads it (without its tokenizer, which load_sharded's test covers)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    base, ref_base = logits(model), logits(ref)
    out = {"params_same_names": params.keys() == ref_params.keys(),
           "logits_equal": same_bits(base, ref_base),
           "logits_max_abs": float((base.float() - ref_base.float()).abs().max()),
           "frozen_eval": not any(p.requires_grad for p in model.parameters())
           and not any(m.training for m in model.modules()),
           "dtypes": sorted({str(p.dtype) for p in params.values()}),
           "buffers_equal": [n for n, b in model.named_buffers() if not same_bits(b, dict(ref.named_buffers())[n])]
           == [] and dict(model.named_buffers()).keys() == dict(ref.named_buffers()).keys(),
           "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
           **check_layout(params, ref_params, world, rank),
           **check_edits(model, ref, params, ref_params, base),
           **check_gathered(model, ref)}
    if name.startswith("llama") and dtype == "fp32":
        out["grad_sum_rel"] = check_grad_sum(model, ref, world)
    return out


def main(out: str, models: list[str]) -> None:
    torch.set_num_threads(1)
    with process_mesh("cpu") as mesh:
        world, rank = tdist.get_world_size(), tdist.get_rank()
        mine = {"rank": rank}
        for spec in models:
            name, path = spec.split("=", 1)
            mine[name] = check_model(name, path, mesh, world, rank)
        ranks = [None] * world
        tdist.all_gather_object(ranks, mine)
        if rank == 0:
            Path(out).write_text(json.dumps({"world": world, "ranks": ranks}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
