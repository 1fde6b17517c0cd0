"""Segmentation models: deeplab_mini / deeplab_r101 (models.deeplab), their folding, units,
preparation and PTQ; dense logits through the model spec; torchvision's segmentation models."""
import sys
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn import functional as F

from mergeq.errors import ModelError
from mergeq.models import build_model, deeplab_mini, deeplab_r101, resolve_model
from mergeq.models.deeplab import Bottleneck
from mergeq.models.spec import check_logits
from mergeq.nn import calibrate_activations, fold_bn, has_batchnorm, prepare, quant_modules
from mergeq.nn.blocks import partition
from mergeq.ptq import quantize
from mergeq.quant.config import QuantConfig

from .conftest import randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

DAFORMER_UNITS = ["backbone.stem.0", "backbone.layer1.0", "backbone.layer2.0", "backbone.layer3.0",
                  "backbone.layer4.0", "decode_head.embed.0", "decode_head.embed.1", "decode_head.embed.2",
                  "decode_head.embed.3", "decode_head.fuse.0", "decode_head.conv_seg"]


def _model(head="daformer", seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(deeplab_mini(5, width=8, head=head, **kw), seed)


def _images(n=4, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head", ["daformer", "aspp"])
def test_output_at_input_size_and_output_stride_8(head):
    model = _model(head)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
    assert out.shape == (2, 5, 32, 48)
    assert [f.shape[2:] for f in feats] == [(8, 12), (4, 6), (4, 6), (4, 6)]  # strides 4, 8, 8, 8


@settings(max_examples=6, deadline=None)
@given(h=st.integers(9, 40), w=st.integers(9, 40), head=st.sampled_from(["daformer", "aspp"]))
def test_any_input_size_gives_logits_of_that_size(h, w, head):
    with torch.no_grad():
        assert deeplab_mini(3, width=4, head=head).eval()(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)


def test_last_op_is_bilinear_upsampling_of_the_head_logits():
    model, x = _model(), _images(2)
    seen = {}
    model.decode_head["conv_seg"].register_forward_hook(lambda m, i, o: seen.setdefault("logits", o))
    with torch.no_grad():
        out = model(x)
    assert seen["logits"].shape[2:] == (8, 8)  # the DAFormer head works at the first stage's stride 4
    assert torch.equal(out, F.interpolate(seen["logits"], size=(32, 32), mode="bilinear", align_corners=False))


def test_dilations_as_resnet_v1c_with_contracted_first_block():
    model = deeplab_mini(5, width=8, blocks=(1, 1, 2, 2))
    dil = {n: m.dilation[0] for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    assert dil["backbone.layer2.0.conv1"] == dil["backbone.layer2.0.conv2"] == 1
    assert (dil["backbone.layer3.0.conv1"], dil["backbone.layer3.0.conv2"], dil["backbone.layer3.1.conv1"]) == (1, 2, 2)
    assert (dil["backbone.layer4.0.conv1"], dil["backbone.layer4.0.conv2"], dil["backbone.layer4.1.conv1"]) == (2, 4, 4)
    strided = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)}
    assert strided == {"backbone.stem.0", "backbone.layer2.0.conv1", "backbone.layer2.0.shortcut.0"}
    aspp = deeplab_mini(5, width=8, head="aspp", aspp_rates=(1, 2, 3, 5))
    assert [c.dilation[0] for c in aspp.decode_head.convs] == [1, 2, 3, 5]
    assert all(c.bias is not None for c in aspp.decode_head.convs)


def test_r101_scale_constructor():
    r101 = deeplab_r101(19)
    assert sum(isinstance(m, Bottleneck) for m in r101.modules()) == 3 + 4 + 23 + 3
    assert r101.backbone.out_channels == [256, 512, 1024, 2048]
    assert r101.decode_head["fuse"][0].in_channels == 4 * 786 and r101.decode_head["conv_seg"].in_channels == 128
    small = deeplab_r101(7, blocks=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        feats = small.backbone(torch.randn(1, 3, 40, 40))
        assert small(torch.randn(1, 3, 40, 40)).shape == (1, 7, 40, 40)
    assert [f.shape[2:] for f in feats] == [(10, 10), (5, 5), (5, 5), (5, 5)]
    assert small.backbone.layer4[0].conv2.dilation == (2, 2)  # the Bottleneck's 3x3, contracted


@pytest.mark.parametrize("head", ["daformer", "aspp"])
def test_fold_bn_equals_the_unfolded_model(head):
    model, x = _model(head), _images()
    folded = fold_bn(model, x[:2])
    assert not has_batchnorm(folded)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert folded.backbone.layer4[0].conv2.dilation == (4, 4)


def test_reconstruction_units():
    x = _images(2)
    q = prepare(_model(), QuantConfig(4, 4), x)
    calibrate_activations(q, x)
    assert [n for n, _ in partition(q, x)] == DAFORMER_UNITS
    q = prepare(_model("aspp"), QuantConfig(4, 4), x)
    calibrate_activations(q, x)
    assert [n for n, _ in partition(q, x)] == DAFORMER_UNITS[:5] + ["decode_head"]


def test_prepare_keeps_stem_and_classifier_at_8_bits_and_the_output_float():
    x = _images(8)
    q = prepare(_model(), QuantConfig(4, 4), x[:2])
    calibrate_activations(q, x)
    bits = {n: (m.w_bits, m.a_bits) for n, m in quant_modules(q)}
    assert bits.pop("backbone.stem.0") == bits.pop("decode_head.conv_seg") == (8, 8)
    assert set(bits.values()) == {(4, 4)}
    seen = {}
    q.decode_head["conv_seg"].register_forward_hook(lambda m, i, o: seen.setdefault("logits", o))
    with torch.no_grad():
        out = q(x)
    step = q.decode_head["conv_seg"].act_quant.step
    assert torch.equal(out, F.interpolate(seen["logits"], size=(32, 32), mode="bilinear", align_corners=False))
    assert not torch.allclose(seen["logits"] / step, torch.round(seen["logits"] / step))  # not on an activation grid


@pytest.mark.parametrize("method", ["rtn", "qdrop", "hdrq"])
def test_ptq_methods_run_and_leave_weights_on_their_grid(method):
    model, x = _model(), _images(8)
    options = {} if method == "rtn" else {"iters": 3, "batch_size": 4}
    q = quantize(model, method, x, config=QuantConfig(4, 4), source=model, **options)
    assert list(q.mergeq_meta.get("recon_loss", dict.fromkeys(DAFORMER_UNITS))) == DAFORMER_UNITS
    for _, m in quant_modules(q):
        codes = m.int_weight()
        assert torch.equal(m.weight, codes * m.w_step)
        assert codes.min() >= -(2 ** (m.w_bits - 1)) and codes.max() <= 2 ** (m.w_bits - 1) - 1
    with torch.no_grad():
        assert q(x).shape == (8, 5, 32, 32)


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ModelError, match=r"head must be one of \('daformer', 'aspp'\), got 'fcn'"):
        deeplab_mini(5, head="fcn")
    with pytest.raises(ModelError, match="one entry per stage"):
        deeplab_mini(5, blocks=(1, 1))
    with pytest.raises(ModelError, match="ASPP rates must be positive"):
        deeplab_mini(5, head="aspp", aspp_rates=(0, 2))


def test_registered_and_dense_logits_accepted_by_the_spec():
    x = _images(2)
    model = resolve_model({"name": "deeplab_mini", "kwargs": {"width": 4}}, 6, example_input=x)
    assert isinstance(model, type(build_model("deeplab_mini", 6, width=4)))
    with pytest.raises(ModelError, match=r"shape \(2, 6, 32, 32\) for 2 inputs; expected \(2, 3, H, W\) for 3"):
        check_logits(model, x, 3)


def test_torchvision_segmentation_builders_get_no_backbone_weights(monkeypatch):
    """spec.build passes ``weights_backbone=None`` where the builder takes it (the default downloads)."""
    calls = []

    def seg(*, weights=None, weights_backbone="IMAGENET", num_classes=None, aux_loss=None):
        calls.append(("seg", weights, weights_backbone))
        return deeplab_mini(num_classes, width=4)

    def cls(*, weights=None, num_classes=1000):
        calls.append(("cls", weights))
        return nn.Linear(3, num_classes)

    builders = {"deeplabv3_resnet50": seg, "resnet18": cls}
    tv = types.SimpleNamespace(models=types.SimpleNamespace(
        get_model_builder=builders.__getitem__, get_model=lambda name, **kw: builders[name](**kw)))
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    resolve_model("torchvision:deeplabv3_resnet50", 4, example_input=_images(1))
    resolve_model("torchvision:resnet18", 4)
    assert calls == [("seg", None, None), ("cls", None)]


def _torchvision():
    try:  # torchvision raises RuntimeError (not ImportError) beside a torch it was not built for
        import torchvision
    except Exception:  # noqa: BLE001
        return None
    return torchvision


@pytest.mark.slow
@pytest.mark.skipif(_torchvision() is None, reason="torchvision is not importable beside this torch build")
@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large",
                                  "lraspp_mobilenet_v3_large"])
def test_torchvision_segmentation_models_build_offline_and_fold(name):
    x = _images(2, 64)
    model = resolve_model({"name": f"torchvision:{name}", "output": "out"}, 4, example_input=x).eval()
    with torch.no_grad():
        want = model(x)
        assert want.shape == (2, 4, 64, 64)
        assert torch.allclose(fold_bn(model, x)(x), want, atol=1e-3, rtol=1e-3)
