"""Statistics of results: per-tensor score statistics, cross-seed significance, the one Jaccard
(seed stability and run comparison), the score-distribution file reader.

Plain numpy/scipy on numbers and index arrays; never torch, so reports can use it.
May import: esa.errors, esa.naming, esa.outdir.
"""
