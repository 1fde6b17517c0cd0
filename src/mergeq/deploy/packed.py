"""Packed integer checkpoints: one safetensors file holding a quantized model's integer weights.

Layout (all in one ``.safetensors`` file, nothing unpickled on load):

* ``{layer}.weight.codes`` (uint8): the layer's signed weight codes, bit-stream packed with
  :func:`mergeq.deploy.pack.pack` (``ceil(n * w_bits / 8)`` bytes);
* ``{layer}.w_step`` (float32 ``[C]``): the per-output-channel steps, or ``[C, G]`` for grouped
  steps (GPTQ ``group_size``) with ``{layer}.w_group`` (int32 ``[n]``): the group of each of the
  ``n`` flattened input columns (:mod:`mergeq.deploy.groups`; format version 2);
* ``{layer}.act_quant.step`` (float32 scalar): the input-activation step, for layers with
  activation quantization;
* every other tensor of the state dict (biases, BN buffers left unfolded) as float32
  (integer buffers keep their dtype).

The header metadata key ``mergeq`` holds JSON: ``format``, ``format_version``,
``mergeq_version``, ``quant_layers`` (per layer ``kind``, weight ``shape``, ``w_bits``,
``a_bits``, ``a_signed``, ``groups``: G or null), ``identity_modules`` (folded BatchNorms), the
architecture to rebuild (``arch``, ``num_classes``, ``arch_kwargs``) and provenance (``bits``,
``method``, ``merge``, ``domains``, ...). :func:`load_packed` rebuilds a model whose dequantized weights
(``codes * w_step``) are bit-identical to the exported model's. Files without grouped steps
are written as format version 1, which earlier readers understand.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from .. import __version__
from ..errors import CheckpointError, MergeqError
from ..checkpoint import architecture, check_trusted
from ..io import atomic_write_bytes, parse_json
from ..nn.fold import set_module
from ..nn.qmodule import QuantModule, quant_modules
from ..quant import check_bits, quantize_int
from .groups import expand_steps, is_grouped, weight_groups
from .pack import ExportError, pack, packed_size, unpack

FORMAT, FORMAT_VERSION, GROUPED_VERSION = "mergeq-packed", 1, 2
_LAYER_KEYS = ("kind", "shape", "w_bits", "a_bits", "a_signed")
_QM_STATE = ("weight", "w_step", "act_quant.step", "act_quant.signed", "act_quant.initialized")
_GROUP_KEY = "w_group"


def check_exportable(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """The model's QuantModules, after checking that each can be exported exactly.

    Raises :class:`ExportError` if there is none, an activation quantizer was never
    calibrated, or a weight is not on its grid (``codes * w_step``); :class:`BitWidthError`
    for a bit width outside 2..8.
    """
    qms = quant_modules(model)
    if not qms:
        raise ExportError(f"{type(model).__name__} has no QuantModule: quantize it first "
                          "(mergeq.quantize or `mergeq quantize`)")
    for name, m in qms:
        check_bits(m.w_bits, f"weight bits of {name}")
        if m.act_quant is not None:
            check_bits(m.act_quant.bits, f"activation bits of {name}")
            if not bool(m.act_quant.initialized):
                raise ExportError(f"activation quantizer of {name} was never calibrated")
        if not m.on_grid():
            raise ExportError(f"weight of {name} is not on its {m.w_bits}-bit grid; "
                              "call QuantModule.finalize() before exporting")
    return qms


def _bits_tag(qms: list[tuple[str, QuantModule]]) -> str:
    """The most common (w_bits, a_bits) pair, e.g. ``W4A4`` (first/last layers may differ)."""
    (w, a), _ = Counter((m.w_bits, m.a_bits) for _, m in qms).most_common(1)[0]
    return f"W{w}A{a if a is not None else 32}"


def packed_metadata(model: nn.Module, meta: dict | None = None) -> dict[str, Any]:
    """The JSON metadata :func:`save_packed` writes (also used by the ONNX exporter)."""
    meta = {k: v for k, v in (meta or {}).items() if k not in ("quant_layers", "folded_bn")}
    qms = quant_modules(model)
    extra = getattr(model, "mergeq_meta", {}) or {}
    domains = meta.get("domains") or ([meta["domain"]] if meta.get("domain") else None)
    return {
        **meta,
        "format": FORMAT, "format_version": FORMAT_VERSION, "mergeq_version": __version__,
        "bits": meta.get("bits") or _bits_tag(qms), "method": meta.get("method") or extra.get("method"),
        "merge": meta.get("merge"), "domains": domains,
        "quant_layers": {
            n: {"kind": m.kind, "shape": list(m.weight.shape), "w_bits": m.w_bits, "a_bits": m.a_bits,
                "a_signed": bool(m.act_quant.signed) if m.act_quant is not None else None,
                "groups": weight_groups(m)[0].shape[1] if is_grouped(m) else None}
            for n, m in qms
        },
        "identity_modules": [n for n, m in model.named_modules() if isinstance(m, nn.Identity)],
    }


def save_packed(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``model`` (quantized, possibly merged) as a packed integer checkpoint at ``path``.

    ``meta`` is the model's mergeq metadata (e.g. the header metadata of a ``checkpoint.save_model``
    checkpoint); it must name ``arch`` and ``num_classes`` for :func:`load_packed` to rebuild the
    model without a template.
    """
    qms = check_exportable(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in qms:
        for key in _QM_STATE:
            state.pop(f"{name}.{key}", None)
        codes = quantize_int(m.weight.detach().cpu(), m.w_step.cpu(), m.w_bits).to(torch.int64)
        tensors[f"{name}.weight.codes"] = pack(codes, m.w_bits)
        steps, g_idx = weight_groups(m)
        tensors[f"{name}.w_step"] = steps.flatten() if g_idx is None else steps
        if g_idx is not None:
            tensors[f"{name}.{_GROUP_KEY}"] = g_idx.to(torch.int32)
        if m.act_quant is not None:
            tensors[f"{name}.act_quant.step"] = m.act_quant.step.detach().cpu().float().reshape(())
    for key, t in state.items():
        tensors[key] = (t.float() if t.is_floating_point() else t).contiguous()
    info = packed_metadata(model, meta)
    if any(is_grouped(m) for _, m in qms):
        info["format_version"] = GROUPED_VERSION
    header = {"format": FORMAT, "mergeq": json.dumps(info, default=str)}
    return atomic_write_bytes(path, st_save(tensors, metadata=header))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise CheckpointError(f"packed checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if header.get("format") != FORMAT or "mergeq" not in header:
        raise CheckpointError(f"{path} is not a mergeq packed checkpoint (no {FORMAT!r} header metadata)")
    meta = parse_json(header["mergeq"], f"header metadata of {path}", CheckpointError)
    if not isinstance(meta, dict):
        raise CheckpointError(f"header metadata of {path} must be a JSON object")
    return tensors, meta


def _need(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"packed checkpoint {path} lacks tensor {key!r}")
    return tensors.pop(key)


def _layer_state(name: str, spec: dict, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Unpack one QuantModule's state-dict entries, validating sizes against the metadata."""
    shape, w_bits, a_bits = spec["shape"], spec["w_bits"], spec["a_bits"]
    try:
        check_bits(w_bits, f"weight bits of {name}")
        if a_bits is not None:
            check_bits(a_bits, f"activation bits of {name}")
        if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
            raise CheckpointError(f"weight shape of {name} must be a list of positive integers, got {shape!r}")
    except MergeqError as e:
        raise CheckpointError(f"packed checkpoint {path}: {e}") from None
    n, channels = math.prod(shape), shape[0]
    packed = _need(tensors, f"{name}.weight.codes", path)
    if packed.numel() != packed_size(n, w_bits):
        raise CheckpointError(f"layer {name} in {path}: {n} codes of {w_bits} bits need "
                              f"{packed_size(n, w_bits)} bytes, found {packed.numel()}")
    codes = unpack(packed, w_bits, n).reshape(shape)
    step = _need(tensors, f"{name}.w_step", path)
    groups = spec.get("groups")
    if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
        raise CheckpointError(f"groups of {name} in {path} must be a positive integer or null, got {groups!r}")
    want = [channels] if groups is None else [channels, groups]
    if step.dtype != torch.float32 or list(step.shape) != want:
        raise CheckpointError(f"w_step of {name} in {path} must be float32 of shape {want}, "
                              f"got {step.dtype} {list(step.shape)}")
    if not (torch.isfinite(step).all() and (step > 0).all()):
        raise CheckpointError(f"w_step of {name} in {path} has non-positive or non-finite entries")
    g_idx = None
    if groups is not None:
        g_idx = _need(tensors, f"{name}.{_GROUP_KEY}", path)
        cols = n // channels
        if g_idx.dtype != torch.int32 or list(g_idx.shape) != [cols] or int(g_idx.min()) < 0 \
                or int(g_idx.max()) >= groups:
            raise CheckpointError(f"{_GROUP_KEY} of {name} in {path} must be int32 of shape [{cols}] "
                                  f"with groups in [0, {groups})")
        g_idx = g_idx.long()
    step = expand_steps(step.reshape(channels, -1), g_idx, shape)
    out = {f"{name}.weight": codes.to(torch.float32) * step, f"{name}.w_step": step}
    if a_bits is not None:
        a_step = _need(tensors, f"{name}.act_quant.step", path)
        if a_step.dtype != torch.float32 or a_step.numel() != 1 or not (torch.isfinite(a_step) & (a_step > 0)).all():
            raise CheckpointError(f"activation step of {name} in {path} must be one positive, finite float32")
        out[f"{name}.act_quant.step"] = a_step.reshape(())
        out[f"{name}.act_quant.signed"] = torch.tensor(bool(spec["a_signed"]))
        out[f"{name}.act_quant.initialized"] = torch.tensor(True)
    return out


def _check_shapes_on_meta(meta: dict, layers: dict, path: Path, trust_builder: bool) -> None:
    """Every quantized layer's shape against the architecture the metadata names, built on the
    ``meta`` device (no memory): metadata naming a larger model than its tensors is refused before
    the real build allocates it. A trusted builder is called once, for the real build; architectures
    that cannot be built on ``meta`` are checked after it."""
    if isinstance(meta.get("model"), dict) and meta["model"].get("builder"):
        return
    try:
        with torch.device("meta"):
            skeleton = architecture(meta, None, trust_builder)
    except MergeqError:
        raise
    except Exception:  # noqa: BLE001  (a builder that needs real tensors: the full build checks it)
        return
    for name, spec in layers.items():
        try:
            shape = list(skeleton.get_submodule(name).weight.shape)
        except AttributeError:
            raise CheckpointError(f"layer {name} in {path}: the architecture its metadata names has no such "
                                  "layer with weights") from None
        if shape != spec["shape"]:
            raise CheckpointError(f"layer {name} in {path} holds weights of shape {spec['shape']}, the architecture "
                                  f"its metadata names has {shape}")


def load_packed(path: str | Path, template: nn.Module | None = None, trust_builder: bool = False) -> nn.Module:
    """Rebuild the quantized model saved by :func:`save_packed` (eval mode, on CPU).

    The architecture comes from the metadata (``arch``, ``num_classes``, ``arch_kwargs``, or a
    ``model`` spec: :func:`mergeq.checkpoint.architecture`) or from ``template``: an unquantized instance of the
    same architecture (it is copied, not modified). A ``builder`` the metadata names is never
    called unless ``trust_builder=True`` (:class:`~mergeq.errors.UntrustedCodeError`). Raises
    :class:`CheckpointError` for a missing, truncated or tampered file.
    """
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format_version") not in (FORMAT_VERSION, GROUPED_VERSION):
        raise CheckpointError(f"{path} has packed format version {meta.get('format_version')!r}; "
                              f"this mergeq reads versions {FORMAT_VERSION} and {GROUPED_VERSION}")
    required = ("quant_layers", "identity_modules") + (() if template is not None else ("num_classes",))
    missing = [k for k in required if k not in meta] + ([] if template or "arch" in meta or "model" in meta
                                                       else ["arch (or model)"])
    if missing:
        raise CheckpointError(f"header metadata of {path} lacks {missing}")
    if template is None:
        check_trusted(meta, path, trust_builder)
    layers = meta["quant_layers"]
    if not isinstance(layers, dict) or not layers or not all(isinstance(v, dict) for v in layers.values()):
        raise CheckpointError(f"quant_layers in {path} must map layer names to their settings")
    for name, spec in layers.items():
        missing = [k for k in _LAYER_KEYS if k not in spec]
        if missing:
            raise CheckpointError(f"metadata of layer {name} in {path} lacks {missing}")
    state: dict[str, torch.Tensor] = {}
    for name, spec in layers.items():  # the file's tensors against its own metadata, before any model exists
        state.update(_layer_state(name, spec, tensors, path))
    if template is None:
        _check_shapes_on_meta(meta, layers, path, trust_builder)
    try:
        model = architecture(meta, template, trust_builder)
        for name in meta["identity_modules"]:
            model.get_submodule(name)
            set_module(model, name, nn.Identity())
        for name, spec in layers.items():
            layer = model.get_submodule(name)
            if f"{name}.bias" in tensors and getattr(layer, "bias", None) is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
            qm = QuantModule(layer, 2, spec.get("a_bits"), step_method="absmax")  # steps come from the file
            if qm.kind != spec.get("kind") or list(qm.weight.shape) != spec.get("shape"):
                raise CheckpointError(f"layer {name} in {path} is a {spec.get('kind')} of shape "
                                      f"{spec.get('shape')}, the architecture has a {qm.kind} of shape "
                                      f"{list(qm.weight.shape)}")
            qm.w_bits = spec["w_bits"]
            set_module(model, name, qm)
    except CheckpointError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"packed checkpoint {path} does not fit its architecture: {e}") from None
    state.update(tensors)  # biases and other float tensors
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"packed checkpoint {path} does not fit its architecture: {e}") from None
    return model.eval().requires_grad_(False)


def read_packed_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON header metadata of a packed checkpoint."""
    return _read(Path(path))[1]
