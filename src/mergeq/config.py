"""Run configuration: a dataclass that loads from YAML and dumps back to the same YAML.

Presets fill in what the user does not set: the model, the source-training and SHOT
settings (``mergeq.adapt.PRESETS``) and each PTQ method's options (``mergeq.ptq.presets``).
A run writes its resolved config as ``config.yaml``; ``mergeq run --config that.yaml``
repeats it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .adapt import PRESETS as ADAPT_PRESETS
from .adapt.shot import ShotConfig
from .adapt.source import SourceConfig
from .quant.config import parse_bits
from .quant.uniform import STEP_METHODS

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
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"preset must be one of {PRESET_NAMES}, got {self.preset!r}")
        if not self.methods:
            raise ValueError("methods must name at least one PTQ method")
        for spec in self.bits:
            parse_bits(spec)
        from .merge import ROUNDINGS
        from .ptq import PTQ_METHODS

        for m in self.methods:
            PTQ_METHODS.get(m)  # raises KeyError naming the known methods
        ROUNDINGS.get(self.rounding)
        if self.step_method not in STEP_METHODS:
            raise ValueError(f"step_method must be one of {STEP_METHODS}, got {self.step_method!r}")
        if isinstance(self.source, dict):
            self.source = SourceConfig(**self.source)
        if isinstance(self.shot, dict):
            self.shot = ShotConfig(**self.shot)

    def resolved(self) -> "RunConfig":
        """A copy with every preset-dependent field filled in (what ``config.yaml`` records)."""
        from .ptq.presets import calib_size, ptq_options

        arch, arch_kwargs, source, shot = ADAPT_PRESETS["default" if self.preset == "paper" else self.preset]
        opts = {m: {**ptq_options(m, self.preset), **self.ptq_options.get(m, {})} for m in self.methods}
        return dataclasses.replace(
            self,
            arch=self.arch or arch,
            arch_kwargs=self.arch_kwargs if self.arch_kwargs is not None else dict(arch_kwargs),
            calib_size=self.calib_size or calib_size(self.preset),
            source=self.source or source,
            shot=self.shot or shot,
            ptq_options=opts,
        )

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping of run config keys")
        return cls.from_dict(data)
