"""The one validator: mappings (parsed YAML) checked against type hints and built into dataclasses.

``from_mapping(Cls, data, "data")`` refuses an unknown key, a missing required key or a value of
the wrong type with a one-line :class:`ConfigError` naming the key path (``data.image_size:
expected int, got str '224'``). :func:`check_keys` does the same for a mapping of keyword
options against a dataclass's fields or a function's parameters (:func:`hints_of`), which is how
the PTQ methods' and merge rules' options are checked. Supported hints: ``Any``, ``bool``,
``int``, ``float`` (ints accepted), ``str``, ``None``, ``Literal[...]``, unions (``X | None``),
``list[X]``, ``Sequence[X]`` (a list), ``tuple[X, ...]``, ``dict[str, X]``, ``Mapping[str, X]`` and
nested dataclasses (built from a mapping). An ``int`` or ``float`` must also lie within its bound
in :data:`mergeq.bounds.BOUNDS` (found by the key's name), a float be finite.
A union of dataclasses that all have a ``kind: Literal[...]`` field is *tagged*: the mapping's
``kind`` picks the class (missing: the first), so errors speak of the chosen kind's keys.
Lists come back as lists, tuples as tuples, so a dataclass dumped with ``dataclasses.asdict``
and loaded again compares equal.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

from .bounds import check_bound
from .errors import ConfigError

T = TypeVar("T")


def _name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def kinds_of(cls: Any) -> tuple | None:
    """The values of a dataclass's ``kind: Literal[...]`` field, or None."""
    if not dataclasses.is_dataclass(cls):
        return None
    hint = typing.get_type_hints(cls).get("kind")
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _tagged(options: list, value: Any, where: str) -> Any:
    """The member of a tagged union that ``value['kind']`` names (missing kind: the first member)."""
    kind = value.get("kind", kinds_of(options[0])[0])
    for cls in options:
        if kind in kinds_of(cls):
            return from_mapping(cls, value, where)
    known = [k for cls in options for k in kinds_of(cls)]
    raise ConfigError(f"{where}.kind: expected one of {known}, got {kind!r}")


def check_value(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked (and built, for nested dataclasses) against ``hint``; ConfigError naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # X | None: the error of X, which names the bad item
            return check_value(options[0], value, where)
        if isinstance(value, Mapping) and all(kinds_of(a) for a in options):
            return _tagged(options, value, where)
        for h in options:
            try:
                return check_value(h, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(_name(a) for a in args)}, "
                          f"got {type(value).__name__} {value!r}")
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_mapping(hint, value, where)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
            return tuple(check_value(h, v, f"{where}[{i}]") for i, (h, v) in enumerate(zip(args, value)))
        out = [check_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args or (Any, Any)
        return {check_value(kt, k, f"{where} key"): check_value(vt, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return check_bound(where, float(value))
    if hint is type(None) and value is None:
        return None
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return check_bound(where, value) if hint in (int, float) else value
    raise ConfigError(f"{where}: expected {_name(hint)}, got {type(value).__name__} {value!r}")


def check_keys(data: Any, hints: Mapping[str, Any], where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` (a mapping of the keys in ``hints``) with every value checked; an unknown key, a
    missing ``required`` key or a value of the wrong type is a ConfigError naming it."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown key; known: {', '.join(hints) or '(none)'}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key is missing")
    return {k: check_value(hints[k], v, f"{where}.{k}") for k, v in data.items()}


def hints_of(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The type hints of a dataclass's init fields or a function's keyword parameters, less ``skip``."""
    hints = typing.get_type_hints(obj)
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj) if f.init]
    else:
        names = [n for n, p in inspect.signature(obj).parameters.items()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return {n: hints.get(n, Any) for n in names if n not in skip}


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``data`` (a mapping of field names), checking every key and value."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    required = tuple(f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    return cls(**check_keys(data, hints_of(cls), where, required))


def check_unique(where: str, items: list, shown: list | None = None) -> None:
    """A non-empty list without repeats (``items`` compared, ``shown`` named in the error)."""
    shown = items if shown is None else shown
    if not items:
        raise ConfigError(f"{where}: must list at least one entry")
    seen: dict = {}
    for item, name in zip(items, shown):
        if item in seen:
            also = f" (as {name!r})" if name != seen[item] else ""
            raise ConfigError(f"{where}: lists {seen[item]!r} twice{also}")
        seen[item] = name
