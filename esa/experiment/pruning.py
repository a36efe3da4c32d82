"""The pruning experiment (``--prune`` / ``--prune-pattern``): remove the *lowest*-scoring weights of
each comparison group and measure the model, the benchmark saliency metrics are judged by in the
pruning literature (Wanda = ``act_mag`` + ``per_row``; magnitude pruning = ``magnitude`` + ``per_row``).

Conditions per level (group = the sparsity ``"0.5"`` or the pattern ``"2:4"``), on the fixed
evaluation windows (the masks: :mod:`esa.experiment.prune`):

* ``metric``: the run's metric's lowest scores removed in the groups of ``--mode`` (N:M: per row);
* ``magnitude``: the same counts per group by ``|w|`` (magnitude pruning; the same on every seed and
  metric, so measured once: the run's evaluation cache);
* ``random``: the same counts per group drawn uniformly from the seed's stream
  ``prune_random:<level>`` (the same for every metric of a seed: measured once per seed).

The metric's masks are made from the seed's full scores while they are alive
(:meth:`Pruning.keep`, one bit per weight and level, kept in the seed's checkpoint); a control's
masks are made only when its condition is measured (its key names what decides them: the level,
the mode, the tensors and, for ``random``, the seed), so the other metrics and seeds reuse its
record without making them again.  A condition swaps the masked weights to
exact zeros per forward and never writes the stored model, so it is bit-exactly itself after.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Hashable, Iterator
from decimal import Decimal, InvalidOperation

import torch

from esa.errors import UsageError
from esa.experiment.prune import Level, divides_rows, pruned, random_masks, removed, score_masks
from esa.experiment.quantization import quantizable
from esa.experiment.quantize import whole
from esa.experiment.registry import Condition, Experiment, Rows, SeedSelections, evaluation_key, experiment
from esa.model import distributed
from esa.options import Option, Options
from esa.seeding import numpy_rng, torch_generator

RESULTS = "pruning_results.json"
CONDITIONS = ("metric", "magnitude", "random")
RULE = ("removed weights read as exact 0 in every forward (the stored model is never written); per level the "
        "floor(s * n) lowest scores of each group of --mode (ties: lower input index, then tensor order and flat "
        "index); N:M: the M-N lowest of every M consecutive input weights of each row")


def _unique(values: list[str], flag: str, text: str) -> tuple[str, ...]:
    if len(set(values)) != len(values):
        raise UsageError(f"{flag} names a value twice: {text!r}")
    return tuple(values)


def parse_sparsities(text: str) -> tuple[str, ...]:
    """``"0.1,0.3,0.5"`` -> ``("0.1", "0.3", "0.5")``: fractions strictly between 0 and 1, kept as exact
    decimal text (so ``floor(s · n)`` is exact), ascending; duplicates are errors."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            d = Decimal(part)
        except InvalidOperation:
            d = None
        if d is None or not d.is_finite() or not 0 < d < 1:
            raise UsageError(f"--prune takes sparsities strictly between 0 and 1 (the fraction of weights removed), "
                             f"got {part!r} in {text!r}")
        out.append(format(d.normalize(), "f"))
    return tuple(sorted(_unique(out, "--prune", text), key=Decimal))


def parse_patterns(text: str) -> tuple[str, ...]:
    """``"2:4,4:8"`` -> ``("2:4", "4:8")``: N:M with 1 <= N < M (keep N of every M); duplicates are errors."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+):(\d+)", part)
        if not m or not 1 <= int(m[1]) < int(m[2]):
            raise UsageError(f"--prune-pattern takes N:M with 1 <= N < M (keep the N highest of every M consecutive "
                             f"input weights), got {part!r} in {text!r}")
        out.append(f"{int(m[1])}:{int(m[2])}")
    return _unique(out, "--prune-pattern", text)


OPTIONS = (
    Option("prune", (), "comma list of sparsities (fractions in (0, 1)): per sparsity remove the lowest-scoring "
           "weights of each group of --mode (per_row = Wanda's comparison group) from the linear weights (not "
           "embeddings, lm_head or norms unless --include names them), and as many by |w| (magnitude) and at "
           "random; perplexity (and every --evaluate evaluator) of each", parse=parse_sparsities,
           metavar="S1,S2,...", show_default="none"),
    Option("prune_pattern", (), "comma list of N:M patterns (e.g. 2:4): keep the N highest-scoring of every M "
           "consecutive input weights of each row (whatever --mode), with the same magnitude and random controls",
           parse=parse_patterns, metavar="N:M,...", show_default="none"),
)


def levels_of(opts: Options) -> list[Level]:
    """The run's pruning levels: every sparsity (ascending), then every pattern as typed."""
    return [Level.of(s) for s in (*opts.prune, *opts.prune_pattern)]


def magnitude_score(t) -> torch.Tensor:
    """``|w|`` in fp32 of a target's whole weight (the magnitude control's score)."""
    return whole(t).float().abs()


@experiment("pruning", results_file=RESULTS, options=OPTIONS,
            help="remove the lowest-scoring weights to each sparsity or N:M pattern, against magnitude and random")
