"""Corruption streams (ImageNet-C corruptions in order, no reset), imbalance, cache, CIFAR-10-C loader."""
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from mergeq.data import corruptions as C
from mergeq.data.corruptions import (CORRUPTIONS, corrupt_images, corruption_stream, load_cifar10c, stream_batches,
                                     stream_order)

pytestmark = pytest.mark.usefixtures("one_thread")
FEW = ["gaussian_noise", "contrast", "pixelate"]


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 4


def test_names_are_the_standard_order():
    from imagecorruptions import get_corruption_names

    assert list(CORRUPTIONS) == get_corruption_names("common") and len(CORRUPTIONS) == 15


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "glass_blur"])
def test_every_corruption_runs_on_32x32(name):
    raw = C.to_uint8_hwc(_images(2)[0])
    out = corrupt_images(raw, name, 5, seed=0)
    assert out.shape == raw.shape and out.dtype == np.uint8
    assert not np.array_equal(out, raw)


@pytest.mark.slow  # numba compiles glass_blur's pixel shuffle (~3 s) on its first call in a process
def test_glass_blur_runs_on_32x32_and_is_seeded():
    raw = C.to_uint8_hwc(_images(2)[0])
    a, b = corrupt_images(raw, "glass_blur", 5, seed=0), corrupt_images(raw, "glass_blur", 5, seed=0)
    assert a.shape == raw.shape and np.array_equal(a, b)


def test_corruption_is_deterministic_and_leaves_numpy_state_alone():
    raw = C.to_uint8_hwc(_images(3)[0])
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = corrupt_images(raw, "gaussian_noise", 3, seed=1)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(a, corrupt_images(raw, "gaussian_noise", 3, seed=1))
    assert not np.array_equal(a, corrupt_images(raw, "gaussian_noise", 3, seed=2))
    assert not np.array_equal(a, corrupt_images(raw, "gaussian_noise", 5, seed=1))


def test_wrong_output_shape_names_the_corruption(monkeypatch):
    import imagecorruptions

    monkeypatch.setattr(imagecorruptions, "corrupt", lambda img, **kw: np.zeros((31, 32, 3), np.float64))
    with pytest.raises(RuntimeError, match="contrast"):
        corrupt_images(C.to_uint8_hwc(_images(1)[0]), "contrast", 1)


def test_float_output_is_clipped_not_wrapped(monkeypatch):
    import imagecorruptions

    monkeypatch.setattr(imagecorruptions, "corrupt", lambda img, **kw: np.full(img.shape, 300.7))
    out = corrupt_images(C.to_uint8_hwc(_images(1)[0]), "fog", 1)
    assert out.dtype == np.uint8 and (out == 255).all()


def test_stream_visits_domains_in_order_without_reset(tmp_path):
    x, y = _images()
    order = ["pixelate", "gaussian_noise", "contrast"]
    stream = corruption_stream(x, y, severity=2, order=order, seed=0, cache_dir=tmp_path)
    assert [n for n, _ in stream] == order
    for _, ds in stream:
        xs, ys = ds.tensors
        assert xs.shape == x.shape and sorted(ys.tolist()) == sorted(y.tolist())
        assert torch.allclose(xs.mean(dim=(2, 3)), torch.zeros(1), atol=1e-4)  # standardised
    seen = [d for d, _, _ in stream_batches(stream, batch_size=5)]
    # domain after domain: one contiguous block per domain, in the given order, batches never mix
    blocks = [d for i, d in enumerate(seen) if i == 0 or d != seen[i - 1]]
    assert blocks == order and len(seen) == 3 * 3  # 12 images -> batches of 5, 5, 2 per domain


def test_default_order_is_all_fifteen(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "corrupt_images", lambda raw, name, sev, seed=0: raw)  # cheap stand-in
    stream = corruption_stream(*_images(4), cache_dir=None)
    assert [n for n, _ in stream] == list(CORRUPTIONS)


def test_stream_is_cached_on_disk(tmp_path, monkeypatch):
    x, y = _images()
    a = corruption_stream(x, y, 5, FEW, seed=3, cache_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "corruptions").glob("*.npy"))
    assert len(files) == 3 and all("-s5-" in f for f in files)

    def boom(*a, **k):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(C, "corrupt_images", boom)
    b = corruption_stream(x, y, 5, FEW, seed=3, cache_dir=tmp_path)
    for (n1, d1), (n2, d2) in zip(a, b):
        assert n1 == n2 and torch.equal(d1.tensors[0], d2.tensors[0])
    with pytest.raises(AssertionError, match="cache"):  # another severity is another key
        corruption_stream(x, y, 4, FEW, seed=3, cache_dir=tmp_path)


