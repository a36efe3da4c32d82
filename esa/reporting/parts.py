"""What each kind of results file adds to a run's report: its figure, its report.md section and its
console lines, registered by the module of ``esa/reporting/`` that reports it.

A run draws every registered figure whose results file exists (with or without ``--save-plots``:
each is the experiment's or evaluator's own picture), ``python -m esa.report OUT_DIR`` redraws them,
report.md adds each section and the console summary each part's lines.  So reporting a new
results file is one module here that calls :func:`register`; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Part:
    """``results``: the file it reads (at the top of a single-metric out-dir); ``figure(out_dir)``
    draws its picture and returns the path; ``section(out_dir)`` and ``console(out_dir)`` return
    lines (a section starts with its own ``## heading``); ``notes``: what report.md's file list
    says of its files (``{file name: content}``)."""

    results: str
    figure: Callable[[Path], Path | None] | None = None
    section: Callable[[Path], list[str]] | None = None
    console: Callable[[Path], list[str]] | None = None
    notes: tuple[tuple[str, str], ...] = ()


PARTS: dict[str, Part] = {}


def register(part: Part) -> Part:
    if part.results in PARTS:
        raise ValueError(f"a report part for {part.results} is already registered")
    PARTS[part.results] = part
    return part


def _load_all() -> None:
    """Import every reporting module (each registers its parts)."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"esa.reporting.{module.name}")


def file_notes() -> dict[str, str]:
    """What every registered part says of its files, for report.md's file list."""
    _load_all()
    return {name: note for p in PARTS.values() for name, note in p.notes}


def _present(out_dir: Path, only: Iterable[str] | None = None) -> list[Part]:
    """The registered parts whose results file this out-dir holds (every reporting module loaded
    first), or only those of the results files named in ``only``."""
    _load_all()
    wanted = None if only is None else set(only)
    return [p for p in PARTS.values() if (Path(out_dir) / p.results).is_file()
            and (wanted is None or p.results in wanted)]


def figures(out_dir: Path, only: Iterable[str] | None = None) -> list[Path]:
    """Draw every present part's figure (or those of the results files in ``only``); the paths drawn."""
    drawn = [p.figure(Path(out_dir)) for p in _present(out_dir, only) if p.figure is not None]
    return [path for path in drawn if path is not None]


def sections(out_dir: Path) -> list[str]:
    return [line for p in _present(out_dir) if p.section is not None for line in p.section(Path(out_dir))]


def console(out_dir: Path, only: Iterable[str] | None = None) -> list[str]:
    return [line for p in _present(out_dir, only) if p.console is not None for line in p.console(Path(out_dir))]
