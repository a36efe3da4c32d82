"""Tiny random causal LMs of many Hugging Face families, built from their configs (transformers 5),
saved with the real SmolLM2 tokenizer so the command line can run them end to end.

Sizes are the smallest each family accepts (hidden 16, 2 layers, 4 experts of which 2 are routed),
so a run takes a second or two; weights are seeded and re-drawn with a large spread, as in
``conftest``, so scores are far from zero.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.realmodels import embedded_dir

COMMON = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
FAMILIES = {
    "llama": {}, "qwen2": {}, "gemma3_text": dict(head_dim=8), "phi3": {},
    "gpt2": dict(n_embd=16, n_layer=2, n_head=2, n_positions=64),
    "gpt_neox": {}, "opt": dict(ffn_dim=32, word_embed_proj_dim=16), "falcon": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=16, decoder_sparse_step=1),
    "qwen3_moe": dict(MOE, head_dim=8, decoder_sparse_step=1),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    # experts read as x @ W[e] ([expert, in, out], no is_transposed flag) and stacked per-expert biases
    # [expert, out] that no F.linear reads: their layout comes from how one forward reads them
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")


def build(family: str, vocab: int, seed: int = 0, **special) -> torch.nn.Module:
    """A tiny random ``family`` model in eval mode, every floating weight ~ N(0, 0.3^2) (norms ~1)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{"vocab_size": vocab, **COMMON, **FAMILIES[family], **special})
    model = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if p.ndim == 1 and "norm" in name.lower() else 0.3 * noise)
    return model.eval()


def family_dir(family: str, path: Path, seed: int = 0, **config) -> Path:
    """Save :func:`build`'s model with the real SmolLM2 tokenizer into ``path`` (once per path);
    ``config`` overrides the family's settings (e.g. ``tie_word_embeddings=True``)."""
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    build(family, len(tok), seed, **special, **config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
