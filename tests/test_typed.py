"""The one validator: mappings into dataclasses, every bad key or value named."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergeq.data.spec import FolderData
from mergeq.errors import ConfigError
from mergeq.typed import check_value, from_mapping


@dataclass
class Inner:
    lr: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    bits: list[int] = field(default_factory=lambda: [4])
    pair: tuple[int, int] = (1, 2)
    opts: dict[str, Any] = field(default_factory=dict)
    maybe: int | str | None = None


_names = st.text("abcXYZ_ 0", min_size=1, max_size=8)
folder_specs = st.builds(
    FolderData, root=_names, kind=st.sampled_from(["folder", "office_home"]), source=st.none() | _names,
    targets=st.none() | st.lists(_names, max_size=3), image_size=st.integers(1, 512),
    resize=st.none() | st.integers(1, 600), normalize=st.sampled_from(["imagenet", "standardize", "none"]),
    test_fraction=st.floats(0.01, 0.99), transductive=st.booleans(), augment=st.booleans(),
    classes=st.none() | st.lists(_names, max_size=3),
    splits=st.none() | st.dictionaries(_names, st.fixed_dictionaries({"train": st.integers(0, 9)}), max_size=2))


@given(folder_specs)
def test_asdict_round_trips(spec):
    assert from_mapping(FolderData, dataclasses.asdict(spec), "data") == spec


@given(folder_specs, st.sampled_from(["image_size", "augment", "targets", "test_fraction", "normalize"]))
def test_a_wrong_type_is_named(spec, key):
    bad = {"image_size": "224", "augment": 1, "targets": "Art", "test_fraction": "0.2", "normalize": 3}[key]
    with pytest.raises(ConfigError, match=rf"^data\.{key}: expected "):
        from_mapping(FolderData, {**dataclasses.asdict(spec), key: bad}, "data")


def test_nested_unions_tuples_and_messages():
    o = from_mapping(Outer, {"name": "x", "inner": {"lr": 1}, "pair": [3, 4], "maybe": "s"}, "cfg")
    assert o.inner == Inner(lr=1.0) and isinstance(o.inner.lr, float) and o.pair == (3, 4) and o.maybe == "s"
    cases = [
        ({"name": "x", "inner": {"lr": "fast"}}, r"^cfg\.inner\.lr: expected float, got str 'fast'$"),
        ({"name": "x", "inner": {"mode": "c"}}, r"^cfg\.inner\.mode: expected one of \['a', 'b'\], got 'c'$"),
        ({"name": "x", "inner": {"speed": 1}}, r"^cfg\.inner\.speed: unknown key; known: lr, mode$"),
        ({"name": "x", "bits": [4, True]}, r"^cfg\.bits\[1\]: expected int, got bool True$"),
        ({"name": "x", "pair": [1]}, r"^cfg\.pair: expected a list of 2 items, got 1$"),
        ({"name": "x", "opts": []}, r"^cfg\.opts: expected a mapping"),
        ({"name": "x", "maybe": 1.5}, r"^cfg\.maybe: expected int or str or null, got float 1\.5$"),
        ({}, r"^cfg\.name: required key is missing$"),
        ([1], r"^cfg: expected a mapping of Outer fields"),
    ]
    for data, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            from_mapping(Outer, data, "cfg")
    assert check_value(Literal[1, True], True, "x") is True
    with pytest.raises(ConfigError):
        check_value(Literal[1], True, "x")  # True == 1 in Python, not here


def test_tagged_unions_pick_the_class_by_kind():
    from mergeq.data.spec import DataSpec, DigitsData
    from mergeq.typed import check_keys, hints_of

    assert check_value(DataSpec, {"kind": "office_home", "root": "r"}, "data") == FolderData(root="r", kind="office_home")
    assert check_value(DataSpec, {}, "data") == DigitsData()  # no kind: the first member
    with pytest.raises(ConfigError, match=r"^data\.image_size: unknown key; known: kind, source, targets$"):
        check_value(DataSpec, {"image_size": 32}, "data")  # the digits kind's keys, not "expected A or B"
    with pytest.raises(ConfigError, match=r"^data\.bogus: unknown key; known: root, kind"):
        check_value(DataSpec, {"kind": "folder", "root": "r", "bogus": 1}, "data")
    with pytest.raises(ConfigError, match=r"^data\.kind: expected one of \['digits', 'folder', 'office_home', 'streets', 'segmentation'\]"):
        check_value(DataSpec, {"kind": "imagenet"}, "data")

    def policy(layers, alphas, samples: int = 30, select: Literal["layer", "model"] = "layer"):
        pass

    hints = hints_of(policy, skip=("layers", "alphas"))
    assert check_keys({"samples": 3}, hints, "opts") == {"samples": 3}
    with pytest.raises(ConfigError, match=r"^opts\.select: expected one of \['layer', 'model'\], got 'block'$"):
        check_keys({"select": "block"}, hints, "opts")
    with pytest.raises(ConfigError, match=r"^opts\.seed: unknown key; known: samples, select$"):
        check_keys({"seed": 1}, hints, "opts")


def test_sequences_mappings_and_optionals_are_read_as_advertised():
    """``Sequence[X]`` takes a YAML list (returned as a list), ``Mapping[str, X]`` a mapping, and
    the bounds of mergeq.bounds apply to the items (issue 24: average weights were refused)."""
    from typing import Mapping, Sequence

    assert check_value(Sequence[float], [0.5, 1], "m.weights") == [0.5, 1.0]
    assert check_value(Sequence[float] | None, None, "m.weights") is None
    assert check_value(Mapping[str, int], {"a": 1}, "m") == {"a": 1}
    assert check_value(tuple[int, ...], [1, 2], "m") == (1, 2)
    for hint, value, where, msg in [
        (Sequence[float], "0.5", "m.weights", r"^m\.weights: expected a list, got str '0\.5'$"),
        (Sequence[float], [0.5, -1], "m.weights", r"^m\.weights\[1\]: must be at least 0, got -1\.0$"),
        (Mapping[str, int], [1], "m", r"^m: expected a mapping, got list \[1\]$"),
        (float | None, float("nan"), "m.lr", r"^m\.lr: must be a finite number, got nan$"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            check_value(hint, value, where)
