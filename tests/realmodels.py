"""Helpers for tests that need a real tokenizer or the real embedded model.

``tiny_model_dir`` saves a tiny random Llama (2 layers, hidden 16) with the *real* SmolLM2
tokenizer into a directory, so the CLI can be driven end to end in a second or two.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from esa.models import convert_embedded

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def embedded_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted once per cache)."""
    return convert_embedded()


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
