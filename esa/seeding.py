"""Explicit, independent random streams per seed: no global RNG state is ever used.

Each random choice has its own named stream derived from ``(seed, crc32(stream name))`` through
numpy's SeedSequence, so adding a new random choice never shifts the draws of an existing one.
Streams: ``calibration`` (which windows are scored), ``random_k`` (the control draw),
``perturb:<condition>`` (Gaussian noise, bit-flip and --perturb-prob draws per condition),
``hutchinson`` (Rademacher probes) and ``mc_labels`` (hessian_diag's sampled labels).

:func:`set_random_seed` seeds the *global* generators (Python, NumPy, torch, CUDA) for analysis
scripts that import it from ``esa_runner``; nothing in the tool draws from them.

May import: esa.errors.
"""

from __future__ import annotations

import random
import re
import zlib

import numpy as np
import torch

from esa.errors import UsageError


def parse_seeds(text: str) -> tuple[int, ...]:
    """Parse ``"0,1,2"`` into ``(0, 1, 2)``; duplicates and non-integers are errors."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not re.fullmatch(r"-?\d+", p) for p in parts):
        raise UsageError(f"--seeds must be a comma-separated list of integers, got {text!r}")
    seeds = tuple(int(p) for p in parts)
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise UsageError(f"--seeds must be non-negative 64-bit integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds contains duplicates: {text!r}")
    return seeds


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator, torch and every CUDA device with ``seed``.

    For analysis scripts written against the runner's original design (``from esa_runner import
    set_random_seed``).  The tool itself never reads these global generators: its draws come from
    the named streams above, so its results do not depend on this call.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _seq(seed: int, stream: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, zlib.crc32(stream.encode())])


def numpy_rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(_seq(seed, stream))


def torch_generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for ``(seed, stream)``.  CPU by default, so draws are identical whatever device
    the model is on; a device generator (for sampling large tensors in place, e.g. Monte-Carlo
    labels) is deterministic per device type."""
    state = _seq(seed, stream).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1))
