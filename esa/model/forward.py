"""Token scoring and perplexity on fixed evaluation windows: ``exp(sum NLL / number of scored tokens)``.

One implementation scores tokens for every evaluation in the project: :func:`score_tokens` runs the
model on a batch of windows and returns, for each scored target token, its NLL, whether the top-1
prediction was right and the top-1 probability, all from fp32 logits.  :func:`perplexity` (ESA
runner's baseline and perturbed conditions) and :mod:`esa.baseline.evaluate` (the baseline runner) both
call it and sum NLLs with :class:`NLLTotal`, so the same windows in the same batches give
bit-identical perplexities.

A window ``[L]`` predicts its tokens ``n_context .. L-1``; ``perplexity`` uses ``n_context = 1``
(every window predicts its ``L - 1`` next tokens; the first token has no context).  Per-token NLLs
are fp32 and summed in float64 per batch, then across batches, so the result does not depend on
the batch size beyond float rounding.  An infinite NLL gives perplexity ``inf``; a NaN NLL is an
error (:class:`NaNLossError`), never a number.

:func:`nll_sum` (fp32, differentiable) serves the gradient metrics and stays separate: it must
keep the autograd graph, which the no-grad scoring routine drops.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from esa.model import distributed
from esa.model.introspect import assert_eval, input_device


class NaNLossError(FloatingPointError):
    """The model produced a NaN loss: there is no meaningful perplexity."""


def batches(windows: torch.Tensor, batch_size: int, device: torch.device | str, desc: str
            ) -> Iterator[torch.Tensor]:
    """Yield ``[B, L]`` slices of ``windows`` on ``device`` with a tqdm bar (hidden off a TTY)."""
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False, disable=None):
        yield windows[i:i + batch_size].to(device)


def nll_sum(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32 scalar) of ``input_ids`` ``[B, L]``: ``B * (L - 1)`` tokens.

    The cross-entropy is taken row by row from fp32 logits so that the fp32 copy of the logits
    never exceeds one window (matters for 128k-token vocabularies).
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    labels = input_ids.to(logits.device)  # under a device map the head may sit on another device
    total = logits.new_zeros((), dtype=torch.float32)
    for b in range(input_ids.shape[0]):
        total = total + F.cross_entropy(logits[b, :-1].float(), labels[b, 1:], reduction="sum")
    return total


@dataclass(frozen=True)
class TokenScores:
    """Per scored token, flattened window by window in batch order (all on the model's device).

    ``nll``: float32 ``[N]``, ``-log p(target)``; ``correct``: bool ``[N]``, whether the argmax
    of the logits (first index on ties) is the target; ``confidence``: float32 ``[N]``, the top-1
    probability ``max_v p(v)``.
    """

    nll: torch.Tensor
    correct: torch.Tensor
    confidence: torch.Tensor


def score_tokens(model: torch.nn.Module, input_ids: torch.Tensor, n_context: Sequence[int]) -> TokenScores:
    """Score windows ``input_ids`` ``[B, L]`` (int64, no padding) in one forward pass.

    In window ``b`` the first ``n_context[b]`` (>= 1) tokens are context only: the targets are
    ``input_ids[b, n_context[b]:]``, each predicted from the logits one position earlier.  The
    log-softmax is taken row by row in fp32, so the fp32 copy of the logits never exceeds one
    window (matters for 128k-token vocabularies and bf16 models).  Call under ``torch.no_grad()``.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    labels = input_ids.to(logits.device)  # under a device map the head may sit on another device
    nll, correct, conf = [], [], []
    for b in range(input_ids.shape[0]):
        k = int(n_context[b])
        if not 1 <= k < input_ids.shape[1]:
            raise ValueError(f"n_context must be in [1, {input_ids.shape[1] - 1}], got {k}")
        target = labels[b, k:]
        logp = torch.log_softmax(logits[b, k - 1:-1].float(), dim=-1)  # [T, V] predicts target [T]
        nll.append(-logp.gather(-1, target[:, None]).squeeze(-1))
        top_logp, top = logp.max(dim=-1)  # torch.max returns the first index among ties
        correct.append(top == target)
        conf.append(top_logp.exp())
    return TokenScores(torch.cat(nll), torch.cat(correct), torch.cat(conf))


class NLLTotal:
    """Sum of per-token NLLs in float64, batch by batch; the perplexity of everything added.

    Both :func:`perplexity` and the baseline runner accumulate through this class, so the same
    batches give the same float, bit for bit.
    """

    def __init__(self) -> None:
        self.nll_sum = 0.0
        self.tokens = 0

    def add(self, scores: TokenScores) -> None:
        self.nll_sum += float(scores.nll.double().sum())
        self.tokens += scores.nll.numel()

    def result(self) -> dict:
        """``{"ppl", "mean_nll", "nll_sum", "tokens"}``; raises :class:`NaNLossError` on a NaN loss."""
        if math.isnan(self.nll_sum):
            raise NaNLossError("evaluation loss is NaN")
        mean = self.nll_sum / self.tokens
        return {"ppl": math.exp(mean) if mean < 709.0 else math.inf, "mean_nll": mean,
                "nll_sum": self.nll_sum, "tokens": self.tokens}


def dummy_step(model: torch.nn.Module, backward: bool) -> None:
    """One forward (and backward of zero) of token id 0 alone, which changes no sum: the call a rank of a
    sharded model makes when it has run out of batches, so that every rank joins the same collectives
    (FSDP all-gathers each block's weights in its forward and reduce-scatters its gradients in backward).
    A zero loss gives exactly zero gradients, which the accumulators add without effect."""
    out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=input_device(model)), use_cache=False).logits
    if backward:
        (out.float().sum() * 0.0).backward()


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> dict:
    """``{"ppl", "mean_nll", "nll_sum", "tokens"}`` of ``model`` on ``windows`` ``[W, L]``.

    Every window predicts its ``L - 1`` next tokens (``n_context = 1``).  Under torchrun each rank
    scores its contiguous share and the float64 sums are all-reduced before the result, so every
    rank returns the perplexity of all windows (and a NaN on any rank is a NaN on all of them); a
    sharded model's ranks make the same number of forward calls (:func:`dummy_step`).
    """
    assert_eval(model)
    local, _ = distributed.shard(windows)
    total = NLLTotal()
    done = 0
    for batch in batches(local, batch_size, input_device(model), "evaluate"):
        total.add(score_tokens(model, batch, [1] * batch.shape[0]))
        done += 1
    if distributed.sharded(model):  # every rank makes the same number of forward calls (FSDP all-gathers in each)
        for _ in range(done, distributed.steps(len(windows), batch_size)):
            dummy_step(model, backward=False)
    nll, tokens = distributed.all_reduce_floats([total.nll_sum, float(total.tokens)])
    total.nll_sum, total.tokens = nll, int(tokens)
    return total.result()
