"""The quantization experiment (``--quantize rtn``): does keeping the Top-K in full precision rescue
low-bit round-to-nearest quantization?

Conditions per block size (group = the block size), on the fixed evaluation windows (the quantizer:
:mod:`esa.experiment.quantize`):

* ``none``: plain RTN of every quantized tensor;
* ``protect_topk``: the seed's Top-K left out of each block's min/max and kept exact;
* ``protect_random_k``: as many random weights of the same tensors (per tensor the Top-K's count,
  drawn disjoint from it from the seed's ``protect_random_k`` stream), protected the same way;
* ``protect_super_weights``: the detector's candidates (with ``--detect-super-weights``).

``none`` and ``protect_super_weights`` do not depend on the seed: their keys are equal across seeds,
so they are measured once and their row repeated per seed (the run's evaluation cache).  The model
is never written (the quantized weights are swapped in per forward), so it is bit-exactly itself
after every condition.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Hashable, Iterator

import torch

from esa.errors import UsageError
from esa.experiment.controls import sample_excluding
from esa.experiment.quantize import RTN, quantization_error, quantized
from esa.experiment.registry import Condition, Experiment, Rows, SeedSelections, evaluation_key, experiment
from esa.model.targets import Target
from esa.options import Option, Options
from esa.seeding import numpy_rng

RESULTS = "quantization_results.json"
QUANTIZERS = ("rtn",)
SCHEME = ("asymmetric min-max round-to-nearest per block, integer zero point, range widened to hold 0, "
          "round half to even; protected weights out of the block's min/max and kept exact")


def parse_block_sizes(text: str) -> tuple[str | int, ...]:
    """Parse ``"channel,16384,tensor"``: ``channel`` (one block per output row), ``tensor`` or a positive
    count of contiguous weights, in the given order; duplicates are errors."""
    out: list[str | int] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part in ("channel", "tensor"):
            out.append(part)
        elif re.fullmatch(r"\d+", part) and int(part) > 0:
            out.append(int(part))
        else:
            raise UsageError(f"--block-size takes channel, tensor or a positive integer, got {part!r} in {text!r}")
    if len(set(out)) != len(out):
        raise UsageError(f"--block-size names a block size twice: {text!r}")
    return tuple(out)


OPTIONS = (
    Option("quantize", None, "rtn: quantize every targeted linear weight (not embeddings, lm_head or norms unless "
           "--include names them) by asymmetric min-max round-to-nearest, per block size, with and without keeping "
           "the Top-K (protect_topk), as many random weights (protect_random_k) and the super-weight candidates "
           "(protect_super_weights, with --detect-super-weights) in full precision; perplexity of each on the "
           "evaluation windows", choices=QUANTIZERS),
    Option("bits", 4, "bits per weight, 2..8", requires="quantize",
           check=lambda v: None if 2 <= v <= 8 else f"must be in 2..8, got {v}"),
    Option("block_sizes", ("channel",), "comma list of block sizes: channel (one block per output row), tensor, or a "
           "count of contiguous weights of the flattened tensor, e.g. 16384,65536,262144,1048576",
           parse=parse_block_sizes, flag="--block-size", metavar="B1,B2,...", requires="quantize",
           show_default="channel"),
    Option("clip_z", None, "clip each block to mean +- z standard deviations of its unprotected weights before "
           "computing its scale", parse=float, requires="quantize",
           check=lambda v: None if v is None or 0 < v < math.inf else
           f"must be a positive number of standard deviations, got {v}"),
)


def quantizable(model: torch.nn.Module, targets: list[Target], included: bool) -> tuple[list[Target], dict[str, str]]:
    """The targets RTN quantizes: the linear weights (matrices and fused experts read as linear maps),
    not embeddings, the output head or 1-D norms and biases, unless ``--include`` named them
    (``included``); the others with the reason."""
    if included:
        return targets, {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    keep, skipped = [], {}
    for t in targets:
        if any(u.kind == "embedding" for u in t.uses) or t.param is head_weight:
            skipped[t.name] = "not quantized: embedding or output head (--include it to quantize it)"
        elif t.param.ndim < 2:
            skipped[t.name] = "not quantized: 1-D norm scale or bias (--include it to quantize it)"
        else:
            keep.append(t)
    return keep, skipped


def random_protection(top: dict[str, torch.Tensor], sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Per tensor, as many random weights as the Top-K holds there, disjoint from it (sorted flat indices)."""
    rng = numpy_rng(seed, "protect_random_k")
    return {n: sample_excluding(sizes[n], len(idx), idx, rng).sort().values for n, idx in top.items() if len(idx)}


