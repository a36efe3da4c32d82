"""The building blocks of a perturbation experiment: Top-K selection, the control registry, the
perturbation registry (each restores the model bit-exactly), evaluated conditions, the dose-response sweep.

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.model.
"""
