"""One evaluated condition as a result row: perplexity, or ``inf`` when the loss is NaN.

A NaN loss after a perturbation (typically an exponent bit flip that overflowed a weight to inf)
means the model no longer predicts anything: that is infinite perplexity, reported with
``"non_finite_loss": "nan"``, not a crash.  Every experiment (perturbation conditions, super-weight
ablation) builds its rows here, so the rule is written once.
"""

from __future__ import annotations

import logging
import math

import torch

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
