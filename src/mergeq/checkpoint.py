"""Model checkpoints: save a model (full precision, BN-folded, quantized, merged) and rebuild it.

A checkpoint is one safetensors file (:mod:`mergeq.io`; format: docs/FORMAT.md): the state dict,
and in the header the metadata, which names the architecture in one of two ways:

* ``arch`` + ``arch_kwargs``: a registered architecture (``mergeq.models.ARCHITECTURES``);
* ``model``: a model spec (:mod:`mergeq.models.spec`: ``torchvision:NAME``, ``timm:NAME``,
  ``builder: "pkg.mod:fn"`` with ``kwargs`` and ``output``), rebuilt without its starting weights;

plus ``num_classes``, ``folded_bn`` (BatchNorms folded away, now ``nn.Identity``) and
``quant_layers`` (``{layer: [w_bits, a_bits]}``) for quantized models. Any other model loads
onto a ``template``: an unquantized, unfolded instance of the saved architecture (copied, not
modified).

Loading a file never imports or calls code the file names: architectures are rebuilt only from
the allow-list (registered models, ``torchvision:`` / ``timm:`` factories by registered name).
A ``builder`` named in the metadata is refused (:class:`~mergeq.errors.UntrustedCodeError`)
unless the caller passes the model (``template=``) or trusts the file (``trust_builder=True``,
the command line's ``--trust-builder``), as ``trust_remote_code`` does elsewhere.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from . import __version__
from .errors import CheckpointError, MergeqError, UntrustedCodeError
from .io import load_checkpoint, read_checkpoint_header, save_checkpoint
from .models import build_model
from .nn.fold import set_module
from .nn.qmodule import QuantModule, quant_modules
from .quant import check_bits


def check_trusted(meta: dict, path: str | Path, trust_builder: bool = False) -> None:
    """Refuse metadata naming a ``builder`` (code to import and call) unless ``trust_builder``."""
    spec = meta.get("model")
    builder = spec.get("builder") if isinstance(spec, dict) else None
    if builder is not None and not trust_builder:
        raise UntrustedCodeError(
            f"{path} names the model builder {builder!r}: mergeq runs no code named in a model file; pass the "
            "model yourself (template= in Python, model: in the config) or, if you trust the file, "
            "trust_builder=True (command line: --trust-builder)")


META_TYPES = {"arch": str, "model": dict, "num_classes": int, "arch_kwargs": dict, "folded_bn": list,
              "quant_layers": dict, "data": dict, "benchmark": str, "seed": int, "domain": str, "domains": list,
              "source_sha256": str}
_TYPE_NAMES = {str: "a string", int: "an integer", dict: "a mapping", list: "a list"}


def check_meta_types(meta: dict, path: str | Path) -> None:
    """The types of the metadata fields mergeq reads (:data:`META_TYPES`), each error naming the
    file, the field and the type expected."""
    for key, kind in META_TYPES.items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise CheckpointError(f"checkpoint metadata of {path}: {key} must be {_TYPE_NAMES[kind]}, "
                                  f"got {meta[key]!r}")


def _check_meta(meta: dict, path: str | Path, template: nn.Module | None, trust_builder: bool = False) -> None:
    """Types of the metadata fields that describe the architecture, each error naming the field;
    a builder named in the file is refused unless trusted (module docstring)."""
    if template is None:
        if "arch" not in meta and "model" not in meta:
            raise CheckpointError(f"checkpoint metadata of {path} names no architecture (arch or model): was it "
                                  "written by mergeq? Load it onto a model of its architecture with template=")
        if "num_classes" not in meta:
            raise CheckpointError(f"checkpoint metadata of {path} lacks 'num_classes': was it written by mergeq?")
        check_trusted(meta, path, trust_builder)
    check_meta_types(meta, path)
    if meta.get("num_classes", 1) < 1:
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


def describe(meta: dict) -> str:
    """The architecture the metadata names, for messages."""
    if "arch" in meta:
        return f"{meta['arch']} with arch_kwargs {meta.get('arch_kwargs', {})}"
    spec = meta.get("model") or {}
    return f"model {spec.get('builder') or spec.get('name')!r} with kwargs {spec.get('kwargs', {})}"


def architecture(meta: dict, template: nn.Module | None = None, trust_builder: bool = False) -> nn.Module:
    """The bare model ``meta`` names (or a copy of ``template``), before folding and quantization;
    a ``builder`` in ``meta`` is called only if ``trust_builder``."""
    if template is not None:
        return copy.deepcopy(template)
    if "arch" in meta:
        return build_model(meta["arch"], meta["num_classes"], **meta.get("arch_kwargs", {}))
    from .models.spec import parse_model_spec, resolve_model

    check_trusted(meta, "the metadata", trust_builder)
    spec = parse_model_spec({**meta["model"], "weights": None, "weights_sha256": None, "ignore": []})
    return resolve_model(spec, meta["num_classes"])


def _skeleton(meta: dict, path: str | Path, template: nn.Module | None, trust_builder: bool,
              keys: Iterable[str] = ()) -> nn.Module:
    """The model the metadata describes, before quantized layers are wrapped, with the biases the
    file's tensor ``keys`` hold (:func:`_add_biases`); a layer named in ``folded_bn`` or
    ``quant_layers`` that the architecture lacks is a CheckpointError."""
    try:
        model = architecture(meta, template, trust_builder)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"checkpoint {path}: architecture {describe(meta)} cannot be built: {e}") from None
    modules = dict(model.named_modules())
    kinds = {"folded_bn": (nn.modules.batchnorm._BatchNorm, "BatchNorm"), "quant_layers": ((nn.Conv2d, nn.Linear),
                                                                                          "Conv2d/Linear")}
    for key, (kind, kind_name) in kinds.items():
        for name in meta.get(key, []):
            if not isinstance(modules.get(name), kind):
                raise CheckpointError(f"checkpoint metadata of {path}: {key} names {name!r}, but "
                                      f"{describe(meta) if template is None else 'the template'} has no such "
                                      f"{kind_name} layer")
    for name in meta.get("folded_bn", []):
        set_module(model, name, nn.Identity())
    _add_biases(model, keys)
    return model


def _add_biases(model: nn.Module, keys: Iterable[str]) -> None:
    """A zero bias on every bias-free Conv2d/Linear whose ``NAME.bias`` is among ``keys``.

    BN folding and the ``bn`` recalibration of a merge (:mod:`mergeq.merge.recalibrate`: REPAIR's
    per-channel shift needs a bias) give bias-free layers a bias; the file's tensors are the
    record of which, so every checkpoint (and those written before this rule) loads back."""
    keys = set(keys)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None and f"{name}.bias" in keys:
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device))


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", template: nn.Module | None = None,
                          trust_builder: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a model (full precision or quantized) saved by :func:`save_model`.

    The architecture is the one the metadata names, or ``template`` (see the module docstring;
    a ``builder`` the metadata names is called only with ``trust_builder=True``).
    The metadata and the tensor shapes in the file header are checked against it (a named
    architecture is built on the ``meta`` device first: no memory) before the tensors are read;
    quantized layers must hold weights on the grid of their declared bit width."""
    shapes, meta = read_checkpoint_header(path)
    _check_meta(meta, path, template, trust_builder)
    if template is None:
        with torch.device("meta"):
            skeleton = _skeleton(meta, path, None, trust_builder, shapes)
    else:
        skeleton = _skeleton(meta, path, template, trust_builder, shapes)
    for key, t in skeleton.state_dict().items():
        if key in shapes and list(t.shape) != list(shapes[key]):
            raise CheckpointError(f"checkpoint {path}: tensor {key!r} has shape {list(shapes[key])}, architecture "
                                  f"{describe(meta) if template is None else 'of the template'} needs "
                                  f"{list(t.shape)}")
    state, meta = load_checkpoint(path)
    model = _skeleton(meta, path, template, trust_builder, state) if template is None else skeleton
    for name, (w_bits, a_bits) in meta.get("quant_layers", {}).items():
        layer = model.get_submodule(name)
        set_module(model, name, QuantModule(layer, w_bits, a_bits, step_method="absmax"))  # steps come from the file
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit architecture {describe(meta)}: {e}") from None
    for name, m in quant_modules(model):
        steps = {"weight step": m.w_step, **({"activation step": m.act_quant.step} if m.act_quant else {})}
        for what, step in steps.items():
            if not (torch.isfinite(step).all() and (step > 0).all()):
                bad = step.detach().flatten()[~(torch.isfinite(step) & (step > 0)).flatten()][0]
                raise CheckpointError(f"checkpoint {path}: the {what} of layer {name!r} is {float(bad)}; "
                                      "a step must be positive and finite")
        if not m.on_grid():
            raise CheckpointError(f"checkpoint {path}: the weights of layer {name!r} are not on the grid of its "
                                  f"declared {m.w_bits} bits (quant_layers does not match the stored weights)")
    return model.to(device).eval(), meta


