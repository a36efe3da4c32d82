"""Perplexity on fixed evaluation windows: ``exp(sum NLL / number of predicted tokens)``.

Each window ``[L]`` predicts its ``L - 1`` next tokens (the first token has no context).  The NLL
is computed from fp32 logits and summed in float64 across batches, so the result does not depend
on the batch size beyond float rounding.  An infinite NLL gives perplexity ``inf``; a NaN NLL is an
error (:class:`NaNLossError`), never a number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from esa.models import assert_eval


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
    total = logits.new_zeros((), dtype=torch.float32)
    for b in range(input_ids.shape[0]):
        total = total + F.cross_entropy(logits[b, :-1].float(), input_ids[b, 1:], reduction="sum")
    return total


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> dict:
    """``{"ppl", "mean_nll", "nll_sum", "tokens"}`` of ``model`` on ``windows`` ``[W, L]``."""
    assert_eval(model)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches(windows, batch_size, device, "evaluate"):
        total += float(nll_sum(model, batch).double())
        tokens += batch.shape[0] * (batch.shape[1] - 1)
    if math.isnan(total):
        raise NaNLossError("evaluation loss is NaN")
    mean = total / tokens
    return {"ppl": math.exp(mean) if mean < 709.0 else math.inf, "mean_nll": mean,
            "nll_sum": total, "tokens": tokens}
