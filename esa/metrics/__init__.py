"""Sensitivity metrics: one registry, one module per metric family.

``registry`` holds the :class:`~esa.metrics.registry.Metric` record, its ``Collector`` protocol and
the registry; ``passes`` runs each kind of scoring pass once for all requested metrics
(``score_metrics``, ``compute_scores``); ``grads`` the fp32 gradient accumulators.  ``gradient``
(grad_x_weight, grad_squared), ``curvature`` (hessian_diag, hutchinson_diag), ``activation``
(act_mag), ``magnitude``, ``taylor`` (taylor2) and ``obs`` each register their metrics.  Every
module of this package is imported here, so a new metric is one new file (plus its test): its flags,
``--help``, the dry run and ``config.json`` come from its registration.  ``spec`` holds the run's
scoring settings (:class:`~esa.metrics.spec.ScoringSpec`).

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.model.  Never the
experiment, the runner, the out-dir or reporting.
"""

import importlib
import pkgutil

from esa.metrics.passes import Scored, compute_scores, score_metrics
from esa.metrics.registry import METRICS, Collector, Metric, MetricContext, Scores, metric

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "spec":  # the run's scoring settings: imported by the config, after every metric registered
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METRICS", "Collector", "Metric", "MetricContext", "Scored", "Scores", "compute_scores", "metric",
           "score_metrics"]