def test_imbalanced_orders():
    y = torch.arange(200) % 10
    sorted_ = stream_order(y, "sorted", 0)
    assert torch.equal(y[sorted_], torch.sort(y).values)
    bal = stream_order(y, None, 0)
    assert sorted(bal.tolist()) == list(range(200))
    d = stream_order(y, "dirichlet", 0, alpha=0.1, slots=10)
    assert sorted(d.tolist()) == list(range(200))  # every image kept once
    # label shift: windows of 20 are dominated by few classes, unlike the shuffled stream
    share = lambda idx: np.mean([np.bincount(y[idx[i:i + 20]].numpy(), minlength=10).max() / 20  # noqa: E731
                                 for i in range(0, 200, 20)])
    assert share(d) > share(bal) + 0.2


def test_imbalanced_stream_keeps_images_and_labels(tmp_path):
    x, y = _images(16)
    stream = corruption_stream(x, y, 1, ["contrast"], imbalance="sorted", cache_dir=tmp_path)
    ys = stream[0][1].tensors[1]
    assert torch.equal(ys, torch.sort(y).values)


@pytest.mark.parametrize("kw, match", [
    ({"severity": 0}, "severity"), ({"severity": 6}, "severity"), ({"severity": 2.5}, "severity"),
    ({"order": ["gaussian_noise", "rain"]}, "rain"), ({"order": []}, "at least one"),
    ({"imbalance": "skewed"}, "imbalance"),
])
def test_bad_arguments(kw, match, tmp_path):
    x, y = _images(4)
    args = {"severity": 1, "order": ["contrast"], "cache_dir": tmp_path, **kw}
    with pytest.raises(ValueError, match=match):
        corruption_stream(x, y, **args)


def test_bad_images():
    x, y = _images(4)
    with pytest.raises(ValueError, match="non-empty"):
        corruption_stream(x[:0], y[:0], 1, ["contrast"], cache_dir=None)
    with pytest.raises(ValueError, match="one label each"):
        corruption_stream(x, y[:3], 1, ["contrast"], cache_dir=None)
    with pytest.raises(ValueError, match=">= 32"):
        corruption_stream(x[..., :16, :16], y, 1, ["contrast"], cache_dir=None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corruption_stream(x * 2 - 1, y, 1, ["contrast"], cache_dir=None)
    with pytest.raises(ValueError, match="batch_size"):
        list(stream_batches([("a", TensorDataset(x, y))], 0))


def _write_cifar10c(folder, names, per=4):
    folder.mkdir()
    for name in names:
        arr = np.zeros((5 * per, 32, 32, 3), np.uint8)
        for s in range(5):
            arr[s * per:(s + 1) * per] = np.arange(per)[:, None, None, None] * 10 + s + 1  # image k of severity s
        np.save(folder / f"{name}.npy", arr)
    np.save(folder / "labels.npy", np.tile(np.arange(per) % 10, 5).astype(np.int64))


def test_load_cifar10c(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    _write_cifar10c(folder, ["fog", "snow"])
    stream = load_cifar10c(folder, ["snow", "fog"], severity=3, normalize="none")
    assert [n for n, _ in stream] == ["snow", "fog"]
    x, y = stream[0][1].tensors
    assert x.shape == (4, 3, 32, 32) and sorted(y.tolist()) == [0, 1, 2, 3]
    # severity 3's slice, and each image still carries its own label after the shuffle
    assert [round(float(v) * 255) for v in x[:, 0, 0, 0]] == [10 * int(k) + 3 for k in y]
    s = load_cifar10c(folder, ["fog"], severity=1, n=2, imbalance="sorted")
    assert len(s[0][1]) == 2 and s[0][1].tensors[1].tolist() == [0, 1]


def test_load_cifar10c_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10c(tmp_path / "nope")
    folder = tmp_path / "c"
    _write_cifar10c(folder, ["fog"])
    with pytest.raises(FileNotFoundError, match="snow.npy"):
        load_cifar10c(folder, ["snow"])
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c(folder, ["fog"], severity=7)
    np.save(folder / "fog.npy", np.zeros((20, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="32 x 32 x 3"):
        load_cifar10c(folder, ["fog"])
    np.save(folder / "fog.npy", np.zeros((20, 32, 32, 3), np.uint8))
    np.save(folder / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(ValueError, match="labels"):
        load_cifar10c(folder, ["fog"])
