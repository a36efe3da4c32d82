"""The super-weight detector (Yu et al. 2024): ``detect`` (spikes at MLP down projections),
``ablation`` (validation by perplexity, Top-K overlap), ``run`` (``scripts/find_super_weights.py``).

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.outdir, esa.model, esa.data,
esa.experiment, esa.evaluators, esa.reporting (its files are written from the results dict).
"""