def builder_template(path: str | Path, spec: Any = None, trust_builder: bool = False) -> nn.Module | None:
    """The model to load a checkpoint whose metadata names a ``builder`` onto: built from the
    caller's own model ``spec`` (a config's ``model:``), else, with ``trust_builder``, from the
    file's spec. None for any other checkpoint, and when neither is given (the load then refuses
    the file, naming the ways to proceed)."""
    _, meta = read_checkpoint_header(path)
    named = meta.get("model")
    if not (isinstance(named, dict) and named.get("builder") is not None) or (spec is None and not trust_builder):
        return None
    _check_meta(meta, path, None, trust_builder=True)
    if spec is not None:
        from .models.spec import parse_model_spec

        meta = {"model": dataclasses.asdict(parse_model_spec(spec)), "num_classes": meta["num_classes"]}
    try:
        return architecture(meta, trust_builder=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: model {describe(meta)} cannot be built: {e}") from None


def save_model(model: nn.Module, path: str | Path, meta: dict, template: nn.Module | None = None) -> Path:
    """Save ``model`` (possibly BN-folded and quantized) with its metadata (``meta`` names its
    architecture, or ``template`` is an unfolded, unquantized instance of it)."""
    qlayers = {n: [m.w_bits, m.a_bits] for n, m in quant_modules(model)}
    extra: dict[str, Any] = {"mergeq_version": __version__}
    if qlayers:
        with torch.device("meta"):
            fresh = architecture(meta, None) if template is None else template
        bns = [n for n, m in fresh.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        extra["folded_bn"] = [n for n in bns if isinstance(model.get_submodule(n), nn.Identity)]
        extra["quant_layers"] = qlayers
    return save_checkpoint(model.state_dict(), path, {**meta, **extra})
