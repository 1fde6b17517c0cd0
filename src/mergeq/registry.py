"""Name -> callable registries for PTQ methods, merge methods and rounding policies.

Modelled on mergekit's merge-method registry: registering a duplicate name is an
error, and looking up an unknown name lists the known ones.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A small named registry of callables (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._options: Dict[str, type | None] = {}

    def register(self, name: str, options: type | None = None) -> Callable[[T], T]:
        """Register under ``name``; ``options`` is the dataclass of the entry's keyword options
        (None: it takes none), so a config can be checked before any work is done."""
        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            self._options[name] = options
            return fn

        return deco

    def options(self, name: str) -> type | None:
        """The options dataclass registered with ``name`` (None if it takes no options)."""
        self.get(name)
        return self._options[name]

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


PTQ_METHODS: Registry = Registry("PTQ method")
MERGE_METHODS: Registry = Registry("merge method")
