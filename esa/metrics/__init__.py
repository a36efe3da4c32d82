"""Sensitivity metrics: one registry, one module per metric family.

``registry`` holds the :class:`~esa.metrics.registry.Metric` record, the registry and
``compute_scores``; ``gradient`` (grad_x_weight, grad_squared), ``curvature`` (hessian_diag,
hutchinson_diag), ``activation`` (act_mag), ``magnitude``, ``taylor`` (taylor2) and ``obs`` each
register their metrics.  Every
module of this package is imported here, so a new metric is one new file (plus its test).

May import: esa.model, esa.seeding, esa.registry, esa.errors.  Never the experiment, the runner,
the out-dir or reporting.
"""

import importlib
import pkgutil

from esa.metrics.registry import METRICS, Metric, MetricContext, Scores, compute_scores, metric

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METRICS", "Metric", "MetricContext", "Scores", "compute_scores", "metric"]
