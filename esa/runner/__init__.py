"""The ESA run: ``pipeline.run(cfg)`` loads, scores each seed with every metric (``seeds``; their
agreement: ``agreement``), perturbs against controls (``perturbation``) or quantizes with and
without protection (``quantization``), writes the records (``records``, ``score_sample``) and the
report.  ``context.RunContext`` carries what the steps share; ``RunContext.view(metric)`` is one
metric's part of a multi-metric run.

May import: everything below the command lines (not esa.cli).
"""
