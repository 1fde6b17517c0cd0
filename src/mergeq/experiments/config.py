"""The one typed config of every mergeq command: a preset and nine sections.

::

    preset: default                   # quick | default | paper (mergeq.experiments.presets)
    data: {kind: digits, source: mnist, targets: null}          # or a folder, see mergeq.data.spec
    model: null                       # null: the preset's (resnet8, width 16); see mergeq.models.spec
    adapt: {source: null, shot: null}                           # SourceConfig / ShotConfig; null: the preset's
    ptq: {methods: [rtn, qdrop, hdrq], bits: [W4A4, W3A3], calib_size: null,
          first_last_bits: 8, step_method: mse, options: {hdrq: {iters: 300}}}
    merge: {rounding: float, rounding_options: {}, repeats: 1, options: {ties: {density: 0.2}}}
    pmq: {merges: [task_arithmetic, ties], methods: [rtn, gptq, epmq], bits: [W4, W3]}
    tta: {methods: [...], bits: [W4A4, W2A4], streams: [balanced, imbalanced], severity: 5, ...}
    grid: {target_sets: null, seeds: null, ptq_seeds: null}     # mergeq bench's axes
    runtime: {seed: 0, seeds: {split: null, source: null, shot: null, ptq: null, calib: null},
              device: cpu, threads: null, workers: null, cache_dir: .mergeq-cache}

Every command reads the same sections: ``run`` (data, model, adapt, ptq, merge, runtime),
``pmq`` (ptq's calib_size/first_last_bits/step_method/options, merge.options, pmq), ``tta``
(tta and ptq's settings for its PTQ methods), ``bench`` (run's, over grid's axes: ptq.methods x
ptq.bits x grid.target_sets x grid.seeds), the step commands (data, model, adapt, ptq, merge,
runtime). :meth:`Config.from_dict` checks every key, type and numeric range (:mod:`mergeq.bounds`)
when the file is loaded (one-line :class:`ConfigError` naming the key path), then
:meth:`Config.validate` checks the rest (registered names, each method's options against its
options dataclass, the device), before any model is trained.

:func:`resolve` fills in what the preset decides (model, adapt, calib_size, per-method PTQ
options of every method the config names) and makes paths absolute; the experiment pool then
records the loaded data's resolved spec (class list, split sizes, file fingerprints). Commands
write that as ``config.yaml``; loading it and resolving again is the identity, so rerunning it
reproduces the run.

Files of the earlier flat form (``benchmark``, ``arch``, ``methods``, ``ptq_options``, ... at the
top level; ``run:`` + ``tta:`` of ``mergeq tta``) are translated by :data:`LEGACY`, with a warning.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from ..adapt.segmentation import DACSConfig, SegSourceConfig
from ..adapt.shot import ShotConfig
from ..adapt.source import SourceConfig
from ..adapt.tta import ABLConfig, TentConfig
from ..data.spec import DataSpec, DigitsData, FolderData, SegmentationData, StreetsData, task_of
from ..errors import ConfigError
from ..io import dump_yaml, load_yaml
from ..models.spec import ModelSpec
from ..typed import check_keys, check_unique, check_value, from_mapping, hints_of, kinds_of
from . import presets

log = logging.getLogger(__name__)


def opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A config field with a help text (what ``mergeq --help`` shows for its flag)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class Adapt:
    """How the source model and the experts are trained: ``source`` + ``shot`` for classification,
    ``seg_source`` + ``dacs`` for segmentation data (:func:`mergeq.data.spec.task_of`); the preset
    fills the pair the data need and leaves the other null."""

    source: SourceConfig | None = opt(None, help="source training, classification (None: the preset's)")
    shot: ShotConfig | None = opt(None, help="SHOT adaptation of each expert, classification (None: the preset's)")
    seg_source: SegSourceConfig | None = opt(None, help="source training, segmentation (None: the preset's)")
    dacs: DACSConfig | None = opt(None, help="DACS self-training of each expert, segmentation (None: the preset's)")


@dataclass
class PTQ:
    methods: list[str] = opt(factory=lambda: ["rtn", "qdrop", "hdrq"], help="PTQ methods, e.g. rtn,qdrop,hdrq")
    bits: list[str] = opt(factory=lambda: ["W4A4", "W3A3"],
                          help="bit pairs, e.g. W8A8,W4A4,W3A3 (W4 = weight-only); W8A8 is left out by "
                               "default: every method there equals the full-precision merge (RESULTS §1)")
    calib_size: int | None = opt(None, help="calibration inputs per quantization (None: the preset's)")
    first_last_bits: int | None = opt(8, help="bits of the first and last layer (none: like the rest)")
    step_method: Literal["mse", "lp", "absmax"] = opt("mse", help="weight step search")
    options: dict[str, dict[str, Any]] = opt(factory=dict, help="per-method options, e.g. {hdrq: {iters: 300}}")


@dataclass
class Merge:
    rounding: str = opt("float", help="how quantized experts merge: float (Eq. 11), nearest, noise (Eq. 12 + "
                                      "cosine filter), noise-ties (reference code)")
    rounding_options: dict[str, Any] = opt(factory=dict, help="options of the rounding policy, e.g. {samples: 30}")
    repeats: int = opt(1, help="sampling roundings: merges averaged, seeds seed..seed+repeats-1")
    options: dict[str, dict[str, Any]] = opt(factory=dict, help="per merge method, e.g. {ties: {density: 0.2}}")
    recalibrate: Literal["none", "act", "bn", "bn+act"] | None = opt(
        None, help="the merged model re-estimated on the targets' unlabeled calibration images: act (activation "
                   "steps), bn (per-channel statistics, REPAIR), bn+act, none (data-free); preset: paper none, "
                   "else bn+act")
    data_free_row: bool = opt(False, help="run: each row also reports the merge without recalibration "
                                          "(merged_data_free), beside the recalibrated one")


@dataclass
class PMQ:
    merges: list[str] = opt(factory=lambda: ["task_arithmetic", "ties"], help="average, task_arithmetic, ties")
    methods: list[str] = opt(factory=lambda: ["rtn", "gptq", "epmq"], help="PTQ methods for the merged model")
    bits: list[str] = opt(factory=lambda: ["W4", "W3"], help="bit pairs; W4 = weight-only")


TTA_METHODS = ["fp", "fp+tent", "qdrop", "qdrop+tent", "ttaq"]
TTA_ADAPTERS = ("none", "tent", "abl")


@dataclass
class TTA:
    methods: list[str] = opt(factory=lambda: list(TTA_METHODS),
                             help="MODEL[+ADAPTER] (ADAPTER: none, tent, abl; ttaq = ttaq PTQ + TENT with ABL)")
    bits: list[str] = opt(factory=lambda: ["W4A4", "W2A4"], help="bit pairs of the quantized models")
    streams: list[Literal["balanced", "imbalanced"]] = opt(factory=lambda: ["balanced", "imbalanced"],
                                                          help="balanced, imbalanced or both")
    imbalance: Literal["sorted", "dirichlet"] = opt("dirichlet", help="label order of the imbalanced stream")
    dirichlet_alpha: float = opt(0.1, help="concentration of the dirichlet label order")
    severity: int = opt(5, help="corruption severity 1..5")
    corruptions: list[str] | None = opt(None, help="corruptions in stream order (None: the 15 of ImageNet-C)")
    n_images: int | None = opt(None, help="images per domain (None: all of the clean test split); more than "
                                          "there are: all, recorded as the number used")
    cifar10c: str | None = opt(None, help="folder of CIFAR-10-C .npy arrays: the stream's domains (None: "
                                          "corrupt the data's source test split)")
    batch_size: int = opt(64, help="test batch size")
    tent: TentConfig = opt(factory=TentConfig, help="TENT (and ABL's) optimiser")
    abl: ABLConfig = opt(factory=ABLConfig, help="adaptive balanced loss")


@dataclass
class Grid:
    target_sets: list[list[str]] | None = opt(None, help="target sets (None: data.targets)")
    seeds: list[int] | None = opt(None, help="seeds (None: runtime.seed)")
    ptq_seeds: list[int] | None = opt(None, help="PTQ seeds on the experts of each seed: runtime.seeds.ptq and "
                                                 ".calib per cell (None: no such axis)")


@dataclass
class Seeds:
    """Seeds of the single sources of randomness, each overriding ``runtime.seed`` (None: it)."""

    split: int | None = opt(None, help="data splits (digits: also the synthetic noise and photo patches)")
    source: int | None = opt(None, help="source model: initial weights, batches, augmentation")
    shot: int | None = opt(None, help="SHOT adaptation of the experts: batches, augmentation")
    ptq: int | None = opt(None, help="quantize: reconstruction batches, QDrop masks, HDRQ noise")
    calib: int | None = opt(None, help="calibration subset: a draw of ptq.calib_size images from the unlabeled "
                                       "split (None: its first ptq.calib_size, in the split seed's order)")


@dataclass
class Runtime:
    seed: int = opt(0, help="seed for data splits, training, PTQ and sampling merges (0 to 2**32 - 1)")
    seeds: Seeds = opt(factory=Seeds, help="per-source seeds overriding runtime.seed")
    device: str = opt("cpu", help="torch device: cpu, cpu:N, cuda, cuda:N (a GPU torch sees) or mps")
    threads: int | None = opt(None, help="torch CPU threads, at most the CPUs there are (None: torch's); a "
                                         "seeded CPU run repeats bit for bit per thread count")
    workers: int | None = opt(None, help="processes computing rows (run: each with threads // workers torch "
                                         "threads; None: one per torch thread on a CPU, one per visible GPU on "
                                         "cuda, up to the rows to compute) or cells (bench; None: 1, on cuda one "
                                         "per visible GPU) side by side")
    cache_dir: str = opt(".mergeq-cache", help="where trained source and expert models are cached")

    def seed_of(self, what: str) -> int:
        """The seed of one source of randomness: ``seeds.<what>``, or ``seed`` where that is None."""
        value = getattr(self.seeds, what)
        return self.seed if value is None else value


@dataclass
class Config:
    preset: Literal["quick", "default", "paper"] = opt("default", help="size of the run: quick = the one-minute "
                                                      "run (100 iterations/unit, shorter training), default = "
                                                      "2-core CPU budgets (300), paper = the papers' settings (20,000)")
    data: DataSpec = opt(factory=DigitsData, help="the domains")
    model: ModelSpec | None = opt(None, help="the model (None: the preset's)")
    adapt: Adapt = opt(factory=Adapt)
    ptq: PTQ = opt(factory=PTQ)
    merge: Merge = opt(factory=Merge)
    pmq: PMQ = opt(factory=PMQ)
    tta: TTA = opt(factory=TTA)
    grid: Grid = opt(factory=Grid)
    runtime: Runtime = opt(factory=Runtime)

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> "Config":
        """Check every key and value of ``data`` (a parsed YAML mapping), build and validate."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: must hold a YAML mapping of config sections, got {type(data).__name__}")
        data = translate_legacy(data)
        if isinstance(data.get("model"), str):
            data = {**data, "model": {"name": data["model"]}}
        cfg = from_mapping(cls, data, where)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML that :func:`load_config` reads back to the same values (names like
        ``1e1`` or ``yes`` quoted: :func:`mergeq.io.dump_yaml`)."""
        return dump_yaml(self.to_dict())

    def updated(self, changes: Mapping[str, Any]) -> "Config":
        """A validated copy with ``changes`` (dotted paths, e.g. ``{"ptq.options.hdrq.iters": 100}``) set."""
        d = self.to_dict()
        for path, value in changes.items():
            set_path(d, path, value)
        return Config.from_dict(d)

    def methods_named(self) -> list[str]:
        """Every PTQ method the config names (ptq, pmq, and the models of tta's rows)."""
        tta = [parse_tta_method(m)[0] for m in self.tta.methods]
        return list(dict.fromkeys([*self.ptq.methods, *self.pmq.methods, *(m for m in tta if m != "fp")]))

    def validate(self) -> None:
        """Registered names, options, cross-field rules and the device (types and numeric ranges
        were checked when the config was built); every error names the key path."""
        from ..bounds import MAX_CELLS, MAX_SEEDS, check_count
        from ..data.folder import check_name
        from ..merge import MERGE_METHODS, check_rounding_options
        from ..merge.rounding import ROUNDINGS
        from ..ptq import PTQ_METHODS, check_options

        _validate_data(self.data)
        p, m, r, t = self.ptq, self.merge, self.runtime, self.tta
        _methods("ptq.methods", p.methods, PTQ_METHODS)
        _bits("ptq.bits", p.bits)
        for name, options in p.options.items():
            _check(f"ptq.options.{name}", lambda: PTQ_METHODS.get(name))
            check_options(name, options, "ptq.options")
        _check("merge.rounding", lambda: ROUNDINGS.get(m.rounding))
        check_rounding_options(m.rounding, m.rounding_options)
        if m.repeats > 1 and not m.rounding.startswith("noise"):
            raise ConfigError(f"merge.repeats: {m.repeats} merges apply to the sampling roundings (noise, "
                              f"noise-ties); rounding {m.rounding!r} merges the same way every time")
        for name, options in m.options.items():
            _check(f"merge.options.{name}", lambda: MERGE_METHODS.get(name))
            hints = hints_of(MERGE_METHODS.get(name), skip=("models", "base", "rounding"))
            check_keys(options, hints, f"merge.options.{name}")
        _methods("pmq.merges", self.pmq.merges, MERGE_METHODS)
        _methods("pmq.methods", self.pmq.methods, PTQ_METHODS)
        _bits("pmq.bits", self.pmq.bits)
        _validate_tta(t)
        if self.grid.target_sets is not None:
            check_unique("grid.target_sets", [tuple(s) for s in self.grid.target_sets], self.grid.target_sets)
            for i, s in enumerate(self.grid.target_sets):
                check_unique(f"grid.target_sets[{i}]", s)
                for name in s:  # cell file names hold them
                    _check(f"grid.target_sets[{i}]", lambda: check_name(name))
        g = self.grid
        for name in ("seeds", "ptq_seeds"):
            if getattr(g, name) is not None:
                check_count(f"grid.{name}", len(getattr(g, name)), MAX_SEEDS, "seeds")
                check_unique(f"grid.{name}", getattr(g, name))
        axes = {"ptq.methods": p.methods, "ptq.bits": p.bits, "grid.target_sets": g.target_sets,
                "grid.seeds": g.seeds, "grid.ptq_seeds": g.ptq_seeds}
        sizes = {k: len(v or [None]) for k, v in axes.items()}
        check_count("grid", math.prod(sizes.values()), MAX_CELLS, "cells (each a run of the pipeline)",
                    f" ({' x '.join(f'{n} {k}' for k, n in sizes.items())})")
        _check("runtime.device", lambda: check_device(r.device))


def _check(where: str, fn) -> Any:
    """``fn()``, its ValueError / KeyError re-raised as a ConfigError naming ``where``."""
    try:
        return fn()
    except (ValueError, KeyError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"{where}: {msg}") from None


def check_device(name: str) -> str:
    """``name`` if torch can compute on it here: ``cpu``, ``cpu:N``, ``cuda`` / ``cuda:N`` (a GPU
    this torch sees), ``mps`` (where available); else a ValueError saying what is."""
    import torch

    if not re.fullmatch(r"(cpu|cuda)(:[0-9]+)?|mps", name):
        raise ValueError(f"expected cpu, cpu:N, cuda, cuda:N or mps, got {name!r}")
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r} needs a GPU, and this torch ({torch.__version__}) sees none; use cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"{name!r} names GPU {index}, and torch sees {torch.cuda.device_count()} GPU(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"'mps' needs Apple's Metal backend, which this torch ({torch.__version__}) lacks; use cpu")
    return name


