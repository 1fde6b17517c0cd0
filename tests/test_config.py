"""The one typed config: sections, presets, resolution, the earlier flat form, CLI flags bound to fields."""
import argparse
import dataclasses
import glob
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeq.bounds import available_cpus
from mergeq.cli import ONE, PREFIX, build_parser, load_cli_config
from mergeq.errors import ConfigError
from mergeq.experiments import Config, load_config, presets, resolve
from mergeq.experiments.config import hint_at, parse_set, translate_legacy
from mergeq.models import build_model

ROOT = Path(__file__).resolve().parents[1]

# options of a command that are not config entries: what to run on, where to write, how to run it
COMMAND_ARGS = {"help", "config", "set", "quiet", "out", "source", "domain", "model", "experts", "method", "base",
                "report", "points", "radius", "format", "opset", "no_int4", "grid", "executor",
                "address", "per_domain", "kernels", "calib_size", "target_cpu", "json",  # export's and env's own flags
                "trust_builder"}  # a choice per command, never recorded in a config (docs/RELIABILITY.md, Security)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


# a valid command-line value per flag path (other paths: "3"), and settings a value needs
SAMPLES = {"runtime.device": "cpu", "runtime.cache_dir": "c", "data.targets": "uci,noisy", "ptq.methods": "rtn,hdrq",
           "ptq.bits": "W4A4", "pmq.merges": "ties", "pmq.methods": "gptq", "pmq.bits": "W4", "tta.methods": "fp,ttaq",
           "tta.bits": "W2A4", "tta.streams": "balanced", "tta.corruptions": "fog,snow", "tta.cifar10c": "c10c",
           "merge.rounding": "noise", "ptq.first_last_bits": "none", "tta.tent.lr": "0.01", "ptq.options.epmq.anchor": "0.5",
           "runtime.threads": "1", "runtime.workers": "1"}  # at most the CPUs there are
NEEDS = {"merge.rounding_options.samples": {"merge.rounding": "noise"}, "merge.repeats": {"merge.rounding": "noise"}}


def test_every_flag_is_a_config_entry_of_its_type():
    """No option exists only as a flag: each binds to a config path and parses to that entry's type."""
    seen = set()
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if not action.dest.startswith(PREFIX):
                assert action.dest in COMMAND_ARGS, f"mergeq {name} {action.option_strings}: not a config entry"
                continue
            path = action.dest[len(PREFIX):]
            hint_at(path)  # raises if the path names nothing
            raw = SAMPLES.get(path, action.choices[-1] if action.choices else "3")
            value = action.type(raw.split(",")[0] if action.option_strings[0] in ONE else raw)
            got = Config().updated({**NEEDS.get(path, {}), path: value}).to_dict()
            for key in path.split("."):
                got = got[key]
            assert got == value and value is not None or raw == "none", (name, path, value)
            seen.add(path)
    assert {"ptq.methods", "pmq.methods", "tta.methods", "ptq.options.epmq.anchor", "merge.repeats"} <= seen


def test_every_config_leaf_can_be_set_by_path():
    for path in _leaves(Config().to_dict()):
        assert hint_at(path) is not None
    assert parse_set("ptq.options.hdrq.iters=100") == ("ptq.options.hdrq.iters", 100)
    assert parse_set("data.targets=[uci, noisy]") == ("data.targets", ["uci", "noisy"])
    with pytest.raises(ConfigError, match=r"^ptq\.iters: no such config entry"):
        parse_set("ptq.iters=3")


def test_exponent_floats_read_as_floats_in_set_and_files(tmp_path):
    """``1e-4`` is a float (YAML 1.2), not the string PyYAML's YAML 1.1 makes of it, which every
    float entry then refused ("expected float, got str '1e-4'")."""
    assert parse_set("adapt.source.lr=1e-3") == ("adapt.source.lr", 1e-3)
    assert parse_set("ptq.options.hdrq.lr=1e-4") == ("ptq.options.hdrq.lr", 1e-4)
    assert parse_set("ptq.options.hdrq.dist_lambda=5E-2") == ("ptq.options.hdrq.dist_lambda", 0.05)
    path = tmp_path / "c.yaml"
    path.write_text("adapt: {source: {lr: 2e-3}}\nptq: {options: {hdrq: {lr: 1e-4, iters: 1e3}}}\n")
    with pytest.raises(ConfigError, match=r"ptq\.options\.hdrq\.iters: expected int, got float 1000\.0"):
        load_cli_config(build_parser().parse_args(["run", "--config", str(path)]))
    path.write_text("adapt: {source: {lr: 2e-3}}\nptq: {options: {hdrq: {lr: 1e-4}}}\nmerge: {rounding: '1e-4'}\n")
    with pytest.raises(ConfigError, match="merge.rounding"):  # a quoted value stays a string
        load_cli_config(build_parser().parse_args(["run", "--config", str(path)]))
    path.write_text("adapt: {source: {lr: 2e-3}}\nptq: {options: {hdrq: {lr: 1e-4}}}\n")
    cfg = load_cli_config(build_parser().parse_args(["run", "--config", str(path), "--set", "adapt.shot.lr=3e-3"]))
    assert (cfg.adapt.source.lr, cfg.ptq.options["hdrq"]["lr"], cfg.adapt.shot.lr) == (2e-3, 1e-4, 3e-3)


