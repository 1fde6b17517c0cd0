"""Checks of config mappings against type hints (dataclass fields, function parameters), so
that a YAML value of the wrong type is named at load time, before any work is done."""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError


def type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as YAML gives it) fits ``hint``; bool is not taken for int or float,
    a list is taken for a tuple, and a dataclass type takes a mapping of its fields."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(type_ok(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint in (int, float):
        return not isinstance(value, bool) and isinstance(value, int if hint is int else (int, float))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(type_ok(k, args[0]) and type_ok(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))
    return isinstance(value, hint)


def _name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint).replace("typing.", "")


def hints_of(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The type hints of a dataclass's fields or a function's parameters, less ``skip``."""
    hints = typing.get_type_hints(obj)
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
    else:
        names = [n for n, p in inspect.signature(obj).parameters.items() if p.kind is not p.VAR_KEYWORD]
    return {n: hints.get(n, Any) for n in names if n not in skip}


def check_fields(d: Any, hints: dict[str, Any], where: str = "") -> None:
    """Refuse a non-mapping, keys that are not in ``hints`` and values of the wrong type; each
    error names the key (prefixed with ``where``, e.g. ``source.``)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping of keys to values, got {d!r}")
    unknown = sorted(set(d) - set(hints), key=str)
    if unknown:
        raise ConfigError(f"{where.rstrip('.') or 'config'} has unknown key(s) {unknown}; known: {sorted(hints)}")
    for key, value in d.items():
        if not type_ok(value, hints[key]):
            raise ConfigError(f"{where}{key} must be {_name(hints[key])}, got {value!r}")


def check_unique(key: str, items: list, shown: list | None = None) -> None:
    """A non-empty list without repeats (``items`` compared, ``shown`` named in the error)."""
    shown = items if shown is None else shown
    if not items:
        raise ConfigError(f"{key} must list at least one entry")
    seen: dict = {}
    for item, name in zip(items, shown):
        if item in seen:
            raise ConfigError(f"{key} lists {seen[item]!r} twice" + (f" (as {name!r})" if name != seen[item] else ""))
        seen[item] = name
