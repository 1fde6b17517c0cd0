"""Small models of several shapes, built here, so tests prove generality without torchvision."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(c // 2, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(self.expand(self.mid(self.reduce(x))) + x)


def tiny_resnet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        Basic(8, 8), Basic(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


def vgg_stack(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes),
    )


class Nested(nn.Module):
    """Blocks inside nested containers (a ModuleDict of Sequentials of bottlenecks)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.ModuleDict({"a": nn.Sequential(Bottleneck(16)), "b": nn.Sequential(nn.Sequential(Bottleneck(16)))})
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stages["b"](self.stages["a"](self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MODEL_FACTORIES = {"resnet": tiny_resnet, "vgg": vgg_stack, "nested_bottleneck": Nested}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def any_model(request) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(MODEL_FACTORIES[request.param]())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# --- the experiment layer: a shrunken digits config whose models are trained once per session -----

TINY = {
    "preset": "quick", "data": {"targets": ["uci", "noisy"]}, "model": {"name": "resnet8", "kwargs": {"width": 4}},
    "adapt": {"source": {"epochs": 1, "min_steps": 0}, "shot": {"epochs": 1, "min_steps": 0}},  # one pass each
    "ptq": {"methods": ["rtn"], "bits": ["W8A8", "W3A3"], "calib_size": 64}, "runtime": {"threads": 1},
}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One model cache for every test that runs the tiny digits config (each model trains once)."""
    return tmp_path_factory.mktemp("model-cache")


def tiny_config(cache, changes: dict | None = None):
    """The tiny digits config with ``runtime.cache_dir = cache`` and ``changes`` (dotted paths)."""
    from mergeq.experiments.config import Config

    return Config.from_dict(TINY).updated({"runtime.cache_dir": str(cache), **(changes or {})})
