"""The shared start of the stand-alone tools (baseline runner, super-weight finder): out-dir,
device, manifest and model, in that order, with a failed load recorded in the manifest."""

from __future__ import annotations

import logging
from pathlib import Path

from esa.model import loading
from esa.model.device import resolve_device
from esa.outdir.layout import prepare_out_dir
from esa.outdir.manifest import Manifest


def start_tool(out_dir: Path, model: str, device: str, device_explicit: bool, dtype: str, dtype_explicit: bool):
    """The shared start of the stand-alone tools (baseline runner, super-weight finder): check and
    create ``out_dir``, resolve the device (warnings logged), open the manifest and load the model
    inside its ``load_model`` phase.  Returns ``(out_dir, choice, manifest, model, tokenizer)``; a
    failed load is recorded in the manifest.  transformers is imported by the load, not by this module."""
    log = logging.getLogger("esa")
    out_dir = prepare_out_dir(out_dir)
    choice = resolve_device(device, device_explicit, dtype, dtype_explicit)
    for w in choice.warnings:
        log.warning(w)
    manifest = Manifest(out_dir)
    with manifest.recording(), manifest.phase("load_model"):
        log.info("loading model %s on %s in %s", model, choice.device, choice.dtype)
        net, tok = loading.load_model(model, choice.device, choice.dtype)
    return out_dir, choice, manifest, net, tok
