"""The building blocks of an experiment: Top-K selection (``selection``; ``rows`` for per_row), the
control registry, the perturbation registry (each restores the model bit-exactly), RTN quantization
(``quantize``; never writes the model), evaluated conditions, the dose-response sweep.

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.model.
"""
