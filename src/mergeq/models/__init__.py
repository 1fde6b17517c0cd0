"""Small models for CPU experiments; any ``torch.nn.Module`` works with the rest of mergeq.

``resolve_model`` builds a model from a config's ``model:`` spec: a registered name,
``torchvision:NAME`` / ``timm:NAME``, or your own ``builder``, with safetensors starting weights
and an output adapter (``mergeq.models.spec``)."""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .deeplab import DeepLab, deeplab_mini, deeplab_r101
from .resnet import BasicBlock, ResNet, resnet8, resnet20
from .vit import ViT, vit_tiny

ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {"resnet8": resnet8, "resnet20": resnet20, "vit_tiny": vit_tiny,
                                                     "deeplab_mini": deeplab_mini, "deeplab_r101": deeplab_r101}


def build_model(arch: str, num_classes: int = 10, **kw) -> nn.Module:
    """Build a registered architecture by name; unknown names list the known ones."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return factory(num_classes=num_classes, **kw)


def get_classifier(model: nn.Module) -> nn.Linear:
    """The classifier head: the last ``nn.Linear`` in module order (any ``nn.Module``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as classifier")
    return linears[-1]


from .spec import ModelSpec, load_weights, resolve_model, resolved_spec  # noqa: E402  (spec uses build_model)

__all__ = ["ARCHITECTURES", "BasicBlock", "DeepLab", "ModelSpec", "ResNet", "ViT", "build_model", "deeplab_mini",
           "deeplab_r101", "get_classifier", "load_weights", "resnet8", "resnet20", "resolve_model", "resolved_spec",
           "vit_tiny"]
