"""Exit-code policy shared by every command-line entry point.

0 success; 2 bad input (one ``error:`` line on stderr, traceback only with --verbose); 1 crash
(one line, the manifest records it); 130 Ctrl-C (the manifest says ``interrupted``).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from esa.config import UsageError


def guarded(body: Callable[[], int], argv: list[str], interrupted: str) -> int:
    """Run ``body`` and turn its outcome into an exit code; ``interrupted`` is printed on Ctrl-C."""
    verbose = "--verbose" in argv or "-v" in argv
    try:
        return body()
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except UsageError as exc:
        if verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as exc:  # a crash: one line unless --verbose
        if verbose:
            traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {msg} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
