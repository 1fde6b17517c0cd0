"""The model pool: a source model and one SHOT expert per target, trained once and cached.

Cache entries are safetensors checkpoints with JSON sidecars, keyed by a hash of everything
that determines them (benchmark, seed, architecture, training configs, device kind and number
of torch threads: CPU training repeats bit for bit only for the same thread count), so a
changed setting never reuses a stale model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .adapt.shot import ShotConfig, shot
from .adapt.source import SourceConfig, train_source
from .data import Benchmark
from .errors import CheckpointError
from .io import load_checkpoint, save_checkpoint
from .models import build_model
from .nn.fold import set_module
from .nn.qmodule import QuantModule, quant_modules

log = logging.getLogger(__name__)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model (full precision or quantized) saved by :func:`save_model`."""
    state, meta = load_checkpoint(path)
    for key in ("arch", "num_classes"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata of {path} lacks {key!r}: was it written by mergeq?")
    model = build_model(meta["arch"], meta["num_classes"], **meta.get("arch_kwargs", {}))
    for name in meta.get("folded_bn", []):
        set_module(model, name, nn.Identity())
    for name, (w_bits, a_bits) in meta.get("quant_layers", {}).items():
        layer = model.get_submodule(name)
        if f"{name}.bias" in state and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        set_module(model, name, QuantModule(layer, w_bits, a_bits))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit architecture {meta['arch']}: {e}") from None
    return model.to(device).eval(), meta


def save_model(model: nn.Module, path: str | Path, meta: dict) -> Path:
    """Save a model built by ``build_model`` (possibly BN-folded and quantized) with its metadata."""
    qlayers = {n: [m.w_bits, m.a_bits] for n, m in quant_modules(model)}
    extra: dict[str, Any] = {"mergeq_version": __version__}
    if qlayers:
        fresh = build_model(meta["arch"], meta["num_classes"], **meta.get("arch_kwargs", {}))
        bns = [n for n, m in fresh.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        extra["folded_bn"] = [n for n in bns if isinstance(model.get_submodule(n), nn.Identity)]
        extra["quant_layers"] = qlayers
    return save_checkpoint(model.state_dict(), path, {**meta, **extra})


class ModelPool:
    """Trains or loads the source model and the experts of one benchmark and seed."""

    def __init__(self, bench: Benchmark, arch: str, arch_kwargs: dict, source_cfg: SourceConfig,
                 shot_cfg: ShotConfig, seed: int, cache_dir: str | Path, device: str = "cpu",
                 progress: bool = False) -> None:
        self.bench, self.arch, self.arch_kwargs = bench, arch, dict(arch_kwargs)
        self.source_cfg, self.shot_cfg, self.seed = source_cfg, shot_cfg, seed
        self.cache_dir, self.device, self.progress = Path(cache_dir), device, progress
        self._meta = {"benchmark": bench.name, "arch": arch, "arch_kwargs": self.arch_kwargs,
                      "num_classes": bench.num_classes, "seed": seed}
        # training repeats bit for bit only on the same device kind and (CPU) number of torch threads
        compute = {"device": torch.device(device).type, "threads": torch.get_num_threads()}
        self._source_key = _key({**self._meta, "source": asdict(source_cfg), "compute": compute})

    def _cached(self, path: Path, make, meta: dict) -> nn.Module:
        if path.exists():
            log.info("reusing cached %s", path)
            return model_from_checkpoint(path, self.device)[0]
        model = make()
        save_model(model, path, meta)
        return model.to(self.device).eval()

    def source(self) -> nn.Module:
        path = self.cache_dir / f"source-{self._source_key}.safetensors"

        def make() -> nn.Module:
            torch.manual_seed(self.seed)
            model = build_model(self.arch, self.bench.num_classes, **self.arch_kwargs)
            return train_source(model, self.bench.source.train, self.source_cfg, seed=self.seed,
                                device=self.device, progress=self.progress)

        meta = {**self._meta, "domain": self.bench.source.name, "role": "source",
                "config": asdict(self.source_cfg)}
        return self._cached(path, make, meta)

    def expert(self, domain: str) -> nn.Module:
        key = _key({"source": self._source_key, "domain": domain, "shot": asdict(self.shot_cfg)})
        path = self.cache_dir / f"expert-{domain}-{key}.safetensors"

        def make() -> nn.Module:
            return shot(self.source(), self.bench.targets[domain].train, self.shot_cfg, seed=self.seed,
                        device=self.device, progress=self.progress)

        meta = {**self._meta, "domain": domain, "role": "expert", "config": asdict(self.shot_cfg)}
        return self._cached(path, make, meta)
