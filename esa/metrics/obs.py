"""``obs``: the Optimal Brain Surgeon / SparseGPT saliency (Frantar & Alistarh 2023, "SparseGPT:
Massive Language Models Can Be Accurately Pruned in One-Shot"), forward passes only:

    score_ij = w_ij² / [H⁻¹]_jj,   H = 2·XᵀX / n + λ·mean(diag H)·I

per linear input, X ``[n, in]`` the module's inputs over all n calibration tokens.  λ =
``--obs-damp`` (0.01 as in SparseGPT); the inverse's diagonal comes from a Cholesky factor.  When
H is not positive definite after dampening, λ is raised tenfold until it is, and the λ used is
recorded per tensor in sensitivity_stats.json (never a crash, never NaN).

* Linear ``[out, in]`` (column j scaled) and HF Conv1D ``[in, out]`` (row j): H over the module input.
* Embeddings: the input is a one-hot token vector, so H is diagonal, ``2·count_v / n`` (+ λ): exact.
* A tied weight sums the score of each use.
* Fused experts and routers (read inside their module's forward) are not scored by obs yet: they
  are excluded with a warning and listed in the coverage record.

Memory: one float64 ``in × in`` matrix per Linear/Conv1D use, Σ in² · 8 bytes (float64 because
the inverse amplifies rounding by H's condition number; about 1 GB for SmolLM2-135M, 78 GB for
Llama-3.1-8B, so score a subset with --include there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from esa.metrics.activation import broadcast_ids, hooked_use
from esa.metrics.registry import Collector, metric
from esa.model import distributed
from esa.model.targets import Target
from esa.options import Option, finite_non_negative


def can_score(t: Target) -> str | None:
    if all(hooked_use(u) for u in t.uses) and t.uses:
        return None
    return "obs covers Linear, Conv1D and embedding inputs; fused experts and routers are not supported yet"


def inverse_diagonal(h_sum: torch.Tensor, n: int, damp: float) -> tuple[torch.Tensor, float]:
    """diag((2·h_sum/n + λ·mean(diag)·I)⁻¹) in float64 via Cholesky, and the λ used (raised 10x until
    the matrix is positive definite)."""
    h = h_sum.double() * (2.0 / n)
    mean_diag = float(h.diagonal().mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    lam = damp
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    while True:
        chol, info = torch.linalg.cholesky_ex(h + lam * scale * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol).diagonal(), lam
        lam = lam * 10 if lam > 0 else 1e-8


@metric("obs", aliases=("sparsegpt", "optimal_brain_surgeon"), needs=("forward",), can_score=can_score,
        help="w_ij^2 / [H^-1]_jj with H = 2 X^T X / n + damp (--obs-damp) per linear input (Optimal Brain Surgeon "
             "saliency as in SparseGPT, Frantar & Alistarh 2023)",
        unit="w²/[H⁻¹]ⱼⱼ (weight units² × activation units²; OBS)",
        options=(Option("obs_damp", 0.01, "obs: dampening added to H as a fraction of mean(diag H) (SparseGPT's "
                        "0.01); raised tenfold (and recorded) while H is not positive definite", parse=float,
                        check=finite_non_negative),))
class OBS(Collector):
    observes = True

    @contextlib.contextmanager
    def observe(self, model, targets) -> Iterator[None]:
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.n_tokens = 0
        self.last: tuple[torch.Tensor, int, torch.Tensor] | None = None  # gram's cache: input, version, XᵀX
        self.batch_shape: list[torch.Size] = []  # the forward in progress (position ids [1, L] count once per window)
        sums, batch_shape = self.sums, self.batch_shape

        def make_hook(key: tuple[str, int], kind: str, size: int):
            def hook(module, inputs, output) -> None:
                x = inputs[0]
                if kind == "embedding":  # one-hot inputs: X^T X is diagonal, the token counts
                    ids = broadcast_ids(x, batch_shape[-1])
                    sums[key].add_(torch.bincount(ids.flatten(), minlength=size).to(sums[key].dtype))
                else:
                    sums[key].add_(self.gram(x))
            return hook

        handles = []
        try:
            for t in targets:
                for i, use in enumerate(t.uses):
                    size = t.shape[use.in_axis]
                    shape = (size,) if use.kind == "embedding" else (size, size)
                    # float64: the inverse amplifies rounding by H's condition number, so fp32 sums would make
                    # the scores depend on the batch order (and on the number of ranks) beyond fp32 rounding
                    sums[(t.name, i)] = torch.zeros(shape, dtype=torch.float64, device=t.param.device)
                    handles.append(use.module.register_forward_hook(make_hook((t.name, i), use.kind, size)))
            yield
        finally:
            self.last = None
            for h in handles:
                h.remove()

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """XᵀX (float64) of one module input; q/k/v (gate/up) projections read the same tensor, so
        its product is made once and reused while the tensor is unchanged (same values, same sums)."""
        if self.last is not None and self.last[0] is x and self.last[1] == x._version:
            return self.last[2]
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        self.last = (x, x._version, flat.T @ flat)
        return self.last[2]

    def before_batch(self, batch) -> None:
        self.last = None  # the previous forward's inputs are gone
        self.n_tokens += batch.numel()
        self.batch_shape.append(batch.shape)

    def reduce(self) -> None:
        (self.n,) = distributed.all_reduce_floats([float(self.n_tokens)])
        distributed.all_reduce_sum(self.sums.values())

    def score(self, t, grads):
        damp, n = self.ctx.obs_damp, self.n
        w2 = t.local().float().square()
        score = None
        for i, use in enumerate(t.uses):
            h_sum = self.sums.pop((t.name, i))  # freed as soon as its tensor is scored
            if use.kind == "embedding":
                h = h_sum.double() * (2.0 / n)
                lam = damp * float(h.mean()) if float(h.mean()) > 0 else damp
                inv = 1.0 / (h + lam)
                used = damp
            else:
                inv, used = inverse_diagonal(h_sum, int(n), damp)
            self.ctx.extra_stats.setdefault(t.name, {}).setdefault("obs_damp", []).append(used)
            inv = inv.float()
            part = w2 / t.local_rows(inv[None, :] if use.in_axis == 1 else inv[:, None])
            score = part if score is None else score.add_(part)
        return score
