"""report.md, the plots, the summary tables and the super-weight files, built from an out-dir's
files alone (an old run can be re-reported without its model).

Never imports torch or transformers (tested with both made unimportable).
May import: esa.errors, esa.naming, esa.outdir, esa.analysis.
"""