def test_flags_override_set_which_overrides_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: quick\nruntime: {seed: 3, threads: 1}\nptq: {methods: [rtn], options: {hdrq: {iters: 5}}}\n")
    args = build_parser().parse_args(["run", "--config", str(path), "--set", "runtime.seed=4", "--set",
                                      "ptq.options.hdrq.iters=7", "--seed", "5", "--bits", "W4A4,W2A4"])
    cfg = load_cli_config(args)
    assert (cfg.preset, cfg.runtime.seed, cfg.runtime.threads) == ("quick", 5, 1)
    assert cfg.ptq.options["hdrq"] == {"iters": 7} and cfg.ptq.bits == ["W4A4", "W2A4"] and cfg.ptq.methods == ["rtn"]
    quant = load_cli_config(build_parser().parse_args(["quantize", "--model", "m", "--out", "o"]),
                            {"ptq.methods": ["rtn"], "ptq.bits": ["W4A4"]})
    assert quant.ptq.methods == ["rtn"] and quant.ptq.bits == ["W4A4"]  # the command's defaults
    first_last = load_cli_config(build_parser().parse_args(["run", "--first-last-bits", "none"]))
    assert first_last.ptq.first_last_bits is None


_sections = st.fixed_dictionaries({}, optional={
    "preset": st.sampled_from(["quick", "default", "paper"]),
    "data": st.fixed_dictionaries({"source": st.sampled_from(["mnist", "uci"])}),
    "ptq": st.fixed_dictionaries({}, optional={
        "methods": st.lists(st.sampled_from(["rtn", "brecq", "qdrop", "hdrq", "gptq"]), min_size=1, max_size=3,
                            unique=True),
        "bits": st.lists(st.sampled_from(["W8A8", "W4A4", "W3A3", "W4", "W2A4"]), min_size=1, max_size=3, unique=True),
        "calib_size": st.none() | st.integers(1, 2048), "first_last_bits": st.none() | st.integers(2, 8),
        "options": st.fixed_dictionaries({}, optional={"hdrq": st.fixed_dictionaries({"iters": st.integers(1, 99)}),
                                                       "gptq": st.fixed_dictionaries({"act_order": st.booleans()})})}),
    "merge": st.fixed_dictionaries({}, optional={"rounding": st.sampled_from(["float", "nearest"])}),
    "tta": st.fixed_dictionaries({}, optional={"methods": st.sampled_from([["fp"], ["qdrop+tent", "ttaq"]]),
                                               "severity": st.integers(1, 5)}),
    "runtime": st.fixed_dictionaries({}, optional={"seed": st.integers(0, 9), "threads": st.none() | st.integers(1, available_cpus())}),
})


@settings(max_examples=30, deadline=None)
@given(_sections)
def test_yaml_round_trip_and_resolution_is_idempotent(data):
    cfg = Config.from_dict(data)
    assert Config.from_dict(cfg.to_dict()) == cfg
    r = resolve(cfg)
    assert resolve(r) == r and Config.from_dict(r.to_dict()) == r
    for m in r.methods_named():  # every method the config names has its preset's options, the file's on top
        assert r.ptq.options[m] == {**presets.ptq_options(m, r.preset), **cfg.ptq.options.get(m, {})}
    assert r.adapt.source is not None and r.ptq.calib_size == (cfg.ptq.calib_size or presets.calib_size(r.preset))


