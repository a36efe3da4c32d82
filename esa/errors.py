"""The one exception type for bad user input, and how a light command line turns it into exit code 2
(the bottom of the package: it imports nothing).

Every mistake detectable from the user's input (flags, files, model ids) raises
:class:`UsageError`; each command line prints its message as one line and exits with code 2.

May import: nothing.
"""


class UsageError(Exception):
    """Bad user input: the CLI prints the message on one line and exits with code 2."""


def light_main(parse, body, argv: list[str]) -> int:
    """The exit code of a light command line (one that never loads a model: ``esa.report``,
    ``esa-compare``): ``parse(argv)`` (argparse: --help exits 0, a bad flag 2 with its own line), then
    ``body(namespace)``, whose :class:`UsageError` is one line on stderr and exit code 2."""
    import sys

    try:
        ns = parse(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, argparse's own line)
        return int(exc.code or 0)
    try:
        body(ns)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
