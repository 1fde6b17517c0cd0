"""Issue 24: every numeric option bounded from one table (mergeq.bounds), every registered option
settable from YAML, and the machine's limits (threads, workers, device, seed, opset) refused in one
line naming the key. Configs are validated, never trained."""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import re
import types
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from mergeq.bounds import BOUNDS, available_cpus, bound_of
from mergeq.cli import build_parser, load_cli_config, main
from mergeq.errors import ConfigError
from mergeq.experiments.config import Config, hint_at, set_path
from mergeq.merge import MERGE_METHODS, ROUNDINGS
from mergeq.ptq import PTQ_METHODS
from mergeq.typed import hints_of

ROOT = Path(__file__).resolve().parents[1]
FOLDER = {"data.kind": "folder", "data.root": ".", "data.source": "A"}  # what a data.* size needs
SEGMENTATION = {"data.kind": "segmentation", "data.source": "A",  # what data.size / data.crop need
                "data.domains": {"A": {"dataset": "pair", "images": ".", "labels": "."}}}
MERGE_SKIP, ROUNDING_SKIP = ("models", "base", "rounding"), ("layers", "alphas")


def _defaults(obj) -> dict[str, object]:
    """The defaults of a dataclass's fields or a function's keyword parameters (none: absent)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(obj).parameters.items() if p.default is not p.empty}


def _numeric(hint, path: str, default=None) -> list[tuple[str, type, object]]:
    """(path, int or float, default) of every numeric leaf under ``hint``; a list's item is ``path[0]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return [x for a in args if a is not type(None) for x in _numeric(a, path, default)]
    if dataclasses.is_dataclass(hint):
        return _fields(hint, hints_of(hint), path)
    if origin in (list, tuple, collections.abc.Sequence):
        return _numeric(args[0], f"{path}[0]")
    return [(path, hint, default)] if hint in (int, float) else []


def _fields(owner, hints: dict, path: str) -> list[tuple[str, type, object]]:
    defaults = _defaults(owner)
    return [x for k, h in hints.items() for x in _numeric(h, f"{path}.{k}".lstrip("."), defaults.get(k))]


def numeric_options() -> list[tuple[str, type, object, dict, str]]:
    """(config path, type, default, settings it needs, the path its error names) of every numeric
    option: the config's sections, every PTQ method's options, merge method and rounding policy."""
    def needs(p: str) -> dict:
        if p.startswith(("data.size", "data.crop", "data.window", "data.stride")):
            return SEGMENTATION
        return FOLDER if p.startswith("data.") else {}

    out = [(p, t, d, needs(p), p) for p, t, d in _numeric(Config, "")]
    for m in PTQ_METHODS:
        if PTQ_METHODS.options(m) is not None:
            out += [(p, t, d, {}, p) for p, t, d in _numeric(PTQ_METHODS.options(m), f"ptq.options.{m}")]
    for m in MERGE_METHODS:
        fn = MERGE_METHODS.get(m)
        out += [(p, t, d, {}, p) for p, t, d in _fields(fn, hints_of(fn, skip=MERGE_SKIP), f"merge.options.{m}")]
    for r in ROUNDINGS:
        fn = ROUNDINGS.get(r)
        out += [(p, t, d, {"merge.rounding": r}, p.replace("rounding_options", f"rounding_options (rounding {r})"))
                for p, t, d in _fields(fn, hints_of(fn, skip=ROUNDING_SKIP), "merge.rounding_options")]
    return out


OPTIONS = numeric_options()


def _invalid(path: str, kind: type) -> list:
    """A value just past each side of the option's bound, and NaN and infinity for a float."""
    b = bound_of(path)
    values = [] if b.low is None else [b.low if b.low_open else b.low - 1]
    if b.upper() is not None:
        values.append(b.upper() if b.high_open else b.upper() + 1)
    return [kind(v) for v in values] + ([math.nan, math.inf, -math.inf] if kind is float else [])


