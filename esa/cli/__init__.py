"""Every command line: the only code that sees argv.

``common`` (the parser base, logging, exit codes, dry-run formatting), ``runner``
(esa_runner.py), ``plan`` (its --dry-run), ``baseline``, ``superweights``, ``overlap`` and
``report`` (``python -m esa.report``).  Each turns flags into a frozen config and calls library
code, which never receives an argparse Namespace.
May import: anything in esa (it is the top layer).
"""
