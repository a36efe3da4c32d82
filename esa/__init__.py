"""ESA runner: Extreme Sensitivity Analysis of LLM weights.

The package is layered; each folder's ``__init__`` says what lives there and what it may import
(``tests/test_architecture.py`` enforces it).  From the bottom up:

* ``errors``, ``registry``, ``naming``, ``seeding``: small shared vocabulary (no model, no files);
* ``outdir``: the out-dir contract (atomic writes, manifest, readers, provenance, comparison);
* ``analysis``: statistics of results (numpy/scipy only);
* ``reporting``: report.md, plots, tables, built from an out-dir's files (never torch);
* ``model``: loading, devices, placement, data parallelism, targets, forward passes;
* ``data``: text -> token windows;
* ``metrics``, ``experiment``: the scoring registry; selection, controls, perturbations;
* ``config``: the frozen RunConfig and its validation;
* ``superweights``, ``baseline``: the two stand-alone studies;
* ``runner``: the ESA run itself; ``cli``: every command line (the only code that sees argv).

May import: nothing here; this file only documents the layout.
"""
