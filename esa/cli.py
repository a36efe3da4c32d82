"""Exit-code policy shared by every command-line entry point.

0 success; 2 bad input (one ``error:`` line on stderr, traceback only with --verbose); 1 crash
(one line, the manifest records it); 130 Ctrl-C (the manifest says ``interrupted``).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

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


def start_tool(out_dir: Path, model: str, device: str, device_explicit: bool, dtype: str, dtype_explicit: bool):
    """The shared start of the stand-alone tools (baseline runner, super-weight finder): check and
    create ``out_dir``, resolve the device (warnings logged), open the manifest and load the model
    inside its ``load_model`` phase.  Returns ``(out_dir, choice, manifest, model, tokenizer)``; a
    failed load is recorded in the manifest.  Heavy imports happen here, not at CLI import."""
    from esa import models
    from esa.outputs import Manifest, prepare_out_dir

    log = logging.getLogger("esa")
    out_dir = prepare_out_dir(out_dir)
    choice = models.resolve_device(device, device_explicit, dtype, dtype_explicit)
    for w in choice.warnings:
        log.warning(w)
    manifest = Manifest(out_dir)
    with manifest.recording(), manifest.phase("load_model"):
        log.info("loading model %s on %s in %s", model, choice.device, choice.dtype)
        net, tok = models.load_model(model, choice.device, choice.dtype)
    return out_dir, choice, manifest, net, tok
