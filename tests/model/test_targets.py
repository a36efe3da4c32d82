"""esa.model.targets.find_targets: which weights are targets, tying, input axes, include/exclude."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esa.errors import UsageError
from esa.model.targets import find_targets, flat_view
from esa.naming import layer_index

pytestmark = pytest.mark.usefixtures("single_thread")


def _expected(model: nn.Module) -> dict[str, tuple[list[tuple[str, str, int]], list[str]]]:
    """Independent enumeration: canonical name -> (uses (module, kind, in_axis), aliases)."""
    kinds = []
    for mname, m in model.named_modules():
        cls = type(m).__name__
        if cls == "Linear":
            kinds.append((mname, m, "linear", 1))
        elif cls == "Conv1D":
            kinds.append((mname, m, "conv1d", 0))
        elif cls == "Embedding":
            kinds.append((mname, m, "embedding", 0))
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, tuple[list, list]] = {}
    seen: set[int] = set()
    for n in all_names:
        p = params[n]
        if id(p) in seen:
            continue
        seen.add(id(p))
        uses = [(mname, kind, ax) for mname, m, kind, ax in kinds if m.weight is p]
        if uses:
            out[n] = (uses, [a for a in all_names if params[a] is p])
    return out


def test_llama_targets_complete(llama):
    targets = find_targets(llama)
    names = [t.name for t in targets]
    expected = _expected(llama)
    assert names == list(expected)  # named_parameters order, tied weight once
    # 2 layers x 7 projections + the tied embedding; no norm weights
    assert len(names) == 15
    assert not any("norm" in n for n in names)
    assert "lm_head.weight" not in names
    for t in targets:
        uses, aliases = expected[t.name]
        assert [(u.module_name, u.kind, u.in_axis) for u in t.uses] == uses
        assert list(t.aliases) == aliases
        assert t.param is dict(llama.named_parameters())[t.name]
        assert t.shape == tuple(t.param.shape) and t.numel == t.param.numel()
        for u in t.uses:
            assert u.module is dict(llama.named_modules())[u.module_name]


def test_llama_tied_embedding_has_both_uses(llama):
    tied = [t for t in find_targets(llama) if t.name == "model.embed_tokens.weight"]
    assert len(tied) == 1
    t = tied[0]
    assert t.aliases == ("model.embed_tokens.weight", "lm_head.weight")
    assert [(u.module_name, u.kind, u.in_axis) for u in t.uses] == [
        ("model.embed_tokens", "embedding", 0), ("lm_head", "linear", 1)]
    assert t.uses[1].module is llama.lm_head


def test_llama_linear_in_axis(llama):
    t = {t.name: t for t in find_targets(llama)}["model.layers.0.mlp.down_proj.weight"]
    (u,) = t.uses
    assert (u.kind, u.in_axis) == ("linear", 1)
    assert t.shape[u.in_axis] == llama.model.layers[0].mlp.down_proj.in_features == 32


def test_gpt2_targets_complete(gpt2):
    targets = find_targets(gpt2)
    names = [t.name for t in targets]
    expected = _expected(gpt2)
    assert names == list(expected)
    # wte (tied), wpe, and 4 Conv1D per block; no biases, no layer norms
    assert len(names) == 2 + 2 * 4
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert not any(n.endswith("bias") or ".ln_" in n for n in names)
    for t in targets:
        uses, aliases = expected[t.name]
        assert [(u.module_name, u.kind, u.in_axis) for u in t.uses] == uses
        assert list(t.aliases) == aliases


def test_gpt2_conv1d_is_transposed(gpt2):
    t = {t.name: t for t in find_targets(gpt2)}["transformer.h.0.mlp.c_fc.weight"]
    (u,) = t.uses
    assert (u.kind, u.in_axis) == ("conv1d", 0)
    assert t.shape == (16, 64)  # [in, out]
    # the input axis really is the one the module multiplies by its input
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = u.module(x)
    torch.testing.assert_close(y, x @ t.param + u.module.bias)


def test_gpt2_tied_and_position_embedding(gpt2):
    by_name = {t.name: t for t in find_targets(gpt2)}
    wte = by_name["transformer.wte.weight"]
    assert wte.aliases == ("transformer.wte.weight", "lm_head.weight")
    assert [(u.module_name, u.kind, u.in_axis) for u in wte.uses] == [
        ("transformer.wte", "embedding", 0), ("lm_head", "linear", 1)]
    wpe = by_name["transformer.wpe.weight"]
    assert [(u.kind, u.in_axis) for u in wpe.uses] == [("embedding", 0)]
    assert wpe.shape == (32, 16)


def test_include_filter(llama):
    names = [t.name for t in find_targets(llama, include=(r"mlp\.(up|down)_proj",))]
    assert names == [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("up", "down")]


def test_include_matches_any_alias(llama):
    # lm_head.weight is only an alias of the tied embedding: including it keeps the embedding
    names = [t.name for t in find_targets(llama, include=("^lm_head",))]
    assert names == ["model.embed_tokens.weight"]


def test_exclude_filter(llama):
    names = [t.name for t in find_targets(llama, exclude=(r"self_attn", r"layers\.1\."))]
    assert names == ["model.embed_tokens.weight"] + [
        f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]


def test_exclude_matches_any_alias(llama):
    names = [t.name for t in find_targets(llama, exclude=("lm_head",))]
    assert "model.embed_tokens.weight" not in names
    assert len(names) == 14


def test_include_and_exclude_combined(gpt2):
    names = [t.name for t in find_targets(gpt2, include=(r"\.h\.0\.",), exclude=("c_proj",))]
    assert names == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"]


@pytest.mark.parametrize("kw", [{"include": ("no_such_weight",)}, {"exclude": (".",)},
                                {"include": ("mlp",), "exclude": ("layers",)}])
def test_usage_error_when_nothing_left(llama, kw):
    with pytest.raises(UsageError, match="no target weights"):
        find_targets(llama, **kw)


def test_bad_regex_is_usage_error(llama):
    with pytest.raises(UsageError, match="not a valid regular expression"):
        find_targets(llama, include=("(",))


def test_flat_view_shares_storage_row_major(llama):
    t = find_targets(llama)[1]
    v = flat_view(t.param)
    assert v.shape == (t.numel,)
    r, c = 3, 5
    assert v[r * t.shape[1] + c] == t.param[r, c]
    v[r * t.shape[1] + c] = 42.0
    assert t.param[r, c] == 42.0


def test_layer_index():
    assert layer_index("model.layers.11.mlp.up_proj.weight") == 11
    assert layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_index("model.embed_tokens.weight") is None
