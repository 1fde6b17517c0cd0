"""Your model from a spec: the mapping a config's ``model:`` section holds, resolved to an ``nn.Module``.

``resolve_model(spec, num_classes)`` builds one of::

    resnet8                                         # a registered name (mergeq.models.ARCHITECTURES)
    {name: resnet20, kwargs: {width: 16}}
    {name: "torchvision:resnet50"}                  # torchvision.models.get_model(NAME, weights=None, ...)
    {name: "timm:vit_small_patch16_224"}            # timm.create_model(NAME, pretrained=False, ...)
    {builder: "my_lab.nets:make_net", kwargs: {depth: 4}}   # any importable function returning an nn.Module

``num_classes`` is passed to every factory as ``num_classes=`` (to a builder only if its
signature takes it and ``kwargs`` does not set it). torchvision and timm are imported only when a spec
names them; they must be built for the installed torch (install the pair first, e.g. torch
2.14.1 + torchvision 0.29.1, then the ``vision`` extra adds nothing else). Nothing is downloaded: starting weights come from
``weights: PATH.safetensors`` (the built model's state-dict keys; safetensors only, never a
pickle), with ``ignore`` naming keys (``fnmatch`` patterns such as ``"fc.*"``) left at their
initial values, e.g. an ImageNet backbone with a new head. A missing or unexpected key or a
shape mismatch is an error listing them. ``weights_sha256`` (filled by :func:`resolved_spec`)
refuses a weights file that changed since a config was written.

``output``: ``None`` when the forward returns the logits tensor; otherwise the logits selector
of :mod:`mergeq.nn.output` (``"auto"``, a key / attribute name, or a tuple index) and the model
comes back wrapped in a ``LogitsAdapter``. With ``example_input``, ``resolve_model`` runs one
forward pass and checks that the model yields ``N x num_classes`` logits (or dense ``N x num_classes
x H x W`` logits: segmentation). torchvision builders that take ``weights_backbone`` (segmentation,
detection) get ``weights_backbone=None`` unless ``kwargs`` sets it, so nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ModelError
from ..nn.output import LogitsAdapter, describe_output, logits_like
from ..typed import from_mapping


@dataclass
class ModelSpec:
    name: str | None = None  # registered name, "torchvision:NAME" or "timm:NAME"
    builder: str | None = None  # "package.module:function" (instead of name)
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    weights: str | None = None  # PATH.safetensors: starting weights
    ignore: list[str] = field(default_factory=list)  # weight keys (fnmatch patterns) left at their initial values
    weights_sha256: str | None = None  # resolved: the weights file's hash (checked when given)
    output: str | int | None = None  # logits selector (None: the forward returns the logits tensor)

    def __post_init__(self) -> None:
        if (self.name is None) == (self.builder is None):
            raise ModelError(f"model: give exactly one of name (registered, torchvision:NAME, timm:NAME) or "
                             f"builder (package.module:function), got name={self.name!r}, builder={self.builder!r}")
        if self.builder is not None and ":" not in self.builder:
            raise ModelError(f"model.builder must look like 'package.module:function', got {self.builder!r}")


def parse_model_spec(spec: ModelSpec | Mapping[str, Any] | str) -> ModelSpec:
    """A :class:`ModelSpec` from a name, a mapping (checked key by key) or a ModelSpec."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        return ModelSpec(name=spec)
    return from_mapping(ModelSpec, spec, "model")


def _import_extra(package: str):
    try:
        return importlib.import_module(package)
    except Exception as e:  # torchvision built for another torch fails with RuntimeError / OSError, not ImportError
        raise ModelError(f"model {package}:NAME needs {package} built for torch {torch.__version__}; install a "
                         f"matching pair, e.g. pip install torch==2.14.1 torchvision==0.29.1 timm (README): "
                         f"{type(e).__name__}: {e}") from None


def _builder(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"model.builder {path!r}: cannot import module {module_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model.builder {path!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model.builder {path!r} is not callable")
    return obj


def _takes_num_classes(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)


