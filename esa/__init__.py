"""ESA runner: Extreme Sensitivity Analysis of LLM weights.

The package is layered.  Each part (a folder, or a module at this level) says in its own docstring
what lives there and, in one sentence starting ``May import:``, which other parts it may import;
``tests/test_architecture.py`` reads those sentences and fails on an import they do not allow or on
an import cycle.  From the bottom up:

* ``errors``, ``registry``, ``naming``, ``seeding``, ``options``: small shared vocabulary (no model,
  no files; ``options`` declares settings once, where they are used, and the flags come from them);
* ``outdir``: the out-dir contract (atomic writes, manifest, readers, provenance, comparison);
* ``analysis``: statistics of results (numpy/scipy only);
* ``reporting``: report.md, plots, tables, built from an out-dir's files (never torch);
* ``model``: loading, devices, placement, data parallelism, targets, forward passes;
* ``data``: text -> token windows;
* ``metrics`` (scoring), ``experiment`` (selection, controls, perturbations and the experiments that
  turn selections into conditions), ``evaluators`` (measurements of a condition): three registries;
* ``config``: the frozen RunConfig of groups and their validation;
* ``superweights``, ``baseline``: the two stand-alone studies;
* ``runner``: the ESA run itself; ``cli``: every command line (the only code that sees argv).

May import: nothing (this file only documents the layout).
"""
