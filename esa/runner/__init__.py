"""The ESA run: ``pipeline.run(cfg)`` loads, scores each seed (``seeds``), perturbs against
controls (``perturbation``), writes the records (``records``, ``score_sample``) and the report.
``context.RunContext`` carries what the steps share.

May import: everything below the command lines (not esa.cli).
"""
