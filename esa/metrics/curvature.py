"""Curvature metrics: Hutchinson's Hessian diagonal and the Gauss-Newton (true Fisher) diagonal.

Both describe the Hessian of the same loss as ``grad_x_weight``: the mean next-token NLL over all
N predicted tokens of the calibration windows, ``L = (1/N) sum NLL``.  Accumulation is fp32.

* ``hutchinson_diag``: ``diag(H) ~= (1/P) sum_p z_p * (H z_p)`` with Rademacher probes ``z_p``
  (+-1 on every target weight, drawn from the seed's ``hutchinson:<probe>`` streams on the model's
  device, so deterministic per device type).  This is unbiased for
  every diagonal entry; its variance per probe is ``sum_{j != i} H_ij^2`` (over target weights j).
  Each probe is one Hessian-vector product covering all targets at once: per batch, ``g = dL/dw``
  with ``create_graph=True`` once, then per probe a second backward of ``g`` against ``z``.  Double backward
  needs differentiable attention, so the model runs with eager attention during scoring.
  Score = ``|estimate|``; the signed estimate's summary (mean, min, max, share negative) is kept in
  sensitivity_stats.json, because the Hessian of a non-convex loss has negative diagonal entries.
  Default probes: 16 (see README for the error measured against the exact diagonal).
* ``hessian_diag``: diagonal of the Gauss-Newton matrix ``(1/N) sum_t J_t^T (diag p_t - p_t p_t^T) J_t``
  (J_t = Jacobian of token t's logits), the positive-semidefinite part of the Hessian of the
  cross-entropy; for softmax outputs it equals the true Fisher.  Estimated by Monte Carlo: labels
  ``y_t ~ p_t`` are sampled from the model's own predictive distribution (seed stream
  ``mc_labels:<window index>``), and ``E_y[(d/dw sum_t log p(y_t))^2] = sum_t GN_t`` because the per-token score
  functions have zero mean and independent labels.  So the estimate is
  ``(1/(N*S)) sum_windows sum_{s<S} (d/dw sum_t log p(y^s_t | x))^2`` with S = --curvature-samples
  draws per window (one forward, S backward passes).  Unlike ``grad_squared`` (empirical Fisher:
  the data's labels), it does not depend on which token actually came next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from esa.metrics.grads import grad_accumulators
from esa.metrics.registry import PER_WINDOW_SQUARES, Collector, metric
from esa.model import distributed
from esa.model.forward import batches, nll_sum
from esa.model.introspect import input_device, using_implementation
from esa.options import Option, positive
from esa.seeding import torch_generator

if TYPE_CHECKING:
    from esa.model.targets import Target


def eager_attention(model: torch.nn.Module):
    """Run with eager attention (double-backward-safe) inside the block; restored on exit."""
    return using_implementation(model, "attn", "eager")


@contextlib.contextmanager
def _grads_on(targets: list[Target]) -> Iterator[None]:
    try:
        for t in targets:
            t.param.requires_grad_(True)
        yield
    finally:
        for t in targets:
            t.param.requires_grad_(False)
            t.param.grad = None


def _rademacher(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    z = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8, device=gen.device)
    return (z * 2 - 1).to(device=like.device, dtype=like.dtype)


def hutchinson_signed(model, targets: list[Target], windows: torch.Tensor, batch_size: int, probes: int,
                      seed: int, n_windows: int | None = None) -> dict[str, torch.Tensor]:
    """The signed Hutchinson estimate of diag(H) (fp32), ``probes`` Rademacher probes.

    ``z * (H z)`` is linear in H = sum_b H_b over batches, so each batch's gradient graph is built
    once and reused by every probe (``retain_graph``); probe p's vector is regenerated per batch
    from its own generator ``(seed, "hutchinson:p")`` instead of keeping P model-sized vectors.
    Cost per batch: one forward+backward with ``create_graph`` plus one Hessian-vector product
    (a second backward through that graph, covering all targets) per probe.  ``n_windows`` is the
    number of windows over all ranks (default ``len(windows)``); every rank draws the same probes,
    so the per-rank sums add up to the single-process estimate.
    """
    n_tokens = (n_windows or windows.shape[0]) * (windows.shape[1] - 1)
    device = input_device(model)
    params = [t.param for t in targets]
    est = [torch.zeros(t.shape, dtype=torch.float32, device=t.param.device) for t in targets]
    with eager_attention(model), _grads_on(targets):
        for batch in batches(windows, batch_size, device, "hutchinson"):
            grads = torch.autograd.grad(nll_sum(model, batch) / n_tokens, params, create_graph=True)
            for probe in range(probes):
                gen = torch_generator(seed, f"hutchinson:{probe}", device=device)
                z = [_rademacher(t.shape, gen, t.param) for t in targets]
                hz = torch.autograd.grad(grads, params, grad_outputs=z, retain_graph=probe < probes - 1)
                for e, zi, h in zip(est, z, hz):
                    e.addcmul_(zi.float(), h.float())
                del z, hz
            del grads
    distributed.all_reduce_sum(est)
    return {t.name: e.div_(probes) for t, e in zip(targets, est)}


HVP_ON_SHARDS = ("its Hessian-vector products take torch.autograd.grad with respect to the weights, but on FSDP "
                 "shards the forward reads gathered copies, so the sharded weights are not in the graph")


@metric("hutchinson_diag", aliases=("hutchinson",), needs=("forward", "backward", "hvp"),
        help="|mean_z z*(Hz)|, Rademacher probes (--hutchinson-samples), H = Hessian of the mean token loss",
        unit="|diag H| (nats / weight unit²; Hutchinson)",
        options=(Option("hutchinson_samples", 16, "Rademacher probes for hutchinson_diag (one Hessian-vector "
                        "product each)", check=positive),),
        not_on_shards=HVP_ON_SHARDS)
class HutchinsonDiag(Collector):
    def own_passes(self, model, targets, windows, batch_size) -> None:
        ctx = self.ctx
        self.signed = hutchinson_signed(model, targets, windows, batch_size, ctx.hutchinson_samples, ctx.seed,
                                        ctx.n_windows)  # summed over ranks already
        for name, e in self.signed.items():
            ctx.extra_stats[name] = {"signed_estimate": {
                "mean": float(e.double().mean()), "min": float(e.min()), "max": float(e.max()),
                "share_negative": float((e < 0).double().mean()), "probes": ctx.hutchinson_samples}}

    def score(self, t, grads):
        return self.signed.pop(t.name).abs_()


@metric("hessian_diag", aliases=("hessian",), needs=("forward", "backward", "per_window"),
        help="Gauss-Newton (true Fisher) diagonal (1/N) sum_t J_t^T (diag p_t - p_t p_t^T) J_t, estimated with "
             "labels sampled from the model (--curvature-samples per window)",
        unit="Gauss–Newton diag (nats / weight unit²)",
        options=(Option("curvature_samples", 1, "Monte-Carlo label draws per calibration window for hessian_diag",
                        check=positive),),
        not_on_shards=PER_WINDOW_SQUARES)
class HessianDiag(Collector):
    def own_passes(self, model, targets, windows, batch_size) -> None:
        ctx, samples = self.ctx, self.ctx.curvature_samples
        self.n = ctx.n_windows * (windows.shape[1] - 1) * samples
        device = input_device(model)
        with grad_accumulators(targets, square=True) as acc:
            for i, window in enumerate(batches(windows, 1, device, "hessian_diag")):
                # one label stream per window (by its index over all ranks), so that a window's labels
                # do not depend on which rank scores it or on the windows before it
                logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
                # on the logits' device: under a device map the head may not sit where the inputs went
                gen = torch_generator(ctx.seed, f"mc_labels:{ctx.window_offset + i}", device=logits.device)
                probs = torch.softmax(logits.detach(), dim=-1)
                for s in range(samples):
                    y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                    F.cross_entropy(logits, y, reduction="sum").backward(retain_graph=s < samples - 1)
                del logits, probs
        self.acc = acc

    def reduce(self) -> None:
        distributed.all_reduce_sum(self.acc.values())

    def score(self, t, grads):
        return self.acc.pop(t.name).div_(self.n)
