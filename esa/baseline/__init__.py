"""The baseline runner: reference perplexity, calibration and word/byte metrics of the unmodified
model (``scripts/baseline_runner.py``; flags in :mod:`esa.cli.baseline`).

``evaluate`` (windows, strides, metric definitions), ``config`` (presets), ``run`` (the job).
May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.outdir, esa.model, esa.data, esa.config,
esa.evaluators, esa.reporting (an evaluator's own results file is reported as in a run).
"""
