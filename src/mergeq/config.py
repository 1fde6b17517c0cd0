"""Run configuration: a dataclass that loads from YAML and dumps back to the same YAML.

Presets fill in what the user does not set: the model, the source-training and SHOT
settings (``mergeq.adapt.PRESETS``) and each PTQ method's options (``mergeq.ptq.presets``).
A run writes its resolved config as ``config.yaml``; ``mergeq run --config that.yaml``
repeats it. Every field is checked when the config is made (types, naming the key; ranges;
registered names; each method's options against its options dataclass), so a bad value
fails before any model is trained.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from .adapt import PRESETS as ADAPT_PRESETS
from .adapt.shot import ShotConfig
from .adapt.source import SourceConfig
from .errors import ConfigError
from .quant.config import parse_bits
from .quant.uniform import STEP_METHODS, check_bits
from .typecheck import check_fields, check_unique, hints_of

PRESET_NAMES = ("quick", "default", "paper")


@dataclass
class RunConfig:
    """Everything a ``mergeq run`` depends on. ``None`` fields are filled from the preset."""

    benchmark: str = "digits"
    targets: list[str] | None = None
    preset: str = "default"
    methods: list[str] = field(default_factory=lambda: ["rtn", "qdrop", "hdrq"])
    bits: list[str] = field(default_factory=lambda: ["W8A8", "W4A4", "W3A3"])
    seed: int = 0
    device: str = "cpu"
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    calib_size: int | None = None
    first_last_bits: int | None = 8
    step_method: str = "mse"
    rounding: str = "float"
    merge_options: dict[str, Any] = field(default_factory=dict)
    source: SourceConfig | None = None
    shot: ShotConfig | None = None
    ptq_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache_dir: str = ".mergeq-cache"
    threads: int | None = None  # torch CPU threads (None: torch's default); results repeat per thread count

    def __post_init__(self) -> None:
        """Validate every field before any work: types (naming the key), ranges, registered names,
        each method's ``ptq_options`` against its options dataclass, ``merge_options`` against the
        rounding policy."""
        from .merge import check_rounding_options
        from .models import ARCHITECTURES
        from .ptq import PTQ_METHODS, check_options

        check_fields({f.name: getattr(self, f.name) for f in fields(self)}, hints_of(RunConfig))
        for key, cls in (("source", SourceConfig), ("shot", ShotConfig)):
            if isinstance(getattr(self, key), dict):
                check_fields(getattr(self, key), hints_of(cls), f"{key}.")
                setattr(self, key, cls(**getattr(self, key)))
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.calib_size is not None and self.calib_size < 1:
            raise ConfigError(f"calib_size must be a positive integer or None (the preset's), got {self.calib_size}")
        if self.preset not in PRESET_NAMES:
            raise ConfigError(f"preset must be one of {PRESET_NAMES}, got {self.preset!r}")
        if self.arch is not None and self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        check_unique("methods", self.methods)
        check_unique("bits", [parse_bits(spec) for spec in self.bits], self.bits)
        if self.targets is not None:
            check_unique("targets", self.targets)
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        for m in self.methods:
            PTQ_METHODS.get(m)  # raises KeyError naming the known methods
        for m, opts in self.ptq_options.items():
            check_options(m, opts)
        check_rounding_options(self.rounding, self.merge_options)
        if self.step_method not in STEP_METHODS:
            raise ConfigError(f"step_method must be one of {STEP_METHODS}, got {self.step_method!r}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device must name a torch device such as cpu or cuda, got {self.device!r}") from None

    def resolved(self) -> "RunConfig":
        """A copy with every preset-dependent field filled in (what ``config.yaml`` records)."""
        from .ptq.presets import calib_size, ptq_options

        from .models import build_model

        arch, arch_kwargs, source, shot = ADAPT_PRESETS["default" if self.preset == "paper" else self.preset]
        opts = {m: {**ptq_options(m, self.preset), **self.ptq_options.get(m, {})} for m in self.methods}
        cfg = dataclasses.replace(
            self,
            arch=self.arch or arch,
            arch_kwargs=self.arch_kwargs if self.arch_kwargs is not None else dict(arch_kwargs),
            calib_size=self.calib_size or calib_size(self.preset),
            source=self.source or source,
            shot=self.shot or shot,
            ptq_options=opts,
        )
        try:  # on the meta device: no memory, no time
            with torch.device("meta"):
                build_model(cfg.arch, 2, **cfg.arch_kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"arch_kwargs {cfg.arch_kwargs} do not fit arch {cfg.arch!r}: {e}") from None
        return cfg

    def apply_threads(self) -> None:
        """Set torch's CPU thread count if the config names one (before any model is trained)."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        check_fields(d, hints_of(cls), "")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of run config keys")
        return cls.from_dict(data)

