"""The model pool: a source model and one SHOT expert per target, trained once and cached.

Cache entries are single-file safetensors checkpoints (metadata and a SHA-256 digest in the
header, written atomically), keyed by a hash of everything that determines them (benchmark,
seed, architecture, training configs, device kind and number of torch threads: CPU training
repeats bit for bit only for the same thread count), so a changed setting never reuses a stale
model. An entry is verified on read: one that is truncated, fails its digest or holds another
model than its key names (a swapped file) is rebuilt, with a warning in the log. A lock file
per entry lets concurrent runs (``mergeq bench`` workers) train each model once.
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
from .errors import CheckpointError, MergeqError
from .io import file_lock, load_checkpoint, read_checkpoint_header, save_checkpoint
from .models import build_model
from .nn.fold import set_module
from .nn.qmodule import QuantModule, quant_modules
from .quant import check_bits

log = logging.getLogger(__name__)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_meta(meta: dict, path: str | Path) -> None:
    """Types of the metadata fields that describe the architecture, each error naming the field."""
    for key in ("arch", "num_classes"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata of {path} lacks {key!r}: was it written by mergeq?")
    expected = {"arch": str, "num_classes": int, "arch_kwargs": dict, "folded_bn": list, "quant_layers": dict}
    for key, kind in expected.items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise CheckpointError(f"checkpoint metadata of {path}: {key} must be a {kind.__name__}, "
                                  f"got {meta[key]!r}")
    if meta["num_classes"] < 1:
        raise CheckpointError(f"checkpoint metadata of {path}: num_classes must be positive, got {meta['num_classes']}")
    for name, bits in meta.get("quant_layers", {}).items():
        try:
            if not (isinstance(bits, list) and len(bits) == 2):
                raise MergeqError("expected [w_bits, a_bits]")
            check_bits(bits[0], "w_bits")
            if bits[1] is not None:
                check_bits(bits[1], "a_bits")
        except MergeqError as e:
            raise CheckpointError(f"checkpoint metadata of {path}: quant_layers[{name!r}] = {bits!r}: {e}") from None


def _architecture(meta: dict, path: str | Path) -> nn.Module:
    """The model the metadata describes, before quantized layers are wrapped; a layer named in
    ``folded_bn`` or ``quant_layers`` that the architecture lacks is a CheckpointError."""
    kwargs = meta.get("arch_kwargs", {})
    try:
        model = build_model(meta["arch"], meta["num_classes"], **kwargs)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"checkpoint {path}: architecture {meta['arch']!r} with arch_kwargs {kwargs} "
                              f"cannot be built: {e}") from None
    modules = dict(model.named_modules())
    for key in ("folded_bn", "quant_layers"):
        for name in meta.get(key, []):
            if not isinstance(modules.get(name), (nn.Conv2d, nn.Linear) if key == "quant_layers" else nn.Module):
                raise CheckpointError(f"checkpoint metadata of {path}: {key} names {name!r}, which "
                                      f"{meta['arch']} has no such {'Conv2d/Linear ' if key == 'quant_layers' else ''}layer")
    for name in meta.get("folded_bn", []):
        set_module(model, name, nn.Identity())
    return model


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model (full precision or quantized) saved by :func:`save_model`.

    The metadata and the tensor shapes in the file header are checked against the architecture,
    built first on the ``meta`` device (no memory), before anything is allocated; quantized
    layers must hold weights on the grid of their declared bit width."""
    shapes, meta = read_checkpoint_header(path)
    _check_meta(meta, path)
    with torch.device("meta"):
        skeleton = _architecture(meta, path)
    for key, t in skeleton.state_dict().items():
        if key in shapes and list(t.shape) != list(shapes[key]):
            raise CheckpointError(f"checkpoint {path}: tensor {key!r} has shape {list(shapes[key])}, architecture "
                                  f"{meta['arch']} with arch_kwargs {meta.get('arch_kwargs', {})} needs {list(t.shape)}")
    state, meta = load_checkpoint(path)
    model = _architecture(meta, path)
    for name, (w_bits, a_bits) in meta.get("quant_layers", {}).items():
        layer = model.get_submodule(name)
        if f"{name}.bias" in state and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        set_module(model, name, QuantModule(layer, w_bits, a_bits, step_method="absmax"))  # steps come from the file
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit architecture {meta['arch']}: {e}") from None
    for name, m in quant_modules(model):
        if not m.on_grid():
            raise CheckpointError(f"checkpoint {path}: the weights of layer {name!r} are not on the grid of its "
                                  f"declared {m.w_bits} bits (quant_layers does not match the stored weights)")
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

    def _cached(self, path: Path, make, meta: dict, key: str) -> nn.Module:
        with file_lock(self.cache_dir / ".locks" / f"{path.stem}.lock"):
            if path.exists():
                try:
                    model, stored = model_from_checkpoint(path, self.device)
                    _check_entry(path, stored, meta, key)
                    log.info("reusing cached %s", path)
                    return model
                except CheckpointError as e:
                    log.warning("rebuilding cache entry: %s", e)
            model = make()
            save_model(model, path, {**meta, "cache_key": key})
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
        return self._cached(path, make, meta, self._source_key)

    def expert(self, domain: str) -> nn.Module:
        key = _key({"source": self._source_key, "domain": domain, "shot": asdict(self.shot_cfg)})
        path = self.cache_dir / f"expert-{domain}-{key}.safetensors"

        def make() -> nn.Module:
            return shot(self.source(), self.bench.targets[domain].train, self.shot_cfg, seed=self.seed,
                        device=self.device, progress=self.progress)

        meta = {**self._meta, "domain": domain, "role": "expert", "config": asdict(self.shot_cfg)}
        return self._cached(path, make, meta, key)


def _check_entry(path: Path, stored: dict, meta: dict, key: str) -> None:
    """A cache entry must hold the model its key names (entries of the earlier two-file form,
    written without ``cache_key``, are matched on the metadata they were saved with)."""
    if "cache_key" in stored:
        same = stored["cache_key"] == key
    else:
        same = all(stored.get(k) == v for k, v in json.loads(json.dumps(meta)).items())
    if not same:
        raise CheckpointError(f"cache entry {path} holds another model (role {stored.get('role')!r}, domain "
                              f"{stored.get('domain')!r}, key {stored.get('cache_key')!r}) than its name says")
