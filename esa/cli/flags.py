"""Flags from declarations: an argparse group per list of :class:`esa.options.Option`, the flags a
command line really typed, and the values back into the declared groups.

Every flag's default is its option's default (one source; ``tests/cli/test_flags.py`` checks it for
each tool).  Whether a flag was typed is read from a second parse with every default suppressed,
never from a sentinel default, so the help shows the real defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from esa.errors import UsageError
from esa.evaluators import evaluator_options
from esa.evaluators.spec import EvaluationSpec, with_implied
from esa.options import Option, Options, spec_options


def add_options(group, options: Iterable[Option]) -> None:
    """One flag per option on ``group`` (an argparse parser or argument group); ``dest`` = option name."""
    for o in options:
        names = [o.flag_name, *([o.short] if o.short else [])]
        kw: dict[str, Any] = {"dest": o.name, "help": o.help}
        if o.switch:
            kw.update(action="store_true", default=False)
        elif o.append:
            kw.update(action="append", default=list(o.default), type=o.parse or str)
        else:
            kw.update(default=o.default, type=o.parse or (type(o.default) if o.default is not None else str))
            if o.choices:
                kw["choices"] = o.choices
        if o.metavar:
            kw["metavar"] = o.metavar
        action = group.add_argument(*names, **kw)
        action.show_default = o.show_default  # read by esa.cli.common.Formatter


def typed(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags ``argv`` sets (a second parse with every default suppressed)."""
    saved = {a: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved.items():
            action.default = default


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the flag's long name, for messages."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def values(ns: argparse.Namespace) -> dict[str, Any]:
    """The parsed values with repeatable flags' lists as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()}


def spec(cls: type, vals: Mapping[str, Any], **extra: Any):
    """An instance of the dataclass ``cls`` from the values of its declared options (plus ``extra``)."""
    return cls(**{o.name: vals[o.name] for o in spec_options(cls) if o.name in vals}, **extra)


def options(declared: Iterable[Option], vals: Mapping[str, Any]) -> Options:
    """The :class:`Options` of ``declared`` from the parsed values."""
    return Options((o.name, vals[o.name]) for o in declared)


def check_requires(declared: Iterable[Option], vals: Mapping[str, Any], given: set[str]) -> None:
    """A typed flag whose ``requires`` option is unset is a usage error (``--bits only applies with
    --quantize``), naming every such flag."""
    by_name = {o.name: o for o in declared}
    bad: dict[str, list[str]] = {}
    for o in by_name.values():
        if o.requires and o.name in given and not vals.get(o.requires):
            bad.setdefault(o.requires, []).append(o.flag_name)
    for requires, flags in bad.items():
        need = by_name[requires].flag_name if requires in by_name else "--" + requires.replace("_", "-")
        raise UsageError(f"{', '.join(flags)} only appl{'ies' if len(flags) == 1 else 'y'} with {need}")


def evaluation(vals: Mapping[str, Any], given: set[str]) -> EvaluationSpec:
    """The evaluation group of every tool: ``--evaluate`` and each evaluator's options; an evaluator
    whose own option was typed is added (:func:`esa.evaluators.spec.with_implied`)."""
    return with_implied(spec(EvaluationSpec, vals, options=options(evaluator_options(), vals)), given)
