"""Segmentation source training and DACS: EMA, pseudo-weights, ClassMix, RCS, augmentations,
schedule, determinism and bad input, on a tiny conv net and a tiny synthetic data set."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from mergeq.adapt.seg_augment import (blur_kernel_size, class_mix, class_mix_masks, color_jitter,
                                      flip_scale_crop, gaussian_blur, hue_matrix)
from mergeq.adapt.segmentation import (DACSConfig, SegSourceConfig, _RareClassSampler, class_pixel_counts, dacs,
                                       ema_alpha, ema_update, param_groups, pseudo_labels, rcs_class_probs,
                                       seg_cross_entropy, train_seg_source, warmup_poly_lr)
from mergeq.errors import ConfigError, MergeqError, ModelError

from .logical_device import LogicalCuda

pytestmark = pytest.mark.usefixtures("one_thread")


def _scenes(n, seed, shift=0.0, size=16):
    """Two stuff bands (0, 1), one 5x5 thing (2 or 3) per image, a 255 row at the band border."""
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, size, size, dtype=torch.long)
    y[:, size // 2:] = 1
    for i in range(n):
        r, c = torch.randint(0, size - 5, (2,), generator=g).tolist()
        y[i, r:r + 5, c:c + 5] = 2 + i % 2
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]) + shift
    x = colours[y].permute(0, 3, 1, 2) + 0.3 * torch.randn(n, 3, size, size, generator=g)
    y[:, size // 2 - 1] = 255
    return TensorDataset(x, y)


class _Tiny(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.2))
        self.decode_head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return self.decode_head(self.body(x))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return train_seg_source(_Tiny(), _scenes(32, 0), SegSourceConfig(steps=6, batch_size=8, lr=1e-2), seed=0)


def test_warmup_poly_schedule_values():
    # mmcv: poly lr base*(1 - t/T), times 1 - (1 - t/w)(1 - 1e-6) while t < w
    assert warmup_poly_lr(1.0, 0, 100, 10) == pytest.approx(1e-6)
    assert warmup_poly_lr(1.0, 5, 100, 10) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert warmup_poly_lr(1.0, 10, 100, 10) == pytest.approx(0.9)
    assert warmup_poly_lr(2.0, 50, 100, 0) == pytest.approx(1.0)
    assert warmup_poly_lr(1.0, 99, 100, 10) == pytest.approx(0.01)
    assert warmup_poly_lr(1.0, 40, 100, 0, power=2.0) == pytest.approx(0.36)


def test_head_lr_multiplier_and_missing_head():
    groups = param_groups(_Tiny(), "decode_head", 10.0)
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    assert len(groups[1]["params"]) == 2 and len(groups[0]["params"]) == 6  # head conv w+b; 2 convs + BN
    with pytest.raises(ConfigError, match="head_prefix.*'decoder'.*body, decode_head"):
        param_groups(_Tiny(), "decoder", 10.0)
    assert len(param_groups(_Tiny(), "decoder", 1.0)[1]["params"]) == 0


def test_ema_update_is_the_formula():
    torch.manual_seed(0)
    teacher, student = _Tiny(), _Tiny()
    t0, s0 = _state(teacher), _state(student)
    assert ema_alpha(0, 0.99) == 0.0 and ema_alpha(1, 0.99) == 0.5 and ema_alpha(3, 0.99) == 0.75
    assert ema_alpha(10_000, 0.99) == 0.99
    ema_update(teacher, student, 3, 0.99)
    names = dict(teacher.named_parameters())
    for k in t0:
        if k in names:
            assert torch.equal(names[k], 0.75 * t0[k] + 0.25 * s0[k])
        else:  # buffers untouched by default (DAFormer averages parameters only)
            assert torch.equal(teacher.state_dict()[k], t0[k])
    student.body[1].running_mean.fill_(2.0)
    ema_update(teacher, student, 10_000, 0.9, buffers=True)
    assert torch.allclose(teacher.body[1].running_mean, 0.9 * t0["body.1.running_mean"] + 0.2)
    assert torch.equal(teacher.body[1].num_batches_tracked, student.body[1].num_batches_tracked)


def test_pseudo_weight_is_the_share_of_confident_pixels():
    # image 0: probs [0.99, 0.01] on 3 of 4 pixels, [0.4, 0.6] on one; image 1: all [0.5, 0.5]
    p = torch.tensor([[[0.99, 0.99], [0.99, 0.4]], [[0.5, 0.5], [0.5, 0.5]]])
    logits = torch.stack([p.log(), (1 - p).log()], dim=1)
    label, weight = pseudo_labels(logits, 0.968)
    assert torch.equal(label, torch.tensor([[[0, 0], [0, 1]], [[0, 0], [0, 0]]]))
    assert torch.allclose(weight, torch.tensor([0.75, 0.0]))
    assert torch.allclose(pseudo_labels(logits, 0.968, per="batch")[1], torch.tensor([0.375, 0.375]))
    assert torch.allclose(pseudo_labels(logits, 0.5)[1], torch.tensor([1.0, 1.0]))  # ">=" threshold


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_cls=st.integers(1, 7), ignore=st.booleans())
def test_class_mix_pastes_half_the_present_classes(seed, n_cls, ignore):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n_cls, (2, 6, 6), generator=g)
    if ignore:
        src[:, 0] = 255
    masks = class_mix_masks(src, g)
    pseudo = torch.randint(0, n_cls, (2, 6, 6), generator=g)
    xs, xt = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)
    img, label, weight = class_mix(masks, xs, src, xt, pseudo, torch.tensor([0.3, 0.7]))
    for i in range(2):
        present = set(src[i][src[i] != 255].tolist())
        chosen = set(src[i][masks[i]].tolist())
        assert chosen <= present and len(chosen) == math.ceil(len(present) / 2)
        assert torch.equal(masks[i], torch.isin(src[i], torch.tensor(sorted(chosen), dtype=torch.long)))
        m = masks[i]
        assert torch.equal(label[i][m], src[i][m]) and torch.equal(label[i][~m], pseudo[i][~m])
        assert torch.equal(img[i][:, m], xs[i][:, m]) and torch.equal(img[i][:, ~m], xt[i][:, ~m])
        assert (weight[i][m] == 1).all() and (weight[i][~m] == (0.3, 0.7)[i]).all()


def test_rcs_probabilities_follow_the_formula():
    labels = torch.full((3, 4, 5), 255)
    labels[0, :2] = 0  # class 0: 10 px in image 0, class 2: 2 px in image 1, class 3: 8 px in image 2
    labels[1, 0, :2] = 2
    labels[2, :2, :4] = 3
    counts = class_pixel_counts(labels)
    assert counts.tolist() == [[10, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 8]]
    classes, probs = rcs_class_probs(counts.sum(0), 0.5)
    f = torch.tensor([10, 2, 8], dtype=torch.float64) / 20
    assert classes.tolist() == [0, 2, 3]
    assert torch.allclose(probs, torch.softmax((1 - f) / 0.5, dim=0))
    assert torch.allclose(rcs_class_probs(counts.sum(0), 0.01)[1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    sampler = _RareClassSampler(counts, 1.0, min_pixels=4)  # class 2 (2 px) left out: no image has > 4
    p = torch.softmax(1 - f, dim=0)[[0, 2]]
    assert sampler.classes.tolist() == [0, 3] and torch.allclose(sampler.probs, p / p.sum())
    assert set(sampler.draw(50, torch.Generator().manual_seed(0)).tolist()) == {0, 2}  # the images of 0 and 3


def test_blur_and_jitter_keep_shape_and_are_identity_at_p0():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 20, 24, generator=g)
    assert color_jitter(x, g, 0.2, p=0.0) is x and gaussian_blur(x, g, p=0.0) is x
    j, b = color_jitter(x, g, 0.2, p=1.0), gaussian_blur(x, g, p=1.0)
    assert j.shape == x.shape and b.shape == x.shape
    assert not torch.allclose(j, x) and not torch.allclose(b, x)
    flat = torch.full((2, 3, 20, 24), 0.7)
    assert torch.allclose(gaussian_blur(flat, g, p=1.0), flat)  # the kernel sums to one
    assert [blur_kernel_size(s) for s in (8, 32, 64, 512, 1024)] == [1, 3, 7, 51, 103]
    z = torch.rand(2, 3, 5, 5, generator=g) * 0.5 + 0.25  # inside [0, 1] after denormalising: no clamp
    assert torch.allclose(color_jitter(z, g, 0.0, p=1.0, mean=(0, 0, 0), std=(1, 1, 1)), z, atol=1e-6)


def test_hue_rotation_keeps_grey_and_cycles_channels():
    assert torch.allclose(hue_matrix(0.0), torch.eye(3, dtype=torch.float64))
    assert torch.allclose(hue_matrix(0.3) @ torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    red = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    assert torch.allclose(hue_matrix(1 / 3) @ red, torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12)


def test_flip_scale_crop_moves_image_and_label_together():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (6, 8, 10), generator=g)
    x = y[:, None].float().expand(6, 3, 8, 10).contiguous()
    fx, fy = flip_scale_crop(x, y, g, flip=True, scale=(1.0, 1.0))
    assert torch.equal(fx[:, 0].long(), fy)
    assert any(not torch.equal(fy[i], y[i]) for i in range(6))  # some were flipped
    zx, zy = flip_scale_crop(x, y, g, flip=False, scale=(2.0, 2.0))  # 2x zoom: each label pixel a 2x2 block
    assert zx.shape == x.shape and zy.shape == y.shape and zy.dtype == y.dtype
    up_y = y.repeat_interleave(2, 1).repeat_interleave(2, 2)
    up_x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    for i in range(6):  # one crop offset of the 2x zoom gives both the image and the label
        offsets = [(t, u) for t in range(9) for u in range(11) if torch.equal(up_y[i, t:t + 8, u:u + 10], zy[i])
                   and torch.equal(up_x[i, :, t:t + 8, u:u + 10], zx[i])]
        assert offsets


def test_seg_cross_entropy_counts_ignored_pixels_in_the_mean():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = 255
    ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="sum") / labels.numel()
    assert torch.allclose(seg_cross_entropy(logits, labels), ce)
    w = torch.tensor([0.5, 2.0])[:, None, None]
    per = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert torch.allclose(seg_cross_entropy(logits, labels, w), (per * w).mean())
    with pytest.raises(MergeqError, match=r"class ids in \[0, 3\)"):
        seg_cross_entropy(logits, torch.full((2, 4, 4), 5))
    with pytest.raises(ModelError, match="at the label size"):
        seg_cross_entropy(torch.randn(2, 3, 2, 2), labels)


def test_source_training_learns_copies_and_is_deterministic():
    torch.manual_seed(0)
    init = _Tiny()
    before = _state(init)
    cfg = SegSourceConfig(steps=5, batch_size=8, lr=1e-2, scale=(1.0, 1.5))
    torch.manual_seed(5)
    a = train_seg_source(init, _scenes(24, 0), cfg, seed=1)
    torch.manual_seed(6)
    b = train_seg_source(init, _scenes(24, 0), cfg, seed=1)
    assert _equal(_state(init), before) and _equal(_state(a), _state(b)) and not a.training
    assert not _equal(_state(a), _state(train_seg_source(init, _scenes(24, 0), cfg, seed=2)))


def test_dacs_is_bit_deterministic_and_leaves_the_source_untouched(source):
    before = _state(source)
    cfg = DACSConfig(steps=4, batch_size=4, lr=1e-2, pseudo_threshold=0.5, jitter_p=1.0, blur_p=1.0)
    src, tgt = _scenes(16, 0), _scenes(12, 1, shift=0.5)
    torch.manual_seed(11)
    a = dacs(source, src, tgt, cfg, seed=3)
    torch.manual_seed(12)
    rng = torch.get_rng_state()
    b = dacs(source, src, tgt, cfg, seed=3)  # dropout draws from a global generator seeded by ``seed``
    assert torch.equal(torch.get_rng_state(), rng)  # ... and the caller's is left as it was
    assert _equal(_state(a), _state(b)) and not a.training
    assert _equal(_state(source), before) and not _equal(_state(a), before)
    assert not _equal(_state(a), _state(dacs(source, src, tgt, cfg, seed=4)))
    c = dacs(source, src, tgt, DACSConfig(steps=2, batch_size=4, teacher_bn="running", rcs_temperature=None), seed=0)
    assert all(p.requires_grad for p in c.parameters())


def test_bad_input_raises_one_line_errors(source):
    images = TensorDataset(torch.randn(8, 3, 16, 16))
    empty = TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, 16, 16, dtype=torch.long))
    cfg = DACSConfig(steps=1, batch_size=4)
    for call, match in (
        (lambda: train_seg_source(_Tiny(), empty, SegSourceConfig(steps=1)), "non-empty labelled source"),
        (lambda: train_seg_source(_Tiny(), images, SegSourceConfig(steps=1)), "needs labelled data"),
        (lambda: dacs(source, images, _scenes(8, 1), cfg), "needs labelled data"),
        (lambda: dacs(source, _scenes(8, 0), empty, cfg), "0 target images"),
        (lambda: dacs(source, _scenes(8, 0), _scenes(8, 1), DACSConfig(pseudo_threshold=1.5)), "pseudo_threshold"),
        (lambda: dacs(source, _scenes(8, 0), _scenes(8, 1), DACSConfig(teacher_bn="eval")), "teacher_bn"),
        (lambda: train_seg_source(_Tiny(), _scenes(8, 0), SegSourceConfig(scale=(1.5, 1.0))), "scale"),
    ):
        with pytest.raises(MergeqError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_source_training_and_dacs_on_a_logical_gpu_match_the_cpu(source):
    """Every tensor of both loops lands on the model's device (a CPU tensor meeting a CUDA one
    raises under LogicalCuda); the draws come from the CPU generator, so the result is the CPU's."""
    src, tgt = _scenes(16, 0), _scenes(12, 1, shift=0.5)
    s_cfg = SegSourceConfig(steps=2, batch_size=4, scale=(1.0, 1.5))
    d_cfg = DACSConfig(steps=3, batch_size=4, pseudo_threshold=0.5, jitter_p=1.0, blur_p=1.0, scale=(1.0, 1.5))
    init = _Tiny()
    cpu = [train_seg_source(init, src, s_cfg, seed=0), dacs(source, src, tgt, d_cfg, seed=0)]
    with LogicalCuda():
        gpu = [train_seg_source(init, src, s_cfg, seed=0, device="cuda"),
               dacs(source, src, tgt, d_cfg, seed=0, device="cuda")]
        assert all(p.is_cuda for m in gpu for p in m.parameters())
    for a, b in zip(cpu, gpu):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(x, y.cpu(), atol=1e-6), name