def _config(settings: dict, path: str, value) -> Config:
    """The config of ``settings`` and ``path: value``, through YAML text as ``--config`` reads it."""
    data: dict = {}
    for key, v in settings.items():
        set_path(data, key, v)
    if path.endswith("[0]"):  # a list's item, or every item of a fixed-length tuple
        path = path[:-3]
        hint = hint_at(path) if not path.startswith(("ptq.", "merge.")) else list
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
        value = [value] * (len(args) if args and Ellipsis not in args else 1)
    set_path(data, path, value)
    return Config.from_dict(yaml.safe_load(yaml.safe_dump(data)), "config")


def test_every_numeric_option_has_a_bound_and_its_default_lies_within():
    assert len(OPTIONS) > 100 and {p for p, *_ in OPTIONS} >= {
        "adapt.source.lr", "adapt.shot.batch_size", "merge.options.ties.density", "merge.options.average.weights[0]",
        "runtime.threads", "runtime.seed", "data.image_size", "tta.n_images", "ptq.options.hdrq.iters"}
    for path, kind, default, settings, _ in OPTIONS:
        assert bound_of(path) is not None, f"{path}: no entry in mergeq.bounds.BOUNDS"
        if default is not None:
            _config(settings, path, default)  # raises if the default is out of bounds


_CASES = [pytest.param(path, settings, where, bad, id=f"{where}={bad!r}")
          for path, kind, _, settings, where in OPTIONS for bad in _invalid(path, kind)]


@pytest.mark.parametrize("path, settings, where, bad", _CASES)
def test_a_value_past_a_bound_is_one_line_naming_the_key(path, settings, where, bad):
    with pytest.raises(ConfigError) as e:
        _config(settings, path, bad)
    msg = str(e.value)
    assert re.match(rf"^(config\.)?{re.escape(where)}: must be ", msg) and msg.endswith(f"got {bad!r}"), msg
    assert "\n" not in msg


def test_the_issues_values_are_refused_before_any_work():
    cases = {"adapt.source.lr": math.nan, "adapt.source.batch_size": 0, "adapt.shot.batch_size": 0,
             "adapt.source.epochs": -1, "adapt.shot.epochs": -3, "merge.options.task_arithmetic.scale": math.nan,
             "merge.options.ties.density": 0.0, "runtime.threads": 5000, "runtime.seed": -1,
             "data.image_size": 100_000}
    for path, bad in cases.items():
        with pytest.raises(ConfigError, match=rf"^(config\.)?{re.escape(path)}: must be "):
            _config(FOLDER if path.startswith("data.") else {}, path, bad)
    with pytest.raises(ConfigError, match=r"merge\.options\.ties\.density: must be at most 1, got 1\.5"):
        _config({}, "merge.options.ties.density", 1.5)
    assert _config({}, "merge.options.ties.density", 1.0).merge.options["ties"]["density"] == 1.0
    assert _config({}, "adapt.source.scale", 0.0).adapt.source.scale == 0.0  # source.scale: a zoom, 0 is none


def _registered() -> list:
    """(section, name, options with their defaults) of every registered method and policy with options."""
    ptq = [("ptq", m, _defaults(PTQ_METHODS.options(m))) for m in PTQ_METHODS if PTQ_METHODS.options(m)]
    merges = [("merge", m, {k: v for k, v in _defaults(MERGE_METHODS.get(m)).items() if k not in MERGE_SKIP})
              for m in MERGE_METHODS]
    roundings = [("rounding", r, _defaults(ROUNDINGS.get(r))) for r in ROUNDINGS]
    return ptq + merges + roundings + [("merge", "average", {"weights": [0.5, 0.5]})]


@pytest.mark.parametrize("section, name, options", [pytest.param(*x, id=f"{x[0]}:{x[1]}:{sorted(x[2])}")
                                                    for x in _registered()])
def test_every_registered_option_can_be_set_from_yaml(tmp_path, section, name, options):
    """Through ``--config`` as a user would: each option of each registered PTQ method, merge method
    and rounding policy, at its own default (and the average's weights as a list), is accepted."""
    text = {"ptq": {"ptq": {"methods": [name], "options": {name: options}}},
            "merge": {"merge": {"options": {name: options}}},
            "rounding": {"merge": {"rounding": name, "rounding_options": options}}}[section]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(text))
    cfg = load_cli_config(build_parser().parse_args(["run", "--config", str(path)]))
    got = {"ptq": lambda: cfg.ptq.options[name], "merge": lambda: cfg.merge.options[name],
           "rounding": lambda: cfg.merge.rounding_options}[section]()
    assert got == options


