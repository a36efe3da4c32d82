"""In-place perturbations of selected weights that always restore the model bit-exactly.

A perturbation is a function ``(values, scale, generator) -> new values``: ``values`` are the
selected weights' original values (1-D, model dtype, on the model device); the result has the same
dtype.  Randomness comes only from the explicit CPU ``torch.Generator`` it is given (so draws are
the same on cpu and cuda).  :func:`perturbed` saves only the k original values, writes the new
ones, and puts the saved values back in a ``finally`` block: copying values is bit-exact, and no
full-model copy is ever made.

* ``zero``: ``w -> 0``.
* ``sign_flip``: ``w -> -scale * w`` (``--perturb-scale 1`` is a pure sign flip).
* ``gauss_noise``: ``w -> w + N(0, (scale * |w|)^2)``, noise drawn in fp32 then cast to the dtype.

``--perturb-prob p``: each selected weight is perturbed with probability p (seeded Bernoulli);
the number actually perturbed is reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from esa.selection import Selection
from esa.targets import Target, flat_view

PerturbFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
PERTURBATIONS: dict[str, PerturbFn] = {}


def register(name: str) -> Callable[[PerturbFn], PerturbFn]:
    def deco(fn: PerturbFn) -> PerturbFn:
        PERTURBATIONS[name] = fn
        return fn
    return deco


@register("zero")
def zero(values: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    return torch.zeros_like(values)


@register("sign_flip")
def sign_flip(values: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    return (values.float() * -scale).to(values.dtype)


@register("gauss_noise")
def gauss_noise(values: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(values.shape, generator=gen, dtype=torch.float32).to(values.device)
    v = values.float()
    return (v + noise * (scale * v.abs())).to(values.dtype)


@contextlib.contextmanager
def perturbed(targets: dict[str, Target], selection: Selection, kind: str, scale: float, prob: float,
              gen: torch.Generator) -> Iterator[dict]:
    """Perturb ``selection`` in place for the duration of the ``with`` block; always restore.

    Yields ``{"n_selected", "n_perturbed", "n_changed"}``: ``n_changed`` counts weights whose value
    really changed (sign-flipping or zeroing a weight that is exactly 0 changes nothing; a control
    made of such weights must be visible as a no-op, not mistaken for a robust one).
    """
    if kind not in PERTURBATIONS:
        raise NotImplementedError(f"perturbation {kind} is not implemented yet")
    fn = PERTURBATIONS[kind]
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    info = {"n_selected": selection.size, "n_perturbed": 0, "n_changed": 0}
    try:
        with torch.no_grad():
            for name, idx in selection.indices.items():
                if prob < 1.0:
                    idx = idx[torch.rand(len(idx), generator=gen) < prob]
                if len(idx) == 0:
                    continue
                flat = flat_view(targets[name].param)
                idx = idx.to(flat.device)
                original = flat[idx].clone()
                saved.append((flat, idx, original))  # saved before writing: restore covers a crash
                new = fn(original, scale, gen)
                flat[idx] = new
                info["n_perturbed"] += len(idx)
                info["n_changed"] += int((new != original).sum())
        yield info
    finally:
        with torch.no_grad():
            for flat, idx, original in reversed(saved):
                flat[idx] = original
