"""The evaluation settings of a run: which evaluators measure every condition, and their options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from esa.errors import UsageError
from esa.evaluators.registry import EVALUATORS, EvalInputs, Evaluator, evaluator_options
from esa.naming import canonical
from esa.options import Options, check_all, opt

REFERENCE = "perplexity"  # every tool's reference measurement: the top level of each row, the ratios


def parse_evaluate(text: str) -> tuple[str, ...]:
    """``"tasks,perplexity"`` -> canonical names, the reference first, the others in the given order
    (duplicates dropped)."""
    names = [canonical(p, EVALUATORS.names(), {}, "--evaluate evaluator") for p in text.split(",") if p.strip()]
    return tuple(dict.fromkeys(sorted(names, key=lambda n: n != REFERENCE)))


@dataclass(frozen=True)
class EvaluationSpec:
    """``evaluate``: the evaluators, perplexity first; ``options``: every evaluator option."""

    evaluate: tuple[str, ...] = opt((REFERENCE,), "what to measure for the baseline and every condition, comma "
                                    "list: " + "; ".join(f"{n} = {EVALUATORS[n].help}" for n in EVALUATORS)
                                    + f". {REFERENCE} is always measured (it is every table's reference)",
                                    parse=parse_evaluate, show_default=REFERENCE)
    options: Options = field(default_factory=lambda: Options.defaults(evaluator_options()))

    def build(self, inputs: EvalInputs) -> list[Evaluator]:
        """The evaluators of the run, built once (the reference first)."""
        return [EVALUATORS[name](self.options, inputs) for name in self.evaluate]

    def describe(self) -> str:
        """What a dry run says will be measured: each evaluator's :meth:`~Evaluator.plan`."""
        return ", ".join(EVALUATORS[name].plan(self.options) for name in self.evaluate)


def with_implied(spec: EvaluationSpec, given: set[str]) -> EvaluationSpec:
    """``spec`` with every evaluator whose own option, or a setting it is ``implied_by``, was typed added
    to ``evaluate`` (``--massive-min X`` or ``--restore-activations`` asks for the ``activations``
    evaluator: no need to name it in ``--evaluate`` too)."""
    wanted = [name for name in EVALUATORS if name not in spec.evaluate
              and any(n in given for n in (*(o.name for o in EVALUATORS[name].options), *EVALUATORS[name].implied_by))]
    return spec if not wanted else dataclasses.replace(spec, evaluate=(*spec.evaluate, *wanted))


def validate_evaluation(spec: EvaluationSpec) -> None:
    """The reference evaluator comes first; each option's own check, then each requested evaluator's
    :meth:`~esa.evaluators.registry.Evaluator.validate` (UsageError)."""
    if not spec.evaluate or spec.evaluate[0] != REFERENCE:
        raise UsageError(f"--evaluate must start with {REFERENCE} (every table reports the ratio to the unmodified "
                         f"model's {REFERENCE}), e.g. --evaluate {','.join((REFERENCE, *spec.evaluate[:1]))}; got "
                         f"{','.join(spec.evaluate) or 'nothing'}")
    if (why := check_all(evaluator_options(), spec.options)) is not None:
        raise UsageError(why)
    for name in spec.evaluate:
        EVALUATORS[name].validate(spec.options)