def test_presets_build_and_fill_what_the_config_leaves_open():
    for preset in presets.PRESET_NAMES:
        src, shot = presets.adapt(preset)
        assert shot.beta == 0.3 and src.epochs >= 1
        r = resolve(Config(preset=preset))
        assert r.model.name == "resnet8" and r.model.kwargs == {"width": 16}
        assert build_model(r.model.name, 10, **r.model.kwargs)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # colour jitter re-standardises each image: only for data standardised that way
    folder = Config.from_dict({"data": {"kind": "folder", "root": ".", "source": "A", "normalize": "imagenet"}})
    assert resolve(folder).adapt.source.color == 0.0 and resolve(Config()).adapt.source.color == 0.2
    assert Path(resolve(folder).data.root).is_absolute()


def test_earlier_flat_files_are_translated():
    old = {"benchmark": "digits-uci", "targets": ["mnist"], "arch": "resnet20", "arch_kwargs": {"width": 8},
           "methods": ["rtn"], "bits": ["W4A4"], "ptq_options": {"hdrq": {"iters": 3}}, "rounding": "noise",
           "merge_options": {"samples": 4}, "source": {"epochs": 2}, "seed": 1, "cache_dir": "c"}
    new = translate_legacy(old)
    assert new == {"data": {"kind": "digits", "source": "uci", "targets": ["mnist"]},
                   "model": {"name": "resnet20", "kwargs": {"width": 8}}, "ptq": {"methods": ["rtn"], "bits": ["W4A4"],
                                                                                 "options": {"hdrq": {"iters": 3}}},
                   "merge": {"rounding": "noise", "rounding_options": {"samples": 4}}, "adapt": {"source": {"epochs": 2}},
                   "runtime": {"seed": 1, "cache_dir": "c"}}
    tta = translate_legacy({"run": {"benchmark": "digits", "seed": 2}, "tta": {"severity": 3}})
    assert tta == {"data": {"kind": "digits", "source": "mnist"}, "runtime": {"seed": 2}, "tta": {"severity": 3}}
    # every config the repository's results were made with still loads
    files = glob.glob(str(ROOT / "docs/results/**/*.yaml"), recursive=True)
    assert len(files) > 20
    for f in files:
        load_config(f)


def test_the_repository_configs_are_in_the_sectioned_form():
    files = glob.glob(str(ROOT / "benchmarks/configs/*.yaml")) + glob.glob(str(ROOT / "benchmarks/grids/*.yaml"))
    assert files
    for f in files:
        import yaml

        data = yaml.safe_load(Path(f).read_text())
        assert translate_legacy(data) == data, f"{f} uses the earlier flat keys"
        load_config(f)


def test_the_default_config_is_the_earlier_default_run():
    """``mergeq run`` with no options: the settings of the results in docs/results/main_run."""
    old = resolve(load_config(ROOT / "docs/results/main_run/config.yaml"))
    new = resolve(Config())
    new = dataclasses.replace(new, data=dataclasses.replace(new.data, targets=old.data.targets),
                              ptq=dataclasses.replace(new.ptq, options={m: new.ptq.options[m] for m in old.ptq.options}))
    assert new == dataclasses.replace(old, runtime=dataclasses.replace(old.runtime, cache_dir=new.runtime.cache_dir))


def test_docs_config_names_every_entry():
    from mergeq.data.spec import DigitsData, FolderData, SegDomainData, SegmentationData, StreetsData
    from mergeq.experiments.config import LEGACY
    from mergeq.models.spec import ModelSpec

    text = (ROOT / "docs/CONFIG.md").read_text()
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        assert f"## {f.name}" in text, f"docs/CONFIG.md has no section {f.name}"
    for cls in [*(hints[s] for s in ("adapt", "ptq", "merge", "pmq", "tta", "grid", "runtime")),
                DigitsData, FolderData, StreetsData, SegmentationData, SegDomainData, ModelSpec]:
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in text, f"docs/CONFIG.md does not name {cls.__name__}.{f.name}"
    for key in LEGACY:
        assert f"`{key}`" in text or f"{key}`" in text, key


def test_the_configs_in_the_docs_are_valid(monkeypatch):
    """Every ```yaml block of the README and docs/ is a config that loads (paths are not opened) on
    a machine with a GPU (``device: cuda`` is refused where torch sees none)."""
    import re

    import yaml

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    blocks = [b for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
              for b in re.findall(r"```yaml\n(.*?)```", f.read_text(), re.S)]
    assert len(blocks) >= 4
    for text in blocks:
        Config.from_dict(yaml.safe_load(text))
