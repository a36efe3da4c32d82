"""``perplexity``: token perplexity of the evaluation windows, ``exp(sum NLL / scored tokens)``.

The record is ``{"ppl", "mean_nll", "nll_sum", "tokens"}`` (:func:`esa.model.forward.perplexity`:
fp32 logits, float64 sums, every window of L tokens predicts L - 1), plus ``delta_ppl`` and
``ratio`` against the baseline.  A NaN loss after a change of the model (typically an exponent bit
flip that overflowed a weight to inf) means the model no longer predicts anything: that is
infinite perplexity, reported with ``"non_finite_loss": "nan"``, not a crash.
"""

from __future__ import annotations

import logging
import math

import torch

from esa.evaluators.registry import Evaluator, evaluator
from esa.model.forward import NaNLossError, perplexity

log = logging.getLogger("esa")


def perplexity_row(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, base_ppl: float | None,
                   label: str) -> dict:
    """``{"ppl", "mean_nll", "nll_sum", "tokens"}`` of ``model`` on ``windows`` ``[W, L]``, plus
    ``delta_ppl`` and ``ratio`` against ``base_ppl`` when given; a NaN loss gives the ``inf`` row
    (``label`` names the condition in the warning)."""
    try:
        row = dict(perplexity(model, windows, batch_size))
    except NaNLossError:
        log.warning("%s: NaN loss after perturbation; perplexity reported as inf", label)
        row = {"ppl": math.inf, "mean_nll": math.nan, "non_finite_loss": "nan"}
    if base_ppl is not None:
        row["delta_ppl"] = row["ppl"] - base_ppl
        row["ratio"] = row["ppl"] / base_ppl if base_ppl > 0 else math.nan
    return row


@evaluator("perplexity", needs=("eval_windows",),
           help="token perplexity exp(sum NLL / tokens) of the evaluation windows (fp32 logits, float64 sums), "
                "with delta_ppl and ratio to the unmodified model")
class Perplexity(Evaluator):
    drives = True  # one forward per batch of this rank's windows, in order (esa.model.forward.perplexity)

    def evaluate(self, model: torch.nn.Module, baseline: dict | None, label: str) -> dict:
        if baseline is None:  # the unmodified model: a NaN loss there is an error, never a number
            return dict(perplexity(model, self.inputs.windows, self.inputs.batch_size))
        return perplexity_row(model, self.inputs.windows, self.inputs.batch_size, baseline["ppl"], label)
