"""A compact, weighted sample of one seed's scores: ``score_distribution.npz``.

The full scores (one fp32 per weight) are freed after each seed, but the score-distribution plot
needs their complementary CDF.  For the primary seed only, while its scores exist, this keeps per
module type (see :mod:`esa.naming`):

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

import numpy as np

TAIL = 2000
BULK_PER_TENSOR = 2048  # the writer is esa.runner.score_sample (it reads torch scores)


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
