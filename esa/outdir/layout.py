"""Naming and creating an out-dir: a default name per tool, and it must be writable before any work starts."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from esa.errors import UsageError


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and prove a file can be written there (raises OSError otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
    os.close(fd)
    os.unlink(tmp)


def prepare_out_dir(out_dir: Path) -> Path:
    """``check_writable`` for the CLIs: an unwritable --out-dir is bad input (UsageError)."""
    try:
        check_writable(out_dir)
    except OSError as exc:
        raise UsageError(f"--out-dir {str(out_dir)!r} is not writable: {exc.strerror or exc}") from None
    return out_dir


def model_slug(model: str) -> str:
    """A filesystem-safe short name for a model id, directory or .gguf path (for default out-dirs)."""
    name = Path(model).name if model.endswith(".gguf") else model
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def default_out_dir(*parts: str) -> Path:
    """``outputs/<part>_<part>_..._<timestamp>``: every tool's default --out-dir."""
    return Path("outputs") / ("_".join(parts) + time.strftime("_%Y%m%d-%H%M%S"))
