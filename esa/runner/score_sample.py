"""Writing ``score_distribution.npz`` from one seed's torch scores while they exist (the file
format and its reader: :mod:`esa.analysis.score_sample`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from esa.analysis.score_sample import BULK_PER_TENSOR, TAIL
from esa.experiment.selection import Selection
from esa.naming import MODULE_TYPES, module_type
from esa.outdir.atomic import atomic_write_bytes


def sample_scores(scores: dict[str, torch.Tensor], names: list[str], rng: np.random.Generator,
                  tail: int = TAIL, bulk: int = BULK_PER_TENSOR) -> dict[str, np.ndarray]:
    """The npz arrays described in the module docstring (without threshold entries)."""
    acc: dict[str, dict] = {}
    for name in names:
        flat = scores[name].reshape(-1)
        n = flat.numel()
        a = acc.setdefault(module_type(name), {"tail": [], "bulk": [], "w": [], "count": 0, "nonpos": 0})
        a["tail"].append(torch.topk(flat, min(tail, n)).values.float().cpu().numpy())
        if n <= bulk:
            vals, w = flat.float().cpu().numpy(), 1.0
        else:
            idx = torch.from_numpy(rng.integers(0, n, size=bulk, dtype=np.int64)).to(flat.device)
            vals, w = flat[idx].float().cpu().numpy(), n / bulk
        a["bulk"].append(vals)
        a["w"].append(np.full(len(vals), w, dtype=np.float64))
        a["count"] += n
        a["nonpos"] += int((flat <= 0).sum())
    types = [t for t in MODULE_TYPES if t in acc]
    out: dict[str, np.ndarray] = {"types": np.array(types),
                                  "count": np.array([acc[t]["count"] for t in types], dtype=np.int64),
                                  "nonpositive": np.array([acc[t]["nonpos"] for t in types], dtype=np.int64)}
    for t in types:
        top = -np.sort(-np.concatenate(acc[t]["tail"]))[:tail]
        vals, w = np.concatenate(acc[t]["bulk"]), np.concatenate(acc[t]["w"])
        below = vals < top[-1]  # values >= the tail's minimum are counted exactly by the tail
        out[f"tail_{t}"] = top.astype(np.float32)
        out[f"bulk_{t}"] = vals[below].astype(np.float32)
        out[f"bulk_weight_{t}"] = w[below]
    return out


def write_score_sample(path: Path, scores: dict[str, torch.Tensor], names: list[str], top: Selection,
                       rng: np.random.Generator, meta: dict) -> None:
    """Write ``score_distribution.npz`` for one seed; ``meta`` (metric, mode, k, seed) is stored too."""
    arrays = sample_scores(scores, names, rng)
    mins = {n: float(s.min()) for n, s in top.scores.items() if len(s)}
    arrays["topk_threshold"] = np.array(min(mins.values()) if mins else np.nan)
    arrays["threshold_names"] = np.array(list(mins))
    arrays["thresholds"] = np.array(list(mins.values()), dtype=np.float64)
    for key, value in meta.items():
        arrays[key] = np.array(value)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
