"""``esa-compare RUN_DIR... --out DIR``: one tidy table, a summary and figures across finished ESA runs.

Reads out-dirs only (never torch, never a model): :mod:`esa.compare.table` finds and checks the runs
and turns every perturbation results file into rows of ``runs.csv``; :mod:`esa.compare.summary`
writes ``summary.md``; :mod:`esa.compare.figures` draws the figures from the table's rows;
:mod:`esa.compare.cli` is the command line (also ``python -m esa.compare``).

May import: esa.errors, esa.outdir, esa.analysis, esa.reporting.
"""
