"""Helpers for tests that need a real tokenizer, the real embedded model or real text.

``tiny_model_dir`` saves a tiny random Llama (2 layers, hidden 16) with the *real* SmolLM2
tokenizer into a directory, so the CLI can be driven end to end in a second or two.

Text: tests that only need real English use ``CORPUS``, the bundled sample corpus that ships in
the repository.  Tests whose point is WikiText-2 itself (the baseline against an independent loop,
checks of the real model) call :func:`wikitext2_path`, which reads the path of WikiText-2's raw
test split (``wiki.test.raw``) from the environment variable ``ESA_WIKITEXT2_RAW`` and skips the
test, with a reason saying how to enable it, when the variable is unset.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from esa.model.loading import convert_embedded

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "esa" / "resources" / "sample_corpus.txt"  # bundled real English prose (~14,700 words)
WIKITEXT2_ENV = "ESA_WIKITEXT2_RAW"


def wikitext2_path() -> Path:
    """The WikiText-2 raw test split named by ``ESA_WIKITEXT2_RAW`` (a file, or a folder holding
    ``wiki.test.raw``).  Unset: the calling test is skipped.  Set but not a file: the test fails,
    because a user who set the variable asked for these tests to run."""
    value = os.environ.get(WIKITEXT2_ENV)
    if not value:
        pytest.skip(f"needs WikiText-2: set {WIKITEXT2_ENV} to the path of its raw test split wiki.test.raw")
    path = Path(value)
    path = path / "wiki.test.raw" if path.is_dir() else path
    if not path.is_file():
        pytest.fail(f"{WIKITEXT2_ENV}={value!r} is not a file (nor a folder holding wiki.test.raw)")
    return path


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