def _methods(where: str, names: list[str], registry) -> None:
    check_unique(where, names)
    for i, name in enumerate(names):
        _check(f"{where}[{i}]", lambda: registry.get(name))


def _bits(where: str, specs: list[str]) -> None:
    from ..quant.config import parse_bits

    parsed = [_check(f"{where}[{i}]", lambda: parse_bits(s)) for i, s in enumerate(specs)]
    check_unique(where, parsed, specs)


def _validate_data(data: DataSpec) -> None:
    from ..data.digits import DOMAINS

    if data.targets is not None:
        check_unique("data.targets", data.targets)
    if isinstance(data, SegmentationData):
        if data.source not in data.domains:
            raise ConfigError(f"data.source: {data.source!r} is not one of data.domains ({', '.join(data.domains)})")
        bad = [d for d in data.targets or [] if d not in data.domains or d == data.source]
        if bad:
            raise ConfigError(f"data.targets: {bad} are not domains of data.domains other than the source "
                              f"{data.source!r}")
        if data.stride is not None and data.window is None:
            raise ConfigError("data.stride: sets the steps of data.window, which is null")
        for key in ("size", "crop", "window", "stride"):
            v = getattr(data, key)
            if v is not None and (len(v) != 2 or min(v) < 1):
                raise ConfigError(f"data.{key}: expected [H, W] of two positive integers, got {v}")
        return
    if isinstance(data, (StreetsData, DigitsData)):  # embedded benchmarks: their own domain names
        from ..data.streets import DOMAINS as STREETS

        known = STREETS if isinstance(data, StreetsData) else DOMAINS
        if data.source not in known:
            raise ConfigError(f"data.source: expected one of {', '.join(known)}, got {data.source!r}")
        bad = [d for d in data.targets or [] if d not in known or d == data.source]
        if bad:
            raise ConfigError(f"data.targets: {bad} are not {data.kind} domains other than the source "
                              f"{data.source!r}; known: {', '.join(d for d in known if d != data.source)}")
        return
    from ..data.folder import check_name

    for key, names in (("data.source", [data.source] if data.source else []), ("data.targets", data.targets or []),
                       ("data.classes", data.classes or []), ("data.splits", list(data.splits or {}))):
        for name in names:
            _check(key, lambda: check_name(name, "class" if key == "data.classes" else "domain"))
    if data.kind == "folder" and data.source is None:
        raise ConfigError("data.source: a folder benchmark needs the source domain's folder name")
    if data.resize is not None and data.image_size is not None and data.resize < data.image_size:
        raise ConfigError(f"data.resize: must be at least data.image_size {data.image_size}, got {data.resize}")