def test_a_registered_model_of_gigabytes_is_refused_before_it_is_built(tmp_path, capsys):
    from mergeq.experiments import resolve

    assert resolve(_config({}, "model", {"name": "resnet8", "kwargs": {"width": 64}})).model.kwargs == {"width": 64}
    with pytest.raises(ConfigError, match=r"^model\.kwargs: \{'width': 4096\} give resnet8 4,999,925,762 "
                                          r"parameters \(19 GiB as float32\); at most 1,000,000,000$"):
        resolve(_config({}, "model", {"name": "resnet8", "kwargs": {"width": 4096}}))
    _fails(capsys, ["run", "--set", "model={name: resnet8, kwargs: {width: 100000}}", "--out", str(tmp_path / "o"),
                    "--cache-dir", str(tmp_path / "c"), "--quiet"], "model.kwargs: {'width': 100000} give resnet8")


def test_average_weights_number_the_experts(tmp_path, capsys):
    from mergeq.experiments.config import check_average_weights

    cfg = _config({}, "merge.options.average.weights", [0.7, 0.3])
    check_average_weights(cfg, 2)
    for bad, experts in (([0.7, 0.3], 3), ([0.0, 0.0], 2)):
        with pytest.raises(ConfigError, match=r"^merge\.options\.average\.weights: expected \d weights \(one per "
                                              r"expert\) with a positive sum, got"):
            check_average_weights(_config({}, "merge.options.average.weights", bad), experts)
    experts = [str(tmp_path / f"{d}.safetensors") for d in "abc"]  # refused before they are read
    _fails(capsys, ["merge", *experts, "--set", "merge.options.average.weights=[0.7, 0.3]", "--out",
                    str(tmp_path / "m.safetensors")], "merge.options.average.weights: expected 3 weights")


# --- the machine: threads, workers, device, seed -------------------------------------------------

def test_threads_and_workers_are_at_most_the_cpus(monkeypatch):
    cpus = available_cpus()
    for key in ("threads", "workers"):
        assert getattr(_config({}, f"runtime.{key}", cpus).runtime, key) == cpus
        with pytest.raises(ConfigError, match=rf"runtime\.{key}: must be at most {cpus} \(the CPUs this process "
                                              rf"may use\), got {cpus + 1}$"):
            _config({}, f"runtime.{key}", cpus + 1)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus + 3)), raising=False)
    assert _config({}, "runtime.threads", cpus + 3).runtime.threads == cpus + 3  # read when checked


def _fails(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(n in err for n in needles), err


@pytest.mark.parametrize("flags, needle", [
    (["--threads", "100000"], "runtime.threads: must be at most"),
    (["--set", "runtime.threads=5000"], "runtime.threads: must be at most"),
    (["--seed", "-1"], "runtime.seed: must be at least 0, got -1"),
    (["--seed", str(2**32)], f"runtime.seed: must be at most {2**32 - 1}"),
    (["--device", "meta"], "runtime.device: expected cpu, cpu:N, cuda, cuda:N or mps, got 'meta'"),
    (["--bits", "W4A"], "ptq.bits[0]: bit spec must look like W4A4 or W4, got 'W4A'"),
    (["--set", "adapt.source.lr=.nan"], "adapt.source.lr: must be a finite number, got nan"),
    (["--set", "adapt.shot.batch_size=0"], "adapt.shot.batch_size: must be at least 1, got 0"),
])
def test_run_flags_past_a_bound_fail_in_one_line(tmp_path, capsys, flags, needle):
    cache = tmp_path / "cache"
    _fails(capsys, ["run", *flags, "--out", str(tmp_path / "o"), "--cache-dir", str(cache), "--quiet"], needle)
    assert not cache.exists()


@pytest.mark.parametrize("argv, needle", [
    (["barrier", "--points", "1000"], "argument --points: must be at most 101"),
    (["surface", "--points", "1"], "argument --points: must be at least 2, got 1"),
    (["surface", "--radius", "nan"], "argument --radius: must be a finite number, got nan"),
    (["surface", "--radius", "0"], "argument --radius: must be greater than 0, got 0.0"),
    (["data", "--per-domain", "0"], "argument --per-domain: must be at least 1, got 0"),
    (["data", "--per-domain", "1000000"], "argument --per-domain: must be at most 100"),
])
def test_command_number_flags_are_bounded_by_the_same_table(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_device_strings(monkeypatch):
    def device(name: str) -> str:
        return _config({}, "runtime.device", name).runtime.device

    assert device("cpu") == "cpu" and device("cpu:0") == "cpu:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^runtime\.device: 'cuda' needs a GPU, and this torch .* sees none; use cpu$"):
        device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device("cuda") == "cuda" and device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match=r"^runtime\.device: 'cuda:1' names GPU 1, and torch sees 1 GPU"):
        device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for bad in ("mps", "meta", "gpu", "cuda:x", "cpu:", "xla"):
        with pytest.raises(ConfigError, match=r"^runtime\.device: "):
            device(bad)


