"""The ESA run: ``pipeline.run(cfg)`` loads, scores each seed with every metric (``seeds``; their
agreement: ``agreement``), measures every enabled experiment's conditions with every evaluator
(``experiments``), and writes one :class:`~esa.runner.results.MetricResult` per metric (``results``,
``records``, ``score_sample``) and the report.  ``context.RunContext`` carries what the steps share;
``RunContext.view(metric)`` is one metric's part of a multi-metric run; ``checkpoint`` is what
``--resume`` reads.

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.outdir, esa.analysis,
esa.reporting, esa.model, esa.data, esa.metrics, esa.experiment, esa.evaluators, esa.config,
esa.superweights (everything below the command lines).
"""
