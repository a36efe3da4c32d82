"""Device/dtype resolution and loading the embedded model (cached copy == the GGUF itself)."""

from __future__ import annotations

import pytest
import torch

from esa.errors import UsageError
from esa.model.device import resolve_device
from esa.model.introspect import assert_eval
from esa.model.loading import embedded_gguf_path, load_model


def test_default_cuda_falls_back_to_cpu_fp32_with_warnings():
    c = resolve_device("cuda", False, "bf16", False, cuda_available=False)
    assert (c.device, c.dtype) == ("cpu", "fp32")
    assert len(c.warnings) == 2 and "falling back" in c.warnings[0] and "fp32" in c.warnings[1]


def test_explicit_choices_are_never_overridden():
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda", True, "bf16", False, cuda_available=False)
    c = resolve_device("cpu", True, "bf16", True, cuda_available=False)
    assert (c.device, c.dtype, c.warnings) == ("cpu", "bf16", ())
    c = resolve_device("cuda", False, "bf16", False, cuda_available=True)
    assert (c.device, c.dtype, c.warnings) == ("cuda", "bf16", ())
    c = resolve_device("auto", False, "fp16", True, cuda_available=False)
    assert (c.device, c.dtype) == ("cpu", "fp16")


def test_dtype_flag_is_honoured():
    model, _ = load_model("smollm2-135m", "cpu", "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_eval(model)
    assert not any(p.requires_grad for p in model.parameters())


def test_cached_conversion_matches_the_gguf_file():
    """The safetensors cache must be the same model as loading the .gguf directly."""
    cached, tok = load_model("smollm2-135m", "cpu", "fp32")
    direct, tok2 = load_model(str(embedded_gguf_path()), "cpu", "fp32")
    assert cached.config.tie_word_embeddings and cached.lm_head.weight is cached.model.embed_tokens.weight
    sd1, sd2 = cached.state_dict(), direct.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    assert ids.tolist() == tok2("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)
