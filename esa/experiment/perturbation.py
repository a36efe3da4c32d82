"""The perturbation experiment (``--perturb``): each seed's Top-K and controls perturbed in place,
measured and restored; the dose-response sweep over ``--topk-sweep``; the cross-seed statistics.

Conditions per seed: ``top_k`` and every control at ``--topk`` (group k = ``--topk``), and the same
for each other sweep k (group k).  Each draws its randomness (Gaussian noise, ``--perturb-prob``)
from the stream ``perturb:<condition>`` (``perturb:<condition>:k<k>`` for a sweep k), so adding a
condition never changes another's draws.  The perturbations themselves: :mod:`esa.experiment.perturb`.

With ``--restore-activations`` each condition is followed by ``<name>+restored``: the same
perturbation with the baseline's massive activations written back into the residual stream (Yu et
al.'s "remove the weight, restore the activation").  The intervention is the run's ``restoring``
(:class:`~esa.experiment.registry.RunView`), built by the runner from the ``activations``
evaluator's baseline record, so this module never reads an evaluator.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Hashable, Iterator

from esa.errors import UsageError
from esa.experiment import match
from esa.experiment.controls import CONTROLS, unmatched_controls
from esa.experiment.perturb import PERTURBATIONS, perturbed, resolve_bit
from esa.experiment.registry import Condition, Experiment, Rows, RunView, SeedSelections, evaluation_key, experiment
from esa.experiment.selection import Selection
from esa.experiment.sweep import sweep_curve
from esa.naming import canonical
from esa.options import Option, Options
from esa.seeding import torch_generator

log = logging.getLogger("esa")
RESULTS = "perturbation_results.json"


def parse_perturb(text: str) -> str:
    """``"zero"`` or several, ``"zero,sign_flip,gauss_noise:0.5"`` (aliases allowed): the canonical names
    comma-joined in the order given, each with its own scale (``name:scale``) where it was typed; a
    scale on a perturbation that has none, a bad scale or a name given twice is a usage error."""
    out: list[str] = []
    for part in text.split(","):
        name, colon, scale = part.partition(":")
        name = canonical(name, PERTURBATIONS.names(), PERTURBATIONS.aliases(), "--perturb")
        if name in (n.partition(":")[0] for n in out):
            raise UsageError(f"--perturb names {name} twice: {text!r}")
        if colon:
            if not PERTURBATIONS[name].scaled:
                raise UsageError(f"--perturb {part.strip()!r}: {name} has no scale (a scale applies to "
                                 f"{', '.join(n for n in PERTURBATIONS if PERTURBATIONS[n].scaled)})")
            name += f":{_scale(scale, part)!r}"
        out.append(name)
    return ",".join(out)


def _scale(text: str, part: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0 or value == float("inf"):
        raise UsageError(f"--perturb {part.strip()!r}: the scale must be a non-negative number")
    return value


def perturbations(opts: Options) -> dict[str, float]:
    """Each perturbation of ``--perturb`` -> its scale (its own ``name:scale``, else ``--perturb-scale``);
    empty without ``--perturb``."""
    out = {}
    for part in opts.perturb.split(",") if opts.perturb else ():
        name, _, scale = part.partition(":")
        out[name] = float(scale) if scale else opts.perturb_scale
    return out


def single(opts: Options, name: str) -> Options:
    """The options of a run of perturbation ``name`` alone (what ``--perturb name --perturb-scale s``
    would give: --bit-index only for bit_flip, whose option it is)."""
    return opts.replace(perturb=name, perturb_scale=perturbations(opts)[name],
                        bit_index=opts.bit_index if name == "bit_flip" else None)


def normalized(opts: Options) -> Options:
    """One perturbation typed with its own scale (``--perturb gauss_noise:0.5``) is the run of
    ``--perturb gauss_noise --perturb-scale 0.5``: the same config.json, the same results."""
    names = perturbations(opts)
    return single(opts, next(iter(names))) if len(names) == 1 else opts


def parse_controls(text: str) -> tuple[str, ...]:
    """Parse ``"random_k,bottom_k"`` (aliases allowed); ``"none"`` or ``""`` means no controls."""
    if text.strip().lower() in ("", "none"):
        return ()
    out: list[str] = []
    for part in text.split(","):
        name = canonical(part, CONTROLS.names(), CONTROLS.aliases(), "control")
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_topk_sweep(text: str) -> tuple[int, ...]:
    """Parse ``"1,10,100,1000"`` into ascending ``(1, 10, 100, 1000)``; ``""`` means no sweep.

    Every k must be a positive integer and appear once (a duplicate is almost surely a typo).
    """
    if not text.strip():
        return ()
    parts = [p.strip() for p in text.split(",")]
    if any(not re.fullmatch(r"\d+", p) for p in parts):
        raise UsageError(f"--topk-sweep must be a comma-separated list of positive integers, got {text!r}")
    ks = [int(p) for p in parts]
    if any(k <= 0 for k in ks):
        raise UsageError(f"--topk-sweep values must be positive, got {text!r}")
    if len(set(ks)) != len(ks):
        raise UsageError(f"--topk-sweep contains duplicates: {text!r}")
    return tuple(sorted(ks))


def _catalogue(registry) -> str:
    """``name = definition; ...`` of every registered item (the --help text grows with the registry)."""
    return "; ".join(f"{name} = {registry[name].help}" for name in registry)


OPTIONS = (
    Option("perturb", None, f"perturb the Top-K and controls: {', '.join(PERTURBATIONS)} (alias gaussian -> "
           f"gauss_noise); {_catalogue(PERTURBATIONS)}. Several, comma-separated, each with its own scale where "
           "it has one (zero,sign_flip,gauss_noise:0.5,bit_flip): scored and selected once, each perturbation "
           "in its own folder perturbations/<name>/. Omit to only score", parse=parse_perturb),
    Option("perturb_scale", 1.0, "scale of sign_flip / gauss_noise (of each without its own name:scale)", parse=float,
           check=lambda v: None if v >= 0.0 else f"must be a non-negative number, got {v}"),
    Option("perturb_prob", 1.0, "probability that each selected weight is perturbed (seeded)", parse=float,
           check=lambda v: None if 0.0 < v <= 1.0 else f"must be in (0, 1], got {v}"),
    Option("bit_index", None, "bit flipped by bit_flip (0 = least significant; default: the most significant "
           "exponent bit: 30 for fp32, 14 for bf16/fp16)", parse=int),
    Option("controls", ("random_k", "bottom_k"), f"comma list of {', '.join(CONTROLS)}, or 'none' (default: "
           f"random_k,bottom_k): {_catalogue(CONTROLS)}", parse=parse_controls, show_default=""),
    Option("topk_sweep", (), "dose-response: also perturb the Top-K and controls for each of these k (scores are "
           "computed once per seed); --topk stays the main k of the table, top_weights.csv and stability. Each k "
           "must fit the weight count like --topk. Needs --perturb", parse=parse_topk_sweep, metavar="K1,K2,...",
           show_default=""),
    Option("restore_activations", False, "also measure every perturbed condition with the unmodified model's massive "
           "activations written back into the residual stream at their (layer, channel, window, token), as "
           "'<condition>+restored' beside it (adds the activations evaluator). Needs --perturb"),
)


@experiment("perturbation", results_file=RESULTS, options=OPTIONS,
            help="the Top-K and every control perturbed in place (--perturb), per seed and sweep k")
class Perturbation(Experiment):
    group_by = "k"

    @classmethod
    def pairs(cls, conditions: list[str]) -> list[tuple[str, str]]:
        """Top-K against each control (the statistics of ``results``: significance.top_vs_controls)."""
        return [("top_k", c) for c in conditions if c != "top_k"]

    @classmethod
    def enabled(cls, opts: Options) -> bool:
        return opts.perturb is not None

    @classmethod
    def validate(cls, opts: Options) -> None:
        if opts.restore_activations and not opts.perturb:
            raise UsageError("--restore-activations needs --perturb (it restores the activations a perturbation "
                             "changed)")
        if opts.topk_sweep and not opts.perturb:
            raise UsageError("--topk-sweep needs --perturb (the sweep measures the perplexity change per k)")
        if opts.bit_index is not None and "bit_flip" not in perturbations(opts):
            raise UsageError("--bit-index only applies to --perturb bit_flip")
        if opts.bit_index is not None and not 0 <= opts.bit_index < 32:
            raise UsageError(f"--bit-index must be in 0..31 (0..15 for bf16/fp16), got {opts.bit_index}")

    def bit(self) -> int | None:
        """The bit bit_flip flips in the targets' dtype (fails before any scoring when out of range)."""
        if self.opts.perturb != "bit_flip":
            return None
        return resolve_bit(self.view.targets[0].param.dtype, self.opts.bit_index)

    def check(self) -> None:
        self.bit()
        if self.opts.restore_activations and self.view.restoring is None:
            raise UsageError("--restore-activations needs the activations evaluator "
                             "(--evaluate perplexity,activations)")

    def __init__(self, view: RunView) -> None:
        super().__init__(view)
        self.matched: dict[str, dict] = {}  # seed -> random_mag_k's |w| quantiles against the Top-K's (--topk)

    def conditions(self, sel: SeedSelections) -> Iterator[tuple[Hashable, Condition]]:
        k_main = self.view.topk
        if match.CONTROL in sel.controls:  # read before the first condition changes the model
            by_name = self.view.by_name
            self.matched[str(sel.seed)] = match.seed_quality(match.abs_weights(by_name, sel.top),
                                                             match.abs_weights(by_name, sel.controls[match.CONTROL]))
        yield from self._at(sel.seed, k_main, sel.top, sel.controls, "")
        for k in self.opts.topk_sweep:
            if k != k_main:  # a sweep k equal to --topk is the main conditions (same rows)
                top, controls = sel.sweep[k]
                yield from self._at(sel.seed, k, top, controls, f":k{k}")

    def _at(self, seed: int, k: int, top: Selection, controls: dict[str, Selection], suffix: str
            ) -> Iterator[tuple[int, Condition]]:
        o = self.opts
        for name, sel in [("top_k", top), *controls.items()]:
            stream = f"perturb:{name}{suffix}"
            key = evaluation_key((o.perturb, o.perturb_scale, o.perturb_prob, o.bit_index, f"{seed}:{stream}"),
                                 sel.indices)
            cond = Condition(name, key, lambda s=sel, st=stream, n=name: self._change(s, seed, st, n),
                             f"seed {seed} {name}" + (f" k={k}" if suffix else ""))
            yield k, cond
            if o.restore_activations:
                yield k, self._restored(cond)

    def _restored(self, cond: Condition) -> Condition:
        """``cond`` with the baseline's massive activations written back (``<name>+restored``)."""
        restoring = self.view.restoring

        @contextlib.contextmanager
        def change() -> Iterator[dict]:
            with cond.change() as info, restoring() as restored:
                yield {**info, **restored}
        return Condition(f"{cond.name}+restored", evaluation_key((cond.key, "restored activations"), {}), change,
                         f"{cond.label} + restored activations")

    @contextlib.contextmanager
    def _change(self, sel: Selection, seed: int, stream: str, name: str) -> Iterator[dict]:
        o = self.opts
        with perturbed(self.view.by_name, sel, o.perturb, o.perturb_scale, o.perturb_prob,
                       torch_generator(seed, stream), o.bit_index) as info:
            if info["n_changed"] < info["n_perturbed"]:
                log.warning("%s: only %d of %d perturbed weights changed value (the others are exactly 0, which %s "
                            "leaves unchanged)", name, info["n_changed"], info["n_perturbed"], o.perturb)
            yield info

    def controls_info(self) -> dict | None:
        """What each control could not do: bottom_k's ineligible weights (the exact zeros, when the
        perturbation leaves them unchanged); random_mag_k's match quality (``match_quality``, see
        :mod:`esa.experiment.match`), or why it was skipped for this metric (``skipped``)."""
        info = {}
        if "bottom_k" in self.opts.controls and not PERTURBATIONS[self.opts.perturb].changes_zero:
            zeros = sum(int((t.param == 0).sum()) for t in self.view.targets)
            info["bottom_k"] = {"ineligible_weights": zeros,
                                "reason": f"exact zeros, which {self.opts.perturb} leaves unchanged, are not drawn"}
        for control, why in unmatched_controls(self.view.metric, self.opts.controls).items():
            info[control] = {"skipped": True, "reason": f"skipped for {self.view.metric}: {why}"}
            log.warning("%s: %s", control, info[control]["reason"])
        if self.matched:
            info[match.CONTROL] = {"match_quality": match.summary(self.matched)}
            if "warning" in info[match.CONTROL]["match_quality"]:
                log.warning("%s", info[match.CONTROL]["match_quality"]["warning"])
        return info or None

    def results(self, rows: Rows, baseline: dict) -> dict:
        """The primary seed's block where single-seed users expect it, every seed's, and statistics.

        ``summary`` and ``tests`` exist only with >= 2 seeds (absent, never zero, otherwise); ``sweep``
        (see :mod:`esa.experiment.sweep`) only with --topk-sweep; ``controls`` (what each control could
        not draw, e.g. bottom_k's exact zeros) only when a control excluded something.
        """
        from esa.analysis import significance  # scipy: only when results are written, never for --help

        v, o = self.view, self.opts
        seeds = list(rows)
        per_seed = {str(s): rows[s][v.topk] for s in seeds}
        out = {"seed": seeds[0], "metric": v.metric, "mode": v.mode, "k": v.topk, "perturb": o.perturb,
               "perturb_scale": o.perturb_scale, "perturb_prob": o.perturb_prob, "bit_index": self.bit(),
               "eval_windows": v.eval_windows, "baseline": baseline, "conditions": per_seed[str(seeds[0])],
               "seeds": seeds, "per_seed": per_seed}
        if len(seeds) >= 2:
            out["summary"] = significance.condition_summary(per_seed)
            out["tests"] = significance.top_vs_controls(per_seed)
        if (info := self.controls_info()) is not None:
            out["controls"] = info
        if o.topk_sweep:
            out["sweep"] = sweep_curve(list(o.topk_sweep), v.topk,
                                       {str(s): {k: rows[s][k] for k in o.topk_sweep} for s in seeds})
        return out