def candidate_protection(sw: dict | None, names: set[str]) -> dict[str, torch.Tensor] | None:
    """The super-weight candidates (in quantized tensors) as flat indices, or None without the detector."""
    if sw is None:
        return None
    out: dict[str, list[int]] = {}
    for c in sw["candidates"]:
        if c["param"] in names:
            out.setdefault(c["param"], []).append(int(c["flat_index"]))
    return {n: torch.tensor(sorted(set(v)), dtype=torch.int64) for n, v in out.items()}


@experiment("quantization", results_file=RESULTS, options=OPTIONS,
            help="RTN quantization of the linear weights per block size, with and without protected weights")
class Quantization(Experiment):
    group_by = "block size"

    @classmethod
    def pairs(cls, conditions: list[str]) -> list[tuple[str, str]]:
        """protect_topk against protect_random_k (as many random weights protected)."""
        return [("protect_topk", "protect_random_k")] if {"protect_topk", "protect_random_k"} <= set(conditions) else []

    @classmethod
    def enabled(cls, opts: Options) -> bool:
        return opts.quantize is not None

    @classmethod
    def validate(cls, opts: Options) -> None:
        if opts.quantize is None:
            return
        if opts.quantize not in QUANTIZERS:
            raise UsageError(f"unknown --quantize {opts.quantize!r}; choose from {', '.join(QUANTIZERS)}")
        if opts.perturb:
            raise UsageError("--quantize cannot be combined with --perturb: a condition is either a perturbation of "
                             "the selected weights or a quantization that protects them, not both")
        if not opts.block_sizes:
            raise UsageError("--block-size is empty")

    @classmethod
    def restrict(cls, model, targets, included):
        keep, skipped = quantizable(model, targets, included)
        if not keep:
            raise UsageError("--quantize: none of the selected weights is a linear weight to quantize")
        return keep, skipped

    def __init__(self, view) -> None:
        super().__init__(view)
        self._keys: dict[str, set[str]] = {}  # condition name -> its evaluation keys over seeds and block sizes

    def conditions(self, sel: SeedSelections) -> Iterator[tuple[Hashable, Condition]]:
        sizes = {t.name: t.numel for t in self.view.targets}
        top = {n: i for n, i in sel.top.indices.items() if len(i)}
        protections = {"none": {}, "protect_topk": top, "protect_random_k": random_protection(top, sizes, sel.seed)}
        supers = candidate_protection(self.view.super_weights, set(sizes))
        if supers is not None:
            protections["protect_super_weights"] = supers
        for b in self.opts.block_sizes:
            spec = RTN(self.opts.bits, b, self.opts.clip_z)
            for name, protect in protections.items():
                key = evaluation_key(("rtn", spec.bits, spec.block, spec.clip_z), protect)
                self._keys.setdefault(name, set()).add(f"{b}|{key}")
                yield str(b), Condition(name, key, lambda s=spec, p=protect: self._change(s, p),
                                        f"seed {sel.seed} block {b} {name}")

    @contextlib.contextmanager
    def _change(self, spec: RTN, protect: dict[str, torch.Tensor]) -> Iterator[dict]:
        mse, n = quantization_error(self.view.targets, spec, protect)
        with quantized(self.view.targets, spec, protect):
            yield {"protected": sum(len(v) for v in protect.values()), "quantized_weights": n, "mse_unprotected": mse}

    def results(self, rows: Rows, baseline: dict) -> dict:
        """``quantization_results.json`` of one metric: per seed, block size and condition, and the
        cross-seed statistics of protect_topk vs protect_random_k."""
        from esa.analysis import significance  # scipy: only when results are written, never for --help

        v, o = self.view, self.opts
        per_seed = {str(s): by_block for s, by_block in rows.items()}
        out = {"quantizer": {"method": o.quantize, "bits": o.bits, "clip_z": o.clip_z, "scheme": SCHEME,
                             "quantized_tensors": len(v.targets),
                             "quantized_weights": sum(t.numel for t in v.targets)},
               "metric": v.metric, "mode": v.mode, "k": v.topk, "block_sizes": [str(b) for b in o.block_sizes],
               "eval_windows": v.eval_windows, "baseline": baseline, "seeds": list(rows), "per_seed": per_seed}
        if len(rows) >= 2:
            # a condition whose key is the same on every seed (per block size) was measured once: no spread
            out["evaluated_once"] = [n for n, keys in self._keys.items() if len(keys) == len(o.block_sizes)]
            out["summary"], out["tests"] = {}, {}
            for b in map(str, o.block_sizes):
                by_seed = {s: per_seed[s][b] for s in per_seed}
                out["summary"][b] = significance.condition_summary(by_seed)
                out["tests"][b] = {f"{x}_vs_{y}": significance.condition_vs(by_seed, x, y)
                                   for x, y in self.pairs(list(by_seed[next(iter(by_seed))]))}
        return out
