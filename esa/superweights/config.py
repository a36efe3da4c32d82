"""The super-weight finder's resolved configuration (built by :mod:`esa.cli.superweights`)."""

from __future__ import annotations

from dataclasses import dataclass

from esa.model.device import ModelSpec
from esa.superweights.detect import DEFAULT_MAX_SUPER_WEIGHTS, DEFAULT_PROMPT, DEFAULT_THRESHOLD, DETECT_WINDOWS

__all__ = ["DEFAULT_MAX_SUPER_WEIGHTS", "DEFAULT_PROMPT", "DEFAULT_THRESHOLD", "DETECT_WINDOWS", "SuperWeightConfig"]


@dataclass(frozen=True)
class SuperWeightConfig(ModelSpec):
    """The resolved flags (``*_explicit`` record what the user gave)."""

    data_file: str | None = None
    prompt: str = DEFAULT_PROMPT
    detect_on_data: bool = False
    threshold: float = DEFAULT_THRESHOLD
    max_super_weights: int = DEFAULT_MAX_SUPER_WEIGHTS
    eval_samples: int = 16
    max_length: int = 256
    batch_size: int = 4
    seed: int = 0
    out_dir: str | None = None
    dry_run: bool = False
    verbose: bool = False
