"""Settings declared once, where they are used, and turned into command-line flags generically.

An :class:`Option` is one setting: its name (the config field and, with dashes, the flag), its
default, its help and how the flag's text becomes a value.  A metric, an evaluator or an
experiment declares the options it reads; the typed sub-specs of a run (model, data, output, ...)
declare theirs with :func:`opt` on their dataclass fields.  The command lines build their parsers
from these declarations (:mod:`esa.cli.flags`), so a flag's default *is* the config's default: there
is no second copy to drift.  :class:`Options` is the frozen value set a registry family receives.

May import: esa.errors.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """One setting.

    ``parse``: the flag's text -> value (raising :class:`esa.errors.UsageError` on bad input); None:
    ``int``/``float``/``str`` after the default's type, or a switch (``store_true``) for a ``False``
    default.  ``append``: a repeatable flag collected into a tuple.  ``requires``: the option that must
    be set (truthy) for this one to apply; giving this flag without it is a usage error.
    ``check``: why a value is invalid (``"must be positive, got 0"``; the flag name is put in front),
    or None; it runs on every value, also one read back from a run's config.json.
    ``show_default``: the text ``--help`` shows as the default (None: the default itself).
    """

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] | None = None
    flag: str | None = None
    short: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    append: bool = False
    requires: str | None = None
    check: Callable[[Any], str | None] | None = None
    show_default: str | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def switch(self) -> bool:
        return self.parse is None and self.default is False


def positive(value: Any) -> str | None:
    """``check`` of a count that must be at least 1."""
    return None if value > 0 else f"must be positive, got {value}"


def finite_non_negative(value: float) -> str | None:
    """``check`` of a finite number >= 0."""
    return None if value >= 0.0 and value != float("inf") else f"must be a finite number >= 0, got {value}"


def check_all(options: Iterable[Option], values: Mapping[str, Any]) -> str | None:
    """The first ``"--flag problem"`` among ``values`` of ``options`` (each option's ``check``), or None."""
    for o in options:
        if o.check is not None and o.name in values and (why := o.check(values[o.name])) is not None:
            return f"{o.flag_name} {why}"
    return None


def check_spec(spec: Any) -> None:
    """Run the ``check`` of every :func:`opt` field of dataclass instance ``spec`` (UsageError)."""
    from esa.errors import UsageError

    why = check_all(spec_options(type(spec)), {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    if why is not None:
        raise UsageError(why)


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field that is also an :class:`Option` (its name is the field's)."""
    return field(default=default, metadata={"option": dict(default=default, help=help, **kw)})


def spec_options(cls: type) -> list[Option]:
    """The :class:`Option` of every field of dataclass ``cls`` declared with :func:`opt`."""
    return [Option(name=f.name, **f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def spec_from(cls: type, values: Mapping[str, Any], **extra: Any):
    """An instance of dataclass ``cls`` from the entries of ``values`` that are its fields (others ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, **extra)


class Options(Mapping[str, Any]):
    """A frozen, hashable set of option values with attribute access (``opts.perturb``)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        object.__setattr__(self, "_values", dict(values))

    @classmethod
    def defaults(cls, options: Iterable[Option]) -> Options:
        return cls((o.name, o.default) for o in options)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option {name!r}; known: {', '.join(self._values)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"Options are frozen (use replace): {name}")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items(), key=lambda kv: kv[0])))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Options) and self._values == other._values

    def __repr__(self) -> str:
        return "Options(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def replace(self, **changes: Any) -> Options:
        unknown = set(changes) - set(self._values)
        if unknown:
            raise KeyError(f"unknown options {sorted(unknown)}")
        return Options({**self._values, **changes})

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._values.items()}


def flat_json(cfg: Any) -> dict:
    """A configuration dataclass as one flat JSON-ready dict: nested groups (dataclasses) and
    :class:`Options` are flattened into it, tuples become lists (the record config.json keeps)."""
    out: dict = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_json(value))
        elif isinstance(value, Options):
            out.update(value.to_json())
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def from_flat(cls: type, flat: Mapping[str, Any]) -> Any:
    """The inverse of :func:`flat_json`: an instance of ``cls`` from a flat dict (lists back to tuples;
    a name the dict lacks keeps its default).  Raises KeyError naming entries no field takes."""
    used: set[str] = set()

    def build(c: type) -> Any:
        hints = typing.get_type_hints(c)
        kw = {}
        for f in dataclasses.fields(c):
            t = hints[f.name]
            if isinstance(t, type) and dataclasses.is_dataclass(t):
                kw[f.name] = build(t)
            elif t is Options:
                default = f.default_factory()
                kw[f.name] = default.replace(**{k: _tuples(flat[k]) for k in default if k in flat})
                used.update(k for k in default if k in flat)
            elif f.name in flat:
                kw[f.name] = _tuples(flat[f.name])
                used.add(f.name)
        return c(**kw)

    out = build(cls)
    unknown = set(flat) - used
    if unknown:
        raise KeyError(", ".join(sorted(unknown)))
    return out
