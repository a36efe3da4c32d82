"""Experiments and their building blocks.

``registry``: the condition record, the :class:`~esa.experiment.registry.Experiment` base and the
experiment registry; ``perturbation`` and ``quantization`` are the registered experiments (each one
file: options, conditions, results).  Building blocks: Top-K selection (``selection``; ``rows`` for
per_row), the control registry (``controls``), the perturbation registry (``perturb``; each restores
the model bit-exactly), RTN quantization (``quantize``; never writes the model), the dose-response
sweep (``sweep``).  Every module here is imported with the package, so an experiment registers by
existing; ``spec`` holds a run's experiment settings.

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.model, esa.analysis.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "spec":  # the run's experiment settings: imported after every experiment registered
        importlib.import_module(f"{__name__}.{_module.name}")
