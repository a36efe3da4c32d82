"""Explicit, independent random streams per seed: no global RNG state is ever used.

Each random choice has its own named stream derived from ``(seed, crc32(stream name))`` through
numpy's SeedSequence, so adding a new random choice never shifts the draws of an existing one.
Streams: ``calibration`` (which windows are scored), ``random_k`` (the control draw),
``perturb:<condition>`` (Gaussian noise, bit-flip and --perturb-prob draws per condition),
``hutchinson`` (Rademacher probes) and ``mc_labels`` (hessian_diag's sampled labels).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


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