def test_cuda_on_a_cpu_only_torch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(capsys, ["run", "--device", "cuda", "--out", str(tmp_path / "o"), "--quiet"],
           "runtime.device: 'cuda' needs a GPU")


def test_ties_density_is_refused_before_pmq_trains(tmp_path, capsys):
    cache = tmp_path / "cache"
    _fails(capsys, ["pmq", "--set", "merge.options.ties.density=1.5", "--out", str(tmp_path / "o"),
                    "--cache-dir", str(cache), "--quiet"], "merge.options.ties.density: must be at most 1, got 1.5")
    assert not cache.exists()


def test_export_opset_is_bounded_before_the_model_is_read(tmp_path, capsys):
    pytest.importorskip("onnx")
    from mergeq.deploy.onnx_export import MIN_OPSET, max_opset

    top = max_opset()
    assert MIN_OPSET <= top
    for opset in (top + 1, MIN_OPSET - 1):
        _fails(capsys, ["export", "--model", str(tmp_path / "none.safetensors"), "--format", "onnx", "--opset",
                        str(opset), "--out", str(tmp_path / "m.onnx")], f"to {top}", f"got {opset}")


# --- sizes no larger than the data, recorded as used ---------------------------------------------

def test_tta_n_images_is_recorded_as_used(tmp_path):
    from mergeq.experiments.tta import images_used

    def pool(tta: dict, images: int = 6):
        return SimpleNamespace(cfg=Config.from_dict({"tta": tta}),
                               bench=SimpleNamespace(source=SimpleNamespace(test=[None] * images)))

    assert images_used(pool({"n_images": 1000})).tta.n_images == 6
    assert images_used(pool({"n_images": 4})).tta.n_images == 4
    assert images_used(pool({})).tta.n_images is None  # null: all of them
    folder = tmp_path / "c10c"
    folder.mkdir()
    np.save(folder / "fog.npy", np.zeros((5 * 7, 32, 32, 3), dtype=np.uint8))
    np.save(folder / "labels.npy", np.arange(35) % 10)
    assert images_used(pool({"n_images": 1000, "cifar10c": str(folder), "corruptions": ["fog"]})).tta.n_images == 7


def test_calib_size_past_the_data_is_recorded_as_used(one_thread):
    from mergeq.experiments.pool import ptq_report
    from mergeq.models import build_model
    from mergeq.ptq import quantize

    model = build_model("resnet8", 10, width=4).eval()
    q = quantize(model, "rtn", calib=torch.randn(10, 3, 16, 16), calib_size=1000, w_bits=4, a_bits=4)
    assert ptq_report(q)["calib_size"] == 10


def test_docs_list_every_bound():
    text = (ROOT / "docs/CONFIG.md").read_text().partition("## Bounds")[2]
    assert text, "docs/CONFIG.md has no Bounds section"
    for key in BOUNDS:
        assert f"`{key}`" in text, f"docs/CONFIG.md's Bounds section does not list {key}"
