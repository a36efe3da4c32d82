"""How closely ``random_mag_k`` matched the Top-K's weight magnitudes, per seed.

``random_mag_k`` draws, for each Top-K weight, one of the nearest free |w| ranks of the same tensor,
so its |w| distribution follows the Top-K's only as far as the tensor has free weights of that size
(the largest weights of a tensor have no larger neighbours).  What was achieved is recorded, not
assumed: the |w| quantiles (10, 50, 90 %, linear interpolation, over every selected weight of all
tensors together) of the control and of the Top-K, and their ratio control / Top-K.  A ratio off 1
by more than :data:`TOLERANCE` means the control is not magnitude-matched at that part of the
distribution, so a difference between the two could be one of magnitude rather than of score: the
results carry a warning sentence, which the run logs and the report shows.
"""

from __future__ import annotations

import torch

from esa.experiment.selection import Selection
from esa.model import distributed
from esa.model.targets import Target, flat_offset, flat_view

CONTROL = "random_mag_k"
QUANTILES = (0.1, 0.5, 0.9)
TOLERANCE = 0.05  # largest |ratio - 1| still called matched


def abs_weights(targets: dict[str, Target], sel: Selection) -> torch.Tensor:
    """|w| of every weight of ``sel`` (fp32 ``[sel.size]``, tensor by tensor, each in its stored order),
    read from the model as it is now.  Under ``--shard fsdp`` each rank reads its own rows and the
    others' stay 0, so the sum over ranks is every value exactly (one non-zero term each)."""
    parts, split = [], False
    for name, idx in sel.indices.items():
        param = targets[name].param
        flat, lo = flat_view(param), flat_offset(param)
        here = (idx >= lo) & (idx < lo + flat.numel())
        values = torch.zeros(len(idx), dtype=torch.float32)
        values[here] = flat[(idx[here] - lo).to(flat.device)].detach().float().abs().cpu()
        parts.append(values)
        split = split or distributed.sharded(param)
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)
    if split:
        out = torch.tensor(distributed.all_reduce_floats(out.tolist()), dtype=torch.float32)
    return out


def quantiles(values: torch.Tensor) -> list[float]:
    """The :data:`QUANTILES` of ``values`` (float64 arithmetic, linear interpolation)."""
    return torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def seed_quality(top: torch.Tensor, control: torch.Tensor) -> dict:
    """One seed: both selections' |w| quantiles and the ratios control / Top-K (``None`` where the Top-K's
    quantile is 0 and the control's is not: no finite ratio)."""
    qt, qc = quantiles(top), quantiles(control)
    ratios = [c / t if t > 0 else (1.0 if c == 0 else None) for t, c in zip(qt, qc)]
    return {"top_k_abs_w": qt, "control_abs_w": qc, "ratio": ratios}


def deviation(ratio: float | None) -> float:
    """|ratio - 1|; infinite for a ratio that does not exist."""
    return float("inf") if ratio is None else abs(ratio - 1.0)


def summary(per_seed: dict[str, dict]) -> dict:
    """The results block of ``random_mag_k`` (``per_seed``: seed -> :func:`seed_quality`): the quantiles,
    the tolerance, the largest deviation of any ratio from 1, and a ``warning`` sentence when it is
    beyond the tolerance (absent otherwise)."""
    worst = max((deviation(r) for q in per_seed.values() for r in q["ratio"]), default=0.0)
    out = {"quantiles": list(QUANTILES), "tolerance": TOLERANCE, "per_seed": per_seed,
           "max_deviation": None if worst == float("inf") else worst}
    off = [f"seed {s} at {100 * p:g} %: {'no finite ratio' if r is None else f'{r:.3f}'}"
           for s, q in per_seed.items() for p, r in zip(QUANTILES, q["ratio"]) if deviation(r) > TOLERANCE]
    if off:
        out["warning"] = (f"{CONTROL} is not magnitude-matched to the Top-K within {100 * TOLERANCE:g} % (control / "
                          f"Top-K |w| quantile: {'; '.join(off)}): part of its difference to the Top-K may be one of "
                          "magnitude, not of score")
    return out
