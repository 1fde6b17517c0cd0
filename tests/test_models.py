"""CIFAR-style ResNets and the tiny ViT: shapes, registry errors, classifier lookup on any nn.Module."""
import pytest
import torch
from torch import nn

from mergeq.models import ARCHITECTURES, build_model, get_classifier, resnet8, resnet20, vit_tiny
from mergeq.nn import quant_modules
from mergeq.ptq import quantize
from mergeq.quant import QuantConfig


@pytest.mark.parametrize("arch,blocks", [("resnet8", 1), ("resnet20", 3)])
def test_forward_shapes_and_depth(arch, blocks):
    model = build_model(arch, num_classes=7, width=8).eval()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7)
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert all(len(stage) == blocks for stage in (model.layer1, model.layer2, model.layer3))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 6 * blocks + 2  # 6n block convs + stem conv, + fc = depth 6n+2


def test_every_batchnorm_follows_a_conv():
    mods = list(resnet20().modules())
    leaf = [m for m in mods if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    for prev, cur in zip(leaf, leaf[1:]):
        if isinstance(cur, nn.BatchNorm2d):
            assert isinstance(prev, nn.Conv2d) and prev.out_channels == cur.num_features


def test_parameter_counts_and_width():
    n8 = sum(p.numel() for p in resnet8().parameters())
    n20 = sum(p.numel() for p in resnet20().parameters())
    assert 70_000 < n8 < 90_000 and 260_000 < n20 < 290_000
    assert resnet8(width=32).fc.in_features == 128


def test_unknown_arch_lists_known():
    with pytest.raises(ValueError, match="known: deeplab_mini, deeplab_r101, resnet20, resnet8, vit_tiny"):
        build_model("vgg11", 10)
    assert {"resnet8", "resnet20"} <= set(ARCHITECTURES)


def test_get_classifier():
    model = resnet8(num_classes=5)
    assert get_classifier(model) is model.fc
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
    assert get_classifier(seq) is seq[2][0]
    with pytest.raises(ValueError, match="no nn.Linear"):
        get_classifier(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_vit_shapes_head_and_linear_layers():
    torch.manual_seed(0)
    model = build_model("vit_tiny", num_classes=7, dim=32, depth=2, heads=4).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    assert get_classifier(model) is model.head
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    # per encoder layer: qkv, proj, fc1, fc2 (+ the head): every matrix is an nn.Linear
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 4 * 2 + 1
    with pytest.raises(ValueError, match="divisible"):
        vit_tiny(dim=30, heads=4)
    with pytest.raises(ValueError, match="multiple of the patch"):
        vit_tiny(image_size=30, patch=4)


def test_vit_attention_matches_reference_attention():
    """The hand-written attention equals nn.MultiheadAttention with the same weights."""
    torch.manual_seed(1)
    model = vit_tiny(dim=16, depth=1, heads=2).eval()
    attn = model.blocks[0].attn
    ref = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(attn(x), ref(x, x, x, need_weights=False)[0], atol=1e-5)


def test_vit_quantizes_every_linear_on_grid():
    torch.manual_seed(2)
    model = vit_tiny(dim=16, depth=1, heads=2).eval()
    x = torch.randn(16, 3, 32, 32)
    q = quantize(model, "gptq", x, config=QuantConfig(w_bits=3, a_bits=None, first_last_bits=8))
    layers = dict(quant_modules(q))
    assert {"patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.fc1", "blocks.0.fc2", "head"} == set(layers)
    for _, m in layers.items():
        assert torch.equal(m.weight, m.int_weight() * m.w_step)
    assert torch.isfinite(q(x)).all()