def parse_tta_method(spec: str) -> tuple[str, str]:
    """``"qdrop+tent"`` -> ("qdrop", "tent"); ``"ttaq"`` -> ("ttaq", "abl"); ``"fp"`` -> ("fp", "none")."""
    from ..ptq import PTQ_METHODS

    base, _, adapter = spec.strip().partition("+")
    adapter = adapter or ("abl" if base == "ttaq" else "none")
    if adapter not in TTA_ADAPTERS:
        raise ValueError(f"method {spec!r}: adapter must be one of {TTA_ADAPTERS}")
    if base != "fp":
        PTQ_METHODS.get(base)  # KeyError naming the known methods
    return base, adapter


def _validate_tta(t: TTA) -> None:
    from ..data.corruptions import check_corruptions

    check_unique("tta.methods", t.methods)
    for i, spec in enumerate(t.methods):
        _check(f"tta.methods[{i}]", lambda: parse_tta_method(spec))
    _bits("tta.bits", t.bits)
    check_unique("tta.streams", t.streams)
    if t.corruptions is not None:
        _check("tta.corruptions", lambda: check_corruptions(t.corruptions))


# --- paths into the config (flags, --set, bench cells) -------------------------------------------

def set_path(d: dict, path: str, value: Any) -> None:
    """Set ``d[a][b][c] = value`` for ``path`` ``a.b.c``, creating mappings on the way (a section
    that is null, e.g. ``adapt.source``, starts empty: the preset's values fill the rest)."""
    *head, last = path.split(".")
    for key in head:
        if not isinstance(d.get(key), dict):
            d[key] = {}
        d = d[key]
    d[last] = value


