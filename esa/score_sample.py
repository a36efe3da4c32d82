"""A compact, weighted sample of one seed's scores: ``score_distribution.npz``.

The full scores (one fp32 per weight) are freed after each seed, but the score-distribution plot
needs their complementary CDF.  For the primary seed only, while its scores exist, this keeps per
module type (see :mod:`esa.modtypes`):

* ``tail_<type>``: the exact ``TAIL`` highest scores of that type (float32, descending), merged from
  each tensor's own top ``TAIL`` (which provably contain the type's top ``TAIL``);
* ``bulk_<type>`` / ``bulk_weight_<type>``: a uniform random sample (with replacement, seeded stream
  ``score_sample``) of ``BULK_PER_TENSOR`` scores per tensor (all of them for a smaller tensor),
  restricted to values below the tail's smallest score; each sampled value stands for
  ``count / sample size`` weights of its tensor, so the weighted sample is an unbiased estimate of the
  bulk's distribution;
* ``count``, ``nonpositive`` per type (``types`` gives the order): all weights, and those with score
  <= 0, which a log axis cannot show;
* ``topk_threshold``: the lowest Top-K score (every Top-K weight scores at least this), and for
  ``per_layer`` ``thresholds`` per tensor (names in ``threshold_names``).

Then P(score >= x) = (tail values >= x + weighted bulk values >= x) / count is exact above the tail
and unbiased below it.  Memory: per tensor, a top-``TAIL`` and a ``BULK_PER_TENSOR`` gather; the file
holds ~(TAIL x types + BULK_PER_TENSOR x tensors) floats (a few MB), never a copy of all scores.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from esa.modtypes import MODULE_TYPES, module_type
from esa.selection import Selection

TAIL = 2000
BULK_PER_TENSOR = 2048


def _write_bytes(path: Path, data: bytes) -> None:
    """Atomic write (temporary sibling + rename), like :func:`esa.outputs.atomic_write_text`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    _write_bytes(path, buf.getvalue())


def load_ccdf(npz: dict[str, np.ndarray], t: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(x, P(score >= x), count) for one module type, or all types merged when ``t`` is None.

    ``x`` is descending and holds only positive scores (a log axis shows nothing else).  Merging
    types is concatenation: a type's tail (weight 1) and its bulk (weighted) cover disjoint parts of
    that type's weights, so the union estimates all weights.
    """
    types = [str(s) for s in npz["types"]] if t is None else [t]
    tails = [np.asarray(npz[f"tail_{u}"], dtype=np.float64) for u in types]
    bulk = [np.asarray(npz[f"bulk_{u}"], dtype=np.float64) for u in types]
    weight = [np.asarray(npz[f"bulk_weight_{u}"], dtype=np.float64) for u in types]
    count = int(sum(int(npz["count"][list(map(str, npz["types"])).index(u)]) for u in types))
    vals = np.concatenate(tails + bulk)
    w = np.concatenate([np.ones(sum(len(x) for x in tails))] + weight)
    order = np.argsort(-vals, kind="stable")
    vals, w = vals[order], w[order]
    ccdf = np.cumsum(w) / count
    keep = vals > 0
    return vals[keep], np.minimum(ccdf[keep], 1.0), count
