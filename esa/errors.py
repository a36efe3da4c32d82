"""The one exception type for bad user input (the bottom of the package: it imports nothing).

Every mistake detectable from the user's input (flags, files, model ids) raises
:class:`UsageError`; each command line prints its message as one line and exits with code 2.

May import: nothing.
"""


class UsageError(Exception):
    """Bad user input: the CLI prints the message on one line and exits with code 2."""