def _tag_of(node: Any) -> Any:
    """The ``kind`` a (partial) config section holds: a mapping's key or a built dataclass's field; None if none."""
    if isinstance(node, Mapping):
        return node.get("kind")
    return getattr(node, "kind", None)


def _child(node: Any, key: str) -> Any:
    if isinstance(node, Mapping):
        return node.get(key)
    return getattr(node, key, None)


def _entry(path: str, current: Any = None) -> tuple[Any, Any]:
    """(type hint, dataclass field or None) of the config entry at ``path`` (a field, or a key of a
    ``dict[str, X]`` field); ConfigError if ``path`` names nothing in the config.

    A section that is a tagged union of dataclasses (``data``: one per ``kind``) takes its keys from
    the member that ``current`` (the config being built, a mapping of sections) names by its
    ``kind`` there (none named: the first member), so ``--set data.kind=folder --set data.root=...``
    checks ``root`` against the folder kind's fields; its ``kind`` itself takes any member's kind.
    Without ``current``, the first member having the key."""
    hint: Any = Config
    found_field = None
    node = current
    keys = path.split(".")
    for i, key in enumerate(keys):
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        tagged = len(options) > 1 and all(kinds_of(h) for h in options)
        found = None
        if tagged and key == "kind":
            found = Literal[tuple(k for h in options for k in kinds_of(h))]
            found_field = next(f for f in dataclasses.fields(options[0]) if f.name == "kind")
        elif tagged and current is not None:
            tag = _tag_of(node)
            chosen = next((h for h in options if tag in kinds_of(h)), None) if tag is not None else options[0]
            if chosen is None:  # an unknown kind: its own error, naming the kinds there are
                known = [k for h in options for k in kinds_of(h)]
                raise ConfigError(f"{'.'.join(keys[:i])}.kind: expected one of {known}, got {tag!r}")
            if key not in hints_of(chosen):
                raise ConfigError(f"{path}: no such config entry for {'.'.join(keys[:i])}.kind {kinds_of(chosen)[0]!r} "
                                  f"(known: {', '.join(hints_of(chosen))})")
            found, found_field = hints_of(chosen)[key], next(f for f in dataclasses.fields(chosen) if f.name == key)
        else:
            for h in options:
                if dataclasses.is_dataclass(h) and key in hints_of(h):
                    found, found_field = hints_of(h)[key], next(f for f in dataclasses.fields(h) if f.name == key)
                    break
                if typing.get_origin(h) is dict:
                    found, found_field = typing.get_args(h)[1], None
                    break
        if found is None:
            raise ConfigError(f"{path}: no such config entry ({'.'.join(keys[:i + 1])} is unknown)")
        hint = found
        node = _child(node, key) if node is not None else None
    return hint, found_field


