"""In-place perturbations of selected weights that always restore the model bit-exactly.

A perturbation is a function ``(values, params, generator) -> new values``: ``values`` are the
selected weights' original values (1-D, model dtype, on the model device), ``params`` the
:class:`PerturbParams` (scale, bit index); the result has the same dtype.  Randomness comes only
from the explicit CPU ``torch.Generator`` it is given (so draws are the same on cpu and cuda).
:func:`perturbed` saves only the k original values *as raw bits* (an integer view of the storage),
writes the new ones, and puts the saved bits back in a ``finally`` block, so restore is bit-exact
even when a flip produced inf/NaN; no full-model copy is ever made.

* ``zero``: ``w -> 0``.
* ``sign_flip``: ``w -> -scale * w`` (``--perturb-scale 1`` is a pure sign flip).
* ``gauss_noise``: ``w -> w + N(0, (scale * |w|)^2)``, noise drawn in fp32 then cast to the dtype.
* ``bit_flip``: XOR one bit of the stored representation (fp32 viewed as int32, bf16/fp16 as
  int16).  Default bit: the most significant exponent bit (30 for fp32, 14 for bf16 and fp16),
  which multiplies |w| by 2^128 (fp32, bf16) or 2^16 (fp16), or shrinks it by as much.

``--perturb-prob p``: each selected weight is perturbed with probability p (seeded Bernoulli);
the number actually perturbed is reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from esa.errors import UsageError
from esa.experiment.selection import Selection
from esa.model import distributed
from esa.model.targets import Target, flat_offset, flat_view
from esa.registry import Registry

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}
DEFAULT_BIT = {torch.float32: 30, torch.bfloat16: 14, torch.float16: 14, torch.float64: 62}


@dataclass(frozen=True)
class PerturbParams:
    scale: float = 1.0
    bit_index: int | None = None  # None -> DEFAULT_BIT of the weight's dtype


def resolve_bit(dtype: torch.dtype, bit_index: int | None) -> int:
    """The bit that bit_flip will flip in ``dtype``; out-of-range indices are usage errors."""
    bits = torch.finfo(dtype).bits
    bit = DEFAULT_BIT[dtype] if bit_index is None else bit_index
    if not 0 <= bit < bits:
        raise UsageError(f"--bit-index {bit} is out of range for {dtype} weights (0..{bits - 1})")
    return bit


PerturbFn = Callable[[torch.Tensor, PerturbParams, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Perturbation:
    """A perturbation's function and its one-line definition (``--help``)."""

    name: str
    fn: PerturbFn
    help: str
    changes_zero: bool  # whether an exact 0.0 changes (controls only draw weights a perturbation changes)
    scaled: bool = False  # whether --perturb-scale (or ``name:scale`` in --perturb) changes what it does


PERTURBATIONS: Registry[Perturbation] = Registry("perturbation")


def perturbation(name: str, *, help: str, changes_zero: bool, aliases: tuple[str, ...] = (), scaled: bool = False
                 ) -> Callable[[PerturbFn], PerturbFn]:
    """Register the decorated function as perturbation ``name`` (a duplicate name is an error)."""
    def deco(fn: PerturbFn) -> PerturbFn:
        PERTURBATIONS.add(name, Perturbation(name, fn, help, changes_zero, scaled), aliases)
        return fn
    return deco


@perturbation("zero", aliases=("zeroing",), help="w -> 0", changes_zero=False)
def zero(values: torch.Tensor, params: PerturbParams, gen: torch.Generator) -> torch.Tensor:
    return torch.zeros_like(values)


@perturbation("sign_flip", aliases=("signflip", "flip_sign"), help="w -> -scale*w", changes_zero=False,
              scaled=True)
def sign_flip(values: torch.Tensor, params: PerturbParams, gen: torch.Generator) -> torch.Tensor:
    return (values.float() * -params.scale).to(values.dtype)


@perturbation("gauss_noise", aliases=("gaussian", "gauss", "noise"), help="w -> w + N(0, (scale*|w|)^2)",
              changes_zero=False, scaled=True)
def gauss_noise(values: torch.Tensor, params: PerturbParams, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(values.shape, generator=gen, dtype=torch.float32).to(values.device)
    v = values.float()
    return (v + noise * (params.scale * v.abs())).to(values.dtype)


@perturbation("bit_flip", aliases=("bitflip",), help="XOR one bit of the stored weight (--bit-index)",
              changes_zero=True)
def bit_flip(values: torch.Tensor, params: PerturbParams, gen: torch.Generator) -> torch.Tensor:
    bit = resolve_bit(values.dtype, params.bit_index)
    nbits = torch.finfo(values.dtype).bits
    mask = -(1 << bit) if bit == nbits - 1 else 1 << bit  # the sign bit as a signed integer
    return torch.bitwise_xor(values.view(INT_VIEW[values.dtype]), mask).view(values.dtype)


def _value_changed(new: torch.Tensor, old: torch.Tensor) -> int:
    """Weights whose value changed (-0.0 == 0.0 counts as unchanged; NaN vs a number as changed)."""
    return int(((new != old) & ~(new.isnan() & old.isnan())).sum())


@contextlib.contextmanager
def perturbed(targets: dict[str, Target], selection: Selection, kind: str, scale: float, prob: float,
              gen: torch.Generator, bit_index: int | None = None) -> Iterator[dict]:
    """Perturb ``selection`` in place for the duration of the ``with`` block; always restore.

    Yields ``{"n_selected", "n_perturbed", "n_changed"}``: ``n_changed`` counts weights whose value
    really changed (sign-flipping or zeroing a weight that is exactly 0 changes nothing; a control
    made of such weights must be visible as a no-op, not mistaken for a robust one).
    """
    fn = PERTURBATIONS[kind].fn
    params = PerturbParams(scale, bit_index)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    info = {"n_selected": selection.size, "n_perturbed": 0, "n_changed": 0}
    split = False
    try:
        with torch.no_grad():
            for name, idx in selection.indices.items():
                if prob < 1.0:
                    idx = idx[torch.rand(len(idx), generator=gen) < prob]
                if len(idx) == 0:
                    continue
                param = targets[name].param
                flat = flat_view(param)
                bits = flat.view(INT_VIEW[flat.dtype])
                # --shard fsdp: this rank holds flat indices [lo, lo + len(flat)); the function still sees every
                # selected value in selection order (a Gaussian draw follows it), the others' as zeros, and
                # only this rank's are written, so every weight gets exactly the value one process gives it
                lo, split = flat_offset(param), split or distributed.sharded(param)
                here = ((idx >= lo) & (idx < lo + flat.numel())).to(flat.device)
                local_idx = (idx.to(flat.device) - lo)[here]
                saved.append((bits, local_idx, bits[local_idx].clone()))  # raw bits, saved before writing
                original = torch.zeros(len(idx), dtype=flat.dtype, device=flat.device)
                original[here] = flat[local_idx]
                new = fn(original, params, gen)
                flat[local_idx] = new[here]
                info["n_perturbed"] += len(idx)
                info["n_changed"] += _value_changed(new[here], original[here])
        if split:  # each rank counted the changes of its own rows
            info["n_changed"] = int(distributed.all_reduce_floats([float(info["n_changed"])])[0])
        yield info
    finally:
        with torch.no_grad():
            for bits, idx, original_bits in reversed(saved):
                bits[idx] = original_bits
