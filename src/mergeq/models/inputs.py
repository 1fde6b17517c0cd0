"""The input a model expects: image size, resize and normalisation, for data that does not set them.

``model_input(spec)`` answers from the model spec (no weights are loaded, nothing is downloaded):

* a registered architecture (``resnet8``, ``resnet20``, ``vit_tiny``): its native 32 x 32
  (``vit_tiny``: its ``image_size`` kwarg), resize ``round(size * 8 / 7)``, normalisation
  ``standardize`` (per image and channel, as the digits benchmark; what source training's colour
  jitter assumes; these models train from scratch);
* ``torchvision:NAME``: the crop and resize of the default weights' transforms
  (``get_model_weights(NAME).DEFAULT.transforms()``), ImageNet mean / std; a model without
  registered weights gets 224 / 256 / ``imagenet``;
* ``timm:NAME``: ``timm.data.resolve_data_config`` on the model (built on the ``meta`` device):
  ``input_size``, resize ``round(size / crop_pct)``, and the named normalisation whose mean / std
  it gives (``imagenet`` or ``inception``, 0.5 / 0.5; any other pair is an error asking to set
  ``data.normalize``);
* a ``builder``: 224 / 256 / ``imagenet`` (the ImageNet convention; set ``data.image_size`` and
  ``data.normalize`` for another model).

torchvision and timm are imported only here, lazily, when a spec names them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..errors import ModelError
from .spec import ModelSpec, parse_model_spec

NAMED_MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


@dataclass(frozen=True)
class ModelInput:
    """What the model sees: ``size`` x ``size`` crops of images resized to ``resize``, normalised."""

    size: int
    resize: int
    normalize: str


IMAGENET_INPUT = ModelInput(224, 256, "imagenet")


def default_resize(size: int) -> int:
    """The shorter side before a centre crop of ``size`` (ImageNet's 256 for 224)."""
    return round(size * 8 / 7)


def normalize_name(mean, std, what: str) -> str:
    """The normalisation name whose mean / std equal ``mean`` / ``std`` (to 3 decimals)."""
    key = (tuple(round(float(m), 3) for m in mean), tuple(round(float(s), 3) for s in std))
    for name, pair in NAMED_MEAN_STD.items():
        if key == pair:
            return name
    raise ModelError(f"{what} normalises with mean {key[0]} and std {key[1]}, which mergeq has no name for; "
                     "set data.normalize (imagenet, inception, standardize or none)")


def _torchvision_input(name: str) -> ModelInput:
    torchvision = importlib.import_module("torchvision")
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return IMAGENET_INPUT
    t = weights.transforms()
    return ModelInput(int(t.crop_size[0]), int(t.resize_size[0]), normalize_name(t.mean, t.std, f"torchvision:{name}"))


def _timm_input(name: str) -> ModelInput:
    timm = importlib.import_module("timm")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    return ModelInput(size, round(size / cfg.get("crop_pct", 0.875)), normalize_name(cfg["mean"], cfg["std"],
                                                                                     f"timm:{name}"))


def model_input(spec: ModelSpec | dict | str) -> ModelInput:
    """The input ``spec``'s model expects (see the module docstring)."""
    spec = parse_model_spec(spec)
    if spec.builder is not None:
        return IMAGENET_INPUT
    kind, _, name = spec.name.rpartition(":")
    if kind in ("torchvision", "timm"):
        from .spec import _import_extra

        _import_extra(kind)  # a one-line error naming the package when it does not import
        return _torchvision_input(name) if kind == "torchvision" else _timm_input(name)
    size = int(spec.kwargs.get("image_size", 32))  # registered architectures: CIFAR-sized, trained from scratch
    return ModelInput(size, default_resize(size), "standardize")
