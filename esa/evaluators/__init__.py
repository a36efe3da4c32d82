"""Measurements of the model as it is now: one registry, one module per evaluator.

``registry`` holds the :class:`~esa.evaluators.registry.Evaluator` base, its inputs and the
registry; ``measure`` runs every condition of a run with every requested evaluator once (the
evaluation cache and the journal that ``--resume`` reads, observers riding a driver's forward); ``perplexity`` is the
first evaluator; ``activations`` measures the residual stream's massive activations; ``tasks`` measures
zero-shot accuracy on lm-evaluation-harness tasks (``task_data``: where their data come from and how
lm-eval builds its tasks on it; ``task_stats``: the statistics over seeds of its ``task_results.json``).
Every module of this package is imported here, so a new evaluator is one new file (plus its test):
``--evaluate``, its flags, the dry run and the journal all come from its registration.  ``spec``
holds the run's evaluation settings (:class:`~esa.evaluators.spec.EvaluationSpec`).

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.model, esa.outdir, esa.analysis.
"""

import importlib
import pkgutil

from esa.evaluators.registry import EVALUATORS, EvalInputs, Evaluator, evaluator, evaluator_options

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "spec":  # the run's evaluation settings: imported after every evaluator registered
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EVALUATORS", "EvalInputs", "Evaluator", "evaluator", "evaluator_options"]