def hint_at(path: str, current: Any = None) -> Any:
    """The type hint of the config entry at ``path`` (``current``: the config being built, see :func:`_entry`)."""
    return _entry(path, current)[0]


def help_at(path: str) -> str:
    """The help text of the config field at ``path`` ("" for a key of a mapping)."""
    f = _entry(path)[1]
    return f.metadata.get("help", "") if f is not None else ""


def read_set(text: str) -> tuple[str, Any]:
    """``"ptq.options.hdrq.iters=100"`` -> (path, value parsed as YAML), unchecked."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {text!r}: expected PATH=VALUE, e.g. ptq.options.hdrq.iters=100")
    path = path.strip()
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {path}: the value is not valid YAML: {e}") from None
    return path, value


def parse_set(text: str, current: Any = None) -> tuple[str, Any]:
    """``"ptq.options.hdrq.iters=100"`` -> (path, value parsed as YAML and checked against the path's
    type; ``current``: the config it goes into, whose ``data.kind`` decides the ``data.*`` keys)."""
    path, value = read_set(text)
    return path, check_value(hint_at(path, current), value, path)


def apply_sets(data: dict, texts: list[str]) -> dict:
    """``data`` (a config mapping) with every ``--set PATH=VALUE`` of ``texts`` set, in order (the
    last of two on one path wins). Each is checked against the config as it stands after all of
    them, so a ``--set data.kind=folder`` decides which ``data.*`` keys the others may set,
    wherever it stands; values go in as parsed (``Config.from_dict`` builds them)."""
    sets = [read_set(text) for text in texts]
    for path, value in sets:
        set_path(data, path, copy.deepcopy(value))
    for path, value in sets:
        check_value(hint_at(path, data), value, path)
    return data


# --- loading -------------------------------------------------------------------------------------

def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a config file, in the sectioned form (a flat one translated)."""
    from ..io import parse_yaml, read_text

    try:
        data = parse_yaml(read_text(path, ConfigError), f"config file {path}", ConfigError)
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of config sections (data, model, ptq, ...)")
    return translate_legacy(data)