def build(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The bare model of ``spec`` (no weights, no output adapter)."""
    kw = dict(spec.kwargs)
    if spec.builder is not None:
        fn = _builder(spec.builder)
        if "num_classes" not in kw and _takes_num_classes(fn):
            kw["num_classes"] = num_classes
        model = fn(**kw)
    elif spec.name.startswith("torchvision:"):
        torchvision = _import_extra("torchvision")
        name = spec.name.partition(":")[2]
        kw = {"num_classes": num_classes, **kw}
        if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
            kw.setdefault("weights_backbone", None)  # segmentation / detection: the default downloads ImageNet weights
        model = torchvision.models.get_model(name, weights=None, **kw)
    elif spec.name.startswith("timm:"):
        timm = _import_extra("timm")
        name = spec.name.partition(":")[2]
        if not timm.is_model(name):  # hf-hub:, local-dir: and unknown names: nothing is fetched or read
            raise ModelError(f"model {spec.name!r}: timm has no registered model {name!r}")
        model = timm.create_model(name, pretrained=False, **{"num_classes": num_classes, **kw})
    else:
        from . import build_model

        model = build_model(spec.name, num_classes, **kw)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec.builder or spec.name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def code_digest(spec: ModelSpec) -> str | None:
    """What identifies the code that builds ``spec``'s model beyond its name (for cache keys): a
    builder's source, hashed (its module's, which holds the classes it builds, where ``inspect``
    finds it, else the function's own; a builder without source: its qualified name), the
    version of torchvision / timm; None for mergeq's registered models."""
    if spec.builder is None:
        package = spec.name.partition(":")[0] if ":" in spec.name else None
        if package is None:
            return None
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{package} {version(package)}"
        except PackageNotFoundError:
            return f"{package} (not installed)"
    fn = _builder(spec.builder)
    for obj in (inspect.getmodule(fn), fn):
        try:
            return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
        except (OSError, TypeError):
            continue
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')} (no source)"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _list(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def weights_path(path: str | Path) -> Path:
    """``path`` checked: an existing ``.safetensors`` file."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ModelError(f"model.weights {path}: only .safetensors files are read (never pickles); convert with "
                         "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")
    if not path.is_file():
        raise ModelError(f"model.weights {path} does not exist")
    return path


def load_weights(model: nn.Module, path: str | Path, ignore: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Load ``path`` (safetensors) into ``model`` in place; every key must match except ``ignore``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = weights_path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"model.weights {path} is not a readable safetensors file: {e}") from None
    skip = lambda k: any(fnmatch.fnmatchcase(k, p) for p in ignore)  # noqa: E731
    own = {k: v for k, v in model.state_dict().items() if not skip(k)}
    state = {k: v for k, v in state.items() if not skip(k)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"missing keys: {_list(missing)}" if missing else "",
                f"unexpected keys: {_list(unexpected)}" if unexpected else "",
                f"shape mismatches: {_list(shapes)}" if shapes else ""]
    if any(problems):
        raise ModelError(f"model.weights {path} do not fit {type(model).__name__}: "
                         + "; ".join(p for p in problems if p) + " (model.ignore lists keys to leave as built)")
    model.load_state_dict(state, strict=False)
    return model


@torch.no_grad()
def check_logits(model: nn.Module, example_input: torch.Tensor, num_classes: int, what: str = "model") -> None:
    """Raise :class:`ModelError` unless ``model(example_input)`` is an ``N x num_classes`` tensor
    (classification) or ``N x num_classes x H x W`` (dense logits: segmentation)."""
    was_training = model.training
    try:
        out = model.eval()(example_input)
        raw = model.model(example_input) if isinstance(model, LogitsAdapter) else None
    finally:
        model.train(was_training)
    if not torch.is_tensor(out):
        raise ModelError(f"{what} returns {describe_output(out)}, not a logits tensor: set model.output to pick "
                         "the logits ('auto', a key or attribute name, or an index)")
    n = len(example_input)
    if out.dim() not in (2, 4) or out.shape[:2] != (n, num_classes):
        fits = logits_like(raw, n, num_classes)
        hint = (f"; item {fits[0]!r} of its output ({describe_output(raw)}) has that shape: set model.output: "
                f"{fits[0]!r}") if fits else ""
        want = f"({n}, {num_classes}, H, W)" if out.dim() == 4 else f"({n}, {num_classes})"
        raise ModelError(f"{what} returns logits of shape {tuple(out.shape)} for {n} inputs; "
                         f"expected {want} for {num_classes} classes{hint}")


def resolve_model(spec: ModelSpec | Mapping[str, Any] | str, num_classes: int,
                  example_input: torch.Tensor | None = None) -> nn.Module:
    """Build the model of ``spec`` with its starting weights and output adapter (module docstring)."""
    spec = parse_model_spec(spec)
    model = build(spec, num_classes)
    if spec.weights is not None:
        if spec.weights_sha256 is not None and file_sha256(weights_path(spec.weights)) != spec.weights_sha256:
            raise ModelError(f"model.weights {spec.weights} changed since the config was written "
                             f"(sha256 differs from model.weights_sha256); remove weights_sha256 to accept it")
        load_weights(model, spec.weights, spec.ignore)
    elif spec.ignore:
        raise ModelError("model.ignore names weight keys to skip, but model.weights is not set")
    if spec.output is not None:
        model = LogitsAdapter(model, spec.output)
    if example_input is not None:
        check_logits(model, example_input, num_classes, f"model {spec.builder or spec.name!r}")
    return model


def resolved_spec(spec: ModelSpec | Mapping[str, Any] | str) -> dict[str, Any]:
    """The spec as a config records it: weights path absolute, its sha256 filled in (a recorded
    sha256 is kept, so that :func:`resolve_model` refuses a weights file that changed since)."""
    spec = parse_model_spec(spec)
    if spec.weights is not None:
        path = weights_path(spec.weights).resolve()
        spec = dataclasses.replace(spec, weights=str(path), weights_sha256=spec.weights_sha256 or file_sha256(path))
    return dataclasses.asdict(spec)
