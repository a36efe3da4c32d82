"""Writing ``score_distribution.npz`` from one seed's torch scores while they exist (the file
format and its reader: :mod:`esa.analysis.score_sample`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from esa.analysis.score_sample import BULK_PER_TENSOR, TAIL
from esa.experiment import sharded
from esa.experiment.selection import Selection
from esa.experiment.sharded import Split
from esa.naming import MODULE_TYPES, module_type
from esa.outdir.atomic import atomic_write_bytes


class Reader:
    """One tensor's scores as a whole: this process's, or (``split``: --shard fsdp) every rank's rows read
    through O(sample) exchanges, so the sample is the one a single process draws."""

    def __init__(self, flat: torch.Tensor, name: str, split: Split | None) -> None:
        self.flat, self.name, self.split = flat, name, split
        self.n = flat.numel() if split is None else split.numel(name)

    def top(self, m: int) -> np.ndarray:
        """The ``m`` largest scores (descending)."""
        mine = torch.topk(self.flat, min(m, self.flat.numel())).values.float().cpu()
        if self.split is None:
            return mine.numpy()
        return -np.sort(-np.concatenate([v.numpy() for v in self.split.exchange(mine)]))[:m]

    def at(self, idx: np.ndarray | None) -> np.ndarray:
        """The scores at flat indices ``idx`` (None: every score, in flat order)."""
        if self.split is None:
            picked = self.flat if idx is None else self.flat[torch.from_numpy(idx).to(self.flat.device)]
            return picked.float().cpu().numpy()
        if idx is None:  # the ranks' rows in rank order are the flat order
            return np.concatenate([v.numpy() for v in self.split.exchange(self.flat.float().cpu())])
        got = sharded.gather({self.name: self.flat}, self.split.shards, {self.name: torch.from_numpy(idx)},
                             self.split.exchange)
        return got[self.name].numpy()

    def nonpositive(self) -> int:
        mine = int((self.flat <= 0).sum())
        return mine if self.split is None else int(sum(self.split.exchange(mine)))


def sample_scores(scores: dict[str, torch.Tensor], names: list[str], rng: np.random.Generator,
                  tail: int = TAIL, bulk: int = BULK_PER_TENSOR, split: Split | None = None) -> dict[str, np.ndarray]:
    """The npz arrays described in the module docstring (without threshold entries)."""
    acc: dict[str, dict] = {}
    for name in names:
        r = Reader(scores[name].reshape(-1), name, split)
        a = acc.setdefault(module_type(name), {"tail": [], "bulk": [], "w": [], "count": 0, "nonpos": 0})
        a["tail"].append(r.top(tail))
        if r.n <= bulk:
            vals, w = r.at(None), 1.0
        else:
            vals, w = r.at(rng.integers(0, r.n, size=bulk, dtype=np.int64)), r.n / bulk
        a["bulk"].append(vals)
        a["w"].append(np.full(len(vals), w, dtype=np.float64))
        a["count"] += r.n
        a["nonpos"] += r.nonpositive()
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


def write_score_sample(path: Path | None, scores: dict[str, torch.Tensor], names: list[str], top: Selection,
                       rng: np.random.Generator, meta: dict, split: Split | None = None) -> None:
    """Write ``score_distribution.npz`` for one seed; ``meta`` (metric, mode, k, seed) is stored too.
    ``split`` (--shard fsdp): every rank takes part in the sample; only a rank given a ``path`` writes."""
    arrays = sample_scores(scores, names, rng, split=split)
    if path is None:
        return
    mins = {n: float(s.min()) for n, s in top.scores.items() if len(s)}
    arrays["topk_threshold"] = np.array(min(mins.values()) if mins else np.nan)
    arrays["threshold_names"] = np.array(list(mins))
    arrays["thresholds"] = np.array(list(mins.values()), dtype=np.float64)
    for key, value in meta.items():
        arrays[key] = np.array(value)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
