"""The out-dir contract: atomic writes (one function), the manifest, naming and creating an out-dir,
reading files back, provenance (versions, git SHA) and comparing two out-dirs.

No torch at import time (reports and comparisons run without it).
May import: esa.errors, esa.options.
"""
