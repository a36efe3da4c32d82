"""What every command line shares: the parser base, logging, exit codes, out-dir naming, dry-run plans.

Exit codes: 0 success; 2 bad input (one ``error:`` line on stderr, traceback only with --verbose);
1 crash (one line, the manifest records it); 130 Ctrl-C (the manifest says ``interrupted``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from esa.errors import UsageError
from esa.model.device import DeviceChoice, resolve_device


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default (an option's ``show_default`` where it declares one;
    none for an unset or off default); the description printed as written."""

    def _get_help_string(self, action):
        shown = getattr(action, "show_default", None)
        if shown is None:
            default = action.default
            if default is None or default is False or default is argparse.SUPPRESS or (
                    isinstance(default, (list, tuple)) and not default):
                return action.help
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{action.help} (default: {shown})".replace("%", "%%") if shown else action.help


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line on stderr and exit 2 (argparse prints usage too)."""

    def __init__(self, **kw) -> None:
        super().__init__(formatter_class=Formatter, **kw)

    def error(self, message: str):
        raise UsageError(message)


def explicit(given: set[str]) -> dict[str, bool]:
    """The :class:`~esa.model.device.ModelSpec` record of whether --device and --dtype were typed
    (a default may fall back, a typed choice never)."""
    return {"device_explicit": "device" in given, "dtype_explicit": "dtype" in given}


def tool_main(argv: list[str] | None, config: Callable[[list[str]], object],
              plan: Callable[[object], tuple[str, list[tuple[str, str]], tuple[str, ...]]],
              run: str, out_dir: Callable[[object], Path]) -> int:
    """The body of a stand-alone tool's ``main``: ``config(argv)`` -> config; then either the dry-run plan
    (``plan(cfg)`` gives title, rows, warnings) or logging and ``run(cfg, out_dir)``, where ``run`` is
    "module:function", imported only for a real run (transformers loads there, not at --help)."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        cfg = config(argv)
        if cfg.dry_run:
            print(format_plan(*plan(cfg)), flush=True)
            return 0
        setup_logging(cfg.verbose)
        module, function = run.split(":")
        return getattr(importlib.import_module(module), function)(cfg, cfg.out_dir or out_dir(cfg))

    return guarded(body, argv, "interrupted (the manifest says so)")


def setup_logging(verbose: bool) -> None:
    """One logging setup for every tool: INFO (DEBUG with --verbose) on stderr; rank 0 speaks for all."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "httpcore", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks for all ranks
        logging.getLogger().setLevel(logging.WARNING)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity_error()


def plan_device(device: str, device_explicit: bool, dtype: str, dtype_explicit: bool) -> DeviceChoice:
    """The device a real run would use, for a dry run: a machine without CUDA is reported as a
    warning (a fact about this machine, not about the configuration), never raised."""
    try:
        return resolve_device(device, device_explicit, dtype, dtype_explicit)
    except UsageError as exc:
        return DeviceChoice(device, dtype, (f"{exc}; a real run on this machine would stop",))


def format_plan(title: str, rows: list[tuple[str, str]], warnings: tuple[str, ...] | list[str] = ()) -> str:
    """A dry run's plan: a title line, then ``label: value`` rows aligned, then the warnings."""
    width = max(len(label) for label, _ in [*rows, ("warning", "")]) + 2
    lines = [title] + [f"  {label + ':':<{width}}{value}" for label, value in rows]
    lines += [f"  {'warning:':<{width}}{w}" for w in warnings]
    return "\n".join(lines)


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
        kind = type(exc)  # qualified unless built in: struct.error, not "error: error: ..."
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        print(f"error: {name}: {msg} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
