"""Shared fixtures: tiny random Llama and GPT-2 models built in code, and token windows.

The models are left as ``esa.model.loading.load_model`` leaves a real one: eval mode, every parameter
``requires_grad=False``.  Weights are re-drawn with a larger spread than the HF default (std 0.02)
so that gradients, activations and scores are far from zero and differences between a correct and
a wrong implementation are large compared with float rounding.  Everything is seeded.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# make ``import esa`` work under a plain ``pytest`` run from any directory (the package is not installed)
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

VOCAB = 64
N_WINDOWS = 6
WINDOW_LEN = 12


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter (tied ones once): weights N(0, 0.3^2), norm scales 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied parameter is listed once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _randomize(model, seed)
    return _finish(model)


def make_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                     eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    _randomize(model, seed)
    return _finish(model)


MODEL_FACTORIES = {"llama": make_llama, "gpt2": make_gpt2}


@pytest.fixture
def single_thread():
    """Run torch on one intra-op thread for the test, then restore the previous setting.

    The models are tiny, so threads only add overhead, and on a small shared machine a busy
    neighbour process makes torch's spinning worker threads 10-100x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def wikitext2() -> Path:
    """Path of WikiText-2's raw test split from ESA_WIKITEXT2_RAW; the test is skipped without it."""
    from tests.realmodels import wikitext2_path

    return wikitext2_path()


@pytest.fixture
def llama() -> torch.nn.Module:
    return make_llama()


@pytest.fixture
def gpt2() -> torch.nn.Module:
    return make_gpt2()


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def tiny_model(request) -> torch.nn.Module:
    """Each test using this runs once on the tiny Llama and once on the tiny GPT-2."""
    return MODEL_FACTORIES[request.param]()


@pytest.fixture
def windows() -> torch.Tensor:
    """``[6, 12]`` int64 token windows, fixed."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (N_WINDOWS, WINDOW_LEN), generator=gen)


def _rms_norm64(self, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm without its internal fp32 upcast (same formula, in the input dtype)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def to_double(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy (ties preserved), eval mode, grads off: the reference model.

    HF Llama computes RMSNorm and the eager attention softmax in fp32 whatever the dtype, which
    leaves ~1e-8 noise in the loss and ruins finite differences; the copy uses a float64 RMSNorm
    and SDPA attention (float64 throughout) instead.  GPT-2's eager path is float64 already.
    """
    m = copy.deepcopy(model).double()
    if getattr(m.config, "model_type", None) == "llama":
        for mod in m.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.forward = types.MethodType(_rms_norm64, mod)
        m.set_attn_implementation("sdpa")
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def window_gradients(model64: torch.nn.Module, params: list[torch.Tensor], windows: torch.Tensor):
    """Yield, window by window, the float64 gradients of that window's mean next-token NLL w.r.t. ``params``
    (parameters of ``model64``; grads are switched on for them)."""
    for p in params:
        p.requires_grad_(True)
    for w in range(len(windows)):
        window = windows[w:w + 1]
        logp = torch.log_softmax(model64(input_ids=window, use_cache=False).logits[0, :-1].double(), dim=-1)
        nll = -logp[torch.arange(window.shape[1] - 1), window[0, 1:]].mean()
        yield torch.autograd.grad(nll, params)


def mean_token_nll64(model64: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over all ``W * (L - 1)`` predicted tokens, float64, one forward call."""
    logits = model64(input_ids=windows, use_cache=False).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return -picked.mean()