class Pruning(Experiment):
    group_by = "sparsity"

    @classmethod
    def pairs(cls, conditions: list[str]) -> list[tuple[str, str]]:
        """The metric's pruning against magnitude pruning and against random pruning."""
        return [("metric", c) for c in ("magnitude", "random") if {"metric", c} <= set(conditions)]

    @classmethod
    def enabled(cls, opts: Options) -> bool:
        return bool(opts.prune or opts.prune_pattern)

    @classmethod
    def validate(cls, opts: Options) -> None:
        if cls.enabled(opts) and opts.perturb:
            raise UsageError("--prune cannot be combined with --perturb: pruning chooses among the linear weights "
                             "only, which would change what the perturbation's Top-K is chosen from")

    @classmethod
    def restrict(cls, model, targets, included):
        keep, skipped = quantizable(model, targets, included)
        if not keep:
            raise UsageError("--prune: none of the selected weights is a linear weight to prune")
        return keep, {n: why.replace("not quantized", "not pruned").replace("to quantize it", "to prune it")
                      for n, why in skipped.items()}

    @classmethod
    def keep(cls, view, scores):
        """Each level's bit-packed mask of every target from the metric's scores, as ``"<level>|<name>"``."""
        masks = score_masks(view.targets, lambda n: scores[n], view.mode, levels_of(view.options))
        return {f"{label}|{n}": p for label, by_name in masks.items() for n, p in by_name.items()}

    def check(self) -> None:
        if any(distributed.sharded(t.param) for t in self.view.targets):
            raise UsageError("--prune is not implemented under --shard fsdp (its masks need whole rows); run it "
                             "without --shard")
        for p in self.opts.prune_pattern:
            if (bad := divides_rows(self.view.targets, Level.of(p).m)) is not None:
                raise UsageError(f"--prune-pattern {p}: M = {Level.of(p).m} does not divide the rows of {bad}")

    def __init__(self, view) -> None:
        super().__init__(view)
        self._keys: dict[str, set[str]] = {}  # condition name -> its evaluation keys over seeds and levels

    def conditions(self, sel: SeedSelections) -> Iterator[tuple[Hashable, Condition]]:
        v = self.view
        kept = sel.kept.get(self.name)
        if kept is None:
            raise UsageError(f"seed {sel.seed}'s selections hold no pruning masks (a checkpoint written without "
                             "--prune?); rerun without --resume")
        names = tuple(v.names)
        for lv in levels_of(self.opts):
            mode = v.mode if lv.fraction is not None else "per_row"  # N:M is per row whatever the mode
            metric = {n: kept[f"{lv.label}|{n}"] for n in names}
            conds = {  # (key, masks): a control's key says what decides its masks, which are made only if measured
                "metric": (evaluation_key(("prune",), metric), lambda m=metric: m),
                "magnitude": (evaluation_key(("prune", "magnitude", mode, lv.label, names), {}),
                              lambda lv=lv: self._magnitude(lv)),
                "random": (evaluation_key(("prune", "random", mode, lv.label, names, sel.seed), {}),
                           lambda lv=lv: self._random(lv, sel.seed)),
            }
            for name, (key, make) in conds.items():
                self._keys.setdefault(name, set()).add(f"{lv.label}|{key}")
                yield lv.label, Condition(name, key, lambda make=make: self._change(make()),
                                          f"seed {sel.seed} {v.metric} prune {lv.label} {name}")

    def _magnitude(self, lv: Level) -> dict[str, torch.Tensor]:
        """The magnitude control's packed masks: the level's counts per group by |w|."""
        v = self.view
        return score_masks(v.targets, lambda name: magnitude_score(v.by_name[name]), v.mode, [lv])[lv.label]

    def _random(self, lv: Level, seed: int) -> dict[str, torch.Tensor]:
        """The random control's packed masks: the level's counts per group, uniform from the seed's stream."""
        stream = f"prune_random:{lv.label}"
        return random_masks(self.view.targets, self.view.mode, lv, torch_generator(seed, stream),
                            numpy_rng(seed, stream))

    @contextlib.contextmanager
    def _change(self, masks: dict[str, torch.Tensor]) -> Iterator[dict]:
        n = removed(masks)
        with pruned(self.view.targets, masks):
            yield {"removed": n, "removed_share": n / sum(t.numel for t in self.view.targets)}

    def results(self, rows: Rows, baseline: dict) -> dict:
        """``pruning_results.json`` of one metric: per seed, level and condition, and the cross-seed
        statistics of the metric's pruning against magnitude and random pruning."""
        from esa.analysis import significance  # scipy: only when results are written, never for --help

        v, o = self.view, self.opts
        per_seed = {str(s): by_level for s, by_level in rows.items()}
        out = {"pruner": {"pruned_tensors": len(v.targets), "pruned_weights": sum(t.numel for t in v.targets),
                          "rule": RULE},
               "metric": v.metric, "mode": v.mode, "sparsities": list(o.prune), "patterns": list(o.prune_pattern),
               "levels": [lv.label for lv in levels_of(o)], "conditions": list(CONDITIONS),
               "eval_windows": v.eval_windows, "baseline": baseline, "seeds": list(rows), "per_seed": per_seed}
        if len(rows) >= 2:
            # a condition whose key is the same on every seed (per level) was measured once: no spread
            out["evaluated_once"] = [n for n, keys in self._keys.items() if len(keys) == len(out["levels"])]
            out["summary"], out["tests"] = {}, {}
            for label in out["levels"]:
                by_seed = {s: per_seed[s][label] for s in per_seed}
                out["summary"][label] = significance.condition_summary(by_seed)
                out["tests"][label] = {f"{x}_vs_{y}": significance.condition_vs(by_seed, x, y)
                                       for x, y in self.pairs(list(CONDITIONS))}
        return out
