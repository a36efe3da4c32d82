"""One registry type for every pluggable family: metrics, perturbations, controls.

A registry maps a canonical name to a record.  Registering a name twice is an error (a second
module silently replacing the first is how two metrics end up with one name); a lookup that
misses lists the registered names.  Aliases (other spellings users type) map to canonical names.

May import: nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> record for one ``kind`` of thing (``"metric"``, ``"perturbation"``, ``"control"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, item: T, aliases: tuple[str, ...] = ()) -> T:
        """Register ``item`` under ``name`` (and ``aliases``); any name already taken is an error."""
        for key in (name, *aliases):
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered")
        self._items[name] = item
        self._aliases.update({a: name for a in aliases})
        return item

    def register(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def deco(item: T) -> T:
            return self.add(name, item, aliases)
        return deco

    @contextlib.contextmanager
    def temporary(self, name: str, item: T) -> Iterator[T]:
        """Register ``item`` for the duration of the block (tests, experiments), then remove it."""
        self.add(name, item)
        try:
            yield item
        finally:
            del self._items[name]

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self._items)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def aliases(self) -> dict[str, str]:
        """Alias -> canonical name."""
        return dict(self._aliases)
