"""Mappings (parsed YAML) into dataclasses, checked against the fields' type hints: one validator.

``from_mapping(Cls, data, "data")`` refuses an unknown key, a missing required key or a value of
the wrong type with a one-line :class:`ConfigError` naming the key path (``data.image_size:
expected int, got str '224'``). Supported hints: ``Any``, ``bool``, ``int``, ``float`` (ints
accepted), ``str``, ``None``, ``Literal[...]``, unions (``X | None``), ``list[X]``,
``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses (built from a mapping). Lists come
back as lists, tuples as tuples, so a dataclass dumped with ``dataclasses.asdict`` and loaded
again compares equal.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

from .errors import ConfigError

T = TypeVar("T")


def _name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
            return tuple(check_value(h, v, f"{where}[{i}]") for i, (h, v) in enumerate(zip(args, value)))
        out = [check_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args or (Any, Any)
        return {check_value(kt, k, f"{where} key"): check_value(vt, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is type(None) and value is None:
        return None
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_name(hint)}, got {type(value).__name__} {value!r}")


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``data`` (a mapping of field names), checking every key and value."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key; known: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key is missing")
    return cls(**{k: check_value(hints[k], v, f"{where}.{k}") for k, v in data.items()})