def load_config(path: str | Path) -> Config:
    """The config in a YAML file (a run's ``config.yaml`` too); ConfigError naming any bad key."""
    return Config.from_dict(read_mapping(path), "config")


LEGACY: dict[str, str] = {
    "targets": "data.targets", "arch": "model.name", "arch_kwargs": "model.kwargs",
    "source": "adapt.source", "shot": "adapt.shot",
    "methods": "ptq.methods", "bits": "ptq.bits", "calib_size": "ptq.calib_size",
    "first_last_bits": "ptq.first_last_bits", "step_method": "ptq.step_method", "ptq_options": "ptq.options",
    "rounding": "merge.rounding", "merge_options": "merge.rounding_options",
    "target_sets": "grid.target_sets", "seeds": "grid.seeds",
    "seed": "runtime.seed", "device": "runtime.device", "threads": "runtime.threads", "cache_dir": "runtime.cache_dir",
}
"""Keys of the earlier flat files -> their path now (``benchmark: digits-<d>`` -> ``data: {kind: digits,
source: <d>}``; ``mergeq tta``'s ``run:`` section is read as a flat file, its ``tta:`` section as ``tta``)."""


def translate_legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` in the sectioned form (unchanged if it is already)."""
    data = dict(data)
    if "run" in data and isinstance(data["run"], dict):  # mergeq tta's earlier config.yaml
        data = {**data.pop("run"), **data}
    flat = [k for k in data if k in LEGACY or k == "benchmark"]
    if not flat:
        return data
    out = {k: v for k, v in data.items() if k not in flat}
    moved = []
    for key in flat:
        if key == "benchmark":
            name = data[key]
            if not isinstance(name, str) or not (name == "digits" or name.startswith("digits-")):
                raise ConfigError(f"benchmark: {name!r} of the earlier flat config form; write a data section "
                                  "(data: {kind: folder, root: ..., source: ...}) instead")
            set_path(out, "data.kind", "digits")
            set_path(out, "data.source", "mnist" if name == "digits" else name.partition("-")[2])
            moved.append("benchmark -> data")
        elif data[key] is not None or key not in ("arch", "arch_kwargs"):
            set_path(out, LEGACY[key], copy.deepcopy(data[key]))
            moved.append(f"{key} -> {LEGACY[key]}")
    if isinstance(out.get("model"), dict):  # the earlier resolution: the preset's name or kwargs where unset
        out["model"] = {"name": presets.MODEL["name"], "kwargs": copy.deepcopy(presets.MODEL["kwargs"]), **out["model"]}
    log.warning("config in the earlier flat form; read as: %s", ", ".join(moved))
    return out


# --- resolution ----------------------------------------------------------------------------------

def resolve(cfg: Config) -> Config:
    """``cfg`` with the preset's choices filled in (model, adapt, calib_size, the options of every
    PTQ method it names), defaults made explicit where they are lists (``tta.corruptions``), paths
    absolute and the model checked on the ``meta`` device (no memory)."""
    from ..models.spec import parse_model_spec, resolved_spec

    from ..data.digits import DOMAINS

    data = cfg.data
    task = task_of(data)
    model = parse_model_spec(cfg.model or copy.deepcopy(presets.model(task)))
    _check_builds(model)
    if isinstance(data, FolderData):
        data = _model_input(dataclasses.replace(data, root=str(Path(data.root).expanduser().resolve())), model)
    elif isinstance(data, StreetsData):
        from ..data.streets import DOMAINS as STREETS

        if data.targets is None:
            data = dataclasses.replace(data, targets=[d for d in STREETS if d != data.source])
    elif isinstance(data, SegmentationData):
        if data.targets is None:
            data = dataclasses.replace(data, targets=[d for d in data.domains if d != data.source])
    elif data.targets is None:
        data = dataclasses.replace(data, targets=[d for d in DOMAINS if d != data.source])
    if task == "segmentation":
        seg_source, dacs = presets.seg_adapt(cfg.preset)
        adapt = Adapt(None, None, cfg.adapt.seg_source or seg_source, cfg.adapt.dacs or dacs)
    else:
        standardized = isinstance(data, DigitsData) or data.normalize == "standardize"
        source, shot = presets.adapt(cfg.preset, standardized)
        adapt = Adapt(cfg.adapt.source or source, cfg.adapt.shot or shot)
    options = {name: {**presets.ptq_options(name, cfg.preset), **cfg.ptq.options.get(name, {})}
               for name in cfg.methods_named()}
    from ..data.corruptions import check_corruptions

    tta = dataclasses.replace(cfg.tta, corruptions=check_corruptions(cfg.tta.corruptions))
    if tta.cifar10c is not None:
        tta = dataclasses.replace(tta, cifar10c=str(Path(tta.cifar10c).expanduser().resolve()))
    return dataclasses.replace(
        cfg, data=data, model=from_mapping(ModelSpec, resolved_spec(model), "model"),
        adapt=adapt,
        ptq=dataclasses.replace(cfg.ptq, calib_size=cfg.ptq.calib_size or presets.calib_size(cfg.preset),
                                options={**cfg.ptq.options, **options}),
        merge=dataclasses.replace(cfg.merge, recalibrate=cfg.merge.recalibrate or presets.recalibrate(cfg.preset)),
        tta=tta)


def _model_input(data: FolderData, model: ModelSpec) -> FolderData:
    """``data`` with the image size, resize and normalisation it leaves unset taken from the model
    (:func:`mergeq.models.inputs.model_input`; a set image size keeps the ``8 / 7`` resize rule)."""
    from ..models.inputs import default_resize, model_input

    if data.image_size is not None and data.normalize is not None:
        return dataclasses.replace(data, resize=data.resize or default_resize(data.image_size))
    wanted = model_input(model)
    size = data.image_size or wanted.size
    resize = data.resize or (wanted.resize if data.image_size is None else default_resize(size))
    return dataclasses.replace(data, image_size=size, resize=resize, normalize=data.normalize or wanted.normalize)


def _check_builds(spec: ModelSpec) -> None:
    """A registered architecture is built on the ``meta`` device, so bad ``kwargs`` (or ``kwargs``
    asking for more than ``MAX_PARAMETERS`` weights) fail at load time, allocating nothing."""
    import torch

    from ..bounds import MAX_PARAMETERS
    from ..models import ARCHITECTURES, build_model

    if spec.builder is not None or ":" in spec.name:
        return  # imported (and checked against the data) when the pool builds it
    if spec.name not in ARCHITECTURES:
        raise ConfigError(f"model.name: expected a registered architecture ({', '.join(sorted(ARCHITECTURES))}), "
                          f"torchvision:NAME or timm:NAME, or give model.builder; got {spec.name!r}")
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in build_model(spec.name, 2, **spec.kwargs).parameters())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.kwargs: {spec.kwargs} do not fit model {spec.name!r}: {e}") from None
    if size > MAX_PARAMETERS:
        raise ConfigError(f"model.kwargs: {spec.kwargs} give {spec.name} {size:,} parameters "
                          f"({size * 4 / 2**30:,.0f} GiB as float32); at most {MAX_PARAMETERS:,}")


def check_average_weights(cfg: Config, experts: int) -> None:
    """``merge.options.average.weights``, if given, holds one weight per expert, not all zero."""
    weights = cfg.merge.options.get("average", {}).get("weights")
    if weights is not None and (len(weights) != experts or not sum(weights) > 0):
        raise ConfigError(f"merge.options.average.weights: expected {experts} weights (one per expert) with a "
                          f"positive sum, got {weights}")


def with_data(cfg: Config, spec: Mapping[str, Any]) -> Config:
    """``cfg`` recording the loaded data's resolved spec (``Benchmark.spec``)."""
    return dataclasses.replace(cfg, data=check_value(hints_of(Config)["data"], dict(spec), "data"))
