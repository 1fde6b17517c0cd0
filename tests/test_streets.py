"""The embedded streets segmentation benchmark: labels follow the composition, splits, determinism, cache."""
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from mergeq.data import streets
from mergeq.data import streets_scene as scene
from mergeq.data.digits import _mnist_raw, _uci_raw
from mergeq.errors import ConfigError, MergeqError
from mergeq.io import load_checkpoint

SMALL = {"synthetic": (12, 30), "city": (12, 30), "india": (12, 30)}  # (train, test) images


def _small(seed=0, **kw):
    with pytest.MonkeyPatch.context() as mp:
        for dom, sizes in SMALL.items():
            mp.setitem(streets.SPLITS, dom, sizes)
        return streets.load_streets_benchmark(seed=seed, **kw)


def _tensors(bench):
    return [t for dom in [bench.source, *bench.targets.values()] for s in (dom.train, dom.test) for t in s.tensors]


@pytest.fixture(scope="module")
def bench():
    return _small(seed=0)


def test_benchmark_shape_spec_and_labels(bench):
    assert bench.name == "streets" and bench.num_classes == streets.NUM_CLASSES == len(streets.CLASSES) == 8
    assert bench.spec == {"task": "segmentation", "classes": list(streets.CLASSES), "benchmark": "streets"}
    assert list(bench.targets) == ["city", "india"] and bench.source.name == "synthetic"
    h, w = streets.IMAGE_SIZE
    for dom in [bench.source, *bench.targets.values()]:
        for split, n in zip((dom.train, dom.test), SMALL[dom.name]):
            x, y = split.tensors
            assert x.shape == (n, 3, h, w) and x.dtype == torch.float32 and torch.isfinite(x).all()
            assert y.shape == (n, h, w) and y.dtype == torch.int64
            assert set(y.unique().tolist()) <= set(range(8)) | {255}
            # per-image, per-channel standardisation (mergeq.data.digits.standardize)
            assert torch.allclose(x.mean(dim=(2, 3)), torch.zeros(n, 3), atol=1e-4)
        assert set(dom.test.tensors[1].unique().tolist()) == set(range(8)) | {255}  # every class in every test split


def test_ignored_pixels_lie_on_boundaries(bench):
    for dom in [bench.source, *bench.targets.values()]:
        y = dom.test.tensors[1]
        ignored = y == 255
        assert 0.01 < ignored.float().mean() < 0.1, dom.name
        labelled_near = F.max_pool2d((~ignored).float()[:, None], 7, 1, 3)[:, 0] > 0
        assert not (ignored & ~labelled_near).any(), dom.name
        classes_near = F.max_pool2d(torch.stack([(y == c).float() for c in range(8)], 1), 5, 1, 2).sum(1)
        assert ((classes_near >= 2) & ignored).sum() >= 0.95 * ignored.sum(), dom.name  # between two classes


def _one_domain(dom, seed, cache_dir=None):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(streets.SPLITS, dom, SMALL[dom])
        return streets._cached_build(dom, seed, cache_dir)


def test_deterministic_bit_for_bit_independent_of_other_domains_and_seed_dependent(bench):
    """The fixture built all three domains; building one alone gives the same bits."""
    india = bench.targets["india"]
    alone = _one_domain("india", seed=0)
    assert torch.equal(alone["test_labels"].long(), india.test.tensors[1])
    assert torch.equal(alone["train_labels"].long(), india.train.tensors[1])
    assert torch.equal(streets.standardize(alone["test_images"].float() / 255), india.test.tensors[0])
    assert torch.equal(streets.standardize(alone["train_images"].float() / 255), india.train.tensors[0])
    other = _one_domain("india", seed=1)
    assert not torch.equal(other["test_labels"].long(), india.test.tensors[1])
    assert not torch.equal(other["train_images"], alone["train_images"])


def test_targets_differ_from_the_source_in_pixel_statistics(bench):
    def roughness(dom):  # mean absolute horizontal gradient of the standardised images
        x = dom.test.tensors[0]
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    src = roughness(bench.source)
    assert roughness(bench.targets["city"]) < 0.7 * src  # blurred camera
    assert roughness(bench.targets["india"]) > 1.3 * src  # sensor noise


def test_digits_never_in_two_roles():
    idx = streets.split_digits(seed=0)
    mnist = [idx[f"{d}/{s}"] for d in ("synthetic", "city") for s in ("train", "test")]
    uci = [idx[f"india/{s}"] for s in ("train", "test")]
    for group, size in ((mnist, len(_mnist_raw()[1])), (uci, len(_uci_raw()[1]))):
        flat = np.concatenate(group)
        assert len(np.unique(flat)) == len(flat) and flat.min() >= 0 and flat.max() < size
    for dom, (n_train, n_test) in streets.SPLITS.items():
        assert len(idx[f"{dom}/train"]) == streets.thing_counts(n_train).sum()
        assert len(idx[f"{dom}/test"]) == streets.thing_counts(n_test).sum()
    assert set(_mnist_raw()[1][np.concatenate(mnist[:2])]) == set(range(10))  # both halves stratified
    assert not np.array_equal(idx["city/test"], streets.split_digits(seed=1)["city/test"])


def test_too_many_images_for_the_digits_is_refused(monkeypatch):
    monkeypatch.setitem(streets.SPLITS, "india", (900, 900))
    with pytest.raises(MergeqError, match="india.*need 3600 digits"):
        streets.split_digits(0)


def test_missing_class_in_a_test_split_is_refused():
    y = torch.zeros(2, 4, 4, dtype=torch.uint8)
    y[0, 0, :] = torch.tensor([1, 2, 3, 255], dtype=torch.uint8)
    with pytest.raises(MergeqError, match=r"streets/city test split lacks class\(es\) \['terrain', 'sky'"):
        streets._check_classes("city", "test", y)


def test_bad_domains_are_refused():
    with pytest.raises(ConfigError, match="unknown streets source domain 'gta'"):
        streets.load_streets_benchmark(source="gta")
    with pytest.raises(ConfigError, match=r"target domain\(s\) \['synthetic'\]"):
        streets.load_streets_benchmark(targets=["synthetic"])


def test_a_missing_package_file_names_what_to_install():
    with pytest.raises(ImportError, match="streets benchmark reads data/none.png .* pip install scikit-image"):
        scene._package_file("skimage", "scikit-image", "data", "none.png")


def test_labels_from_coverage_take_the_class_covering_three_quarters():
    cov = torch.zeros(1, scene.NUM_STUFF, 1, 4)
    cov[0, scene.SKY, 0] = torch.tensor([1.0, 0.75, 0.7, 0.5])
    cov[0, scene.BUILDING, 0] = 1 - cov[0, scene.SKY, 0]
    assert scene.labels_from_coverage(cov).tolist() == [[[scene.SKY, scene.SKY, 255, 255]]]


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 31 - 1))
def test_layout_sub_samples_partition_every_pixel(seed):
    g = torch.Generator().manual_seed(seed)
    p = scene.layout(3, g, (16, 24))
    cov = scene.coverage(scene.stuff_labels(p, (16, 24)))
    assert cov.shape == (3, scene.NUM_STUFF, 16, 24)
    assert torch.allclose(cov.sum(1), torch.ones(3, 16, 24))
    lab = scene.labels_from_coverage(cov)
    assert ((lab == 255) == (cov.max(1).values < scene.CERTAIN)).all()
    assert (lab[:, -1] != scene.SKY).all() and (lab[:, 0] != scene.ROAD).all()  # the sky is above the road


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.integers(0, 4999))
def test_things_label_follows_their_alpha(seed, digit_index):
    """A white thing on a black image: the pixel value is the alpha, so the label rule is checkable."""
    g = torch.Generator().manual_seed(seed)
    raw, digit = _mnist_raw()[0][digit_index], int(_mnist_raw()[1][digit_index])
    x, y = torch.zeros(1, 3, 32, 32), torch.full((1, 32, 32), scene.ROAD, dtype=torch.uint8)
    scene.add_things(x, y, torch.tensor([8.0]), [1], [scene.glyph_box(raw)], [digit],
                     lambda g, h, w: torch.ones(3, h, w), g)
    a = x[0, 0]
    assert torch.equal(x[0, 0], x[0, 2])
    cls = scene.PERSON if digit <= 4 else scene.CAR
    assert (y[0][a >= scene.CERTAIN] == cls).all() and (a >= scene.CERTAIN).any()
    assert (y[0][(a > scene.UNCERTAIN) & (a < scene.CERTAIN)] == 255).all()
    assert (y[0][a <= scene.UNCERTAIN] == scene.ROAD).all()
    assert (a > 0).any(dim=1).nonzero().max() >= 10  # its foot is at least 3 px below the horizon


def test_cache_is_reused_and_a_corrupt_entry_rebuilt(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(streets.SPLITS, "india", SMALL["india"])
    first = streets._cached_build("india", 0, tmp_path)
    (entry,) = (tmp_path / "streets").glob("*.safetensors")
    assert entry.name == f"india-{streets.cache_key('india', 0)}.safetensors"
    real_build = streets._build
    monkeypatch.setattr(streets, "_build", lambda *a: pytest.fail("rebuilt although cached"))
    cached = streets._cached_build("india", 0, tmp_path)
    assert all(torch.equal(first[k], cached[k]) for k in first) and set(first) == set(cached)
    data = bytearray(entry.read_bytes())
    data[-100:] = bytes(100)  # damage the pixels
    entry.write_bytes(bytes(data))
    monkeypatch.setattr(streets, "_build", real_build)
    with caplog.at_level(logging.WARNING, logger="mergeq.data.streets"):
        rebuilt = streets._cached_build("india", 0, tmp_path)
    assert "rebuilding streets cache entry" in caplog.text and "SHA-256" in caplog.text
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    assert load_checkpoint(entry)[1]["key"] == streets.cache_key("india", 0)  # the entry was rewritten whole
    keys = {streets.cache_key(d, s) for d in streets.DOMAINS for s in (0, 1)}
    assert len(keys) == 6  # domain and seed are in the key


def test_scene_grid_is_a_png(bench, tmp_path):
    path = streets.save_scene_grid(bench, tmp_path / "grid.png", per_domain=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the full build renders 3,000 images (~30 s on 2 cores)
def test_default_build_sizes_and_classes():
    bench = streets.load_streets_benchmark(seed=0)
    for dom in [bench.source, *bench.targets.values()]:
        assert (len(dom.train), len(dom.test)) == streets.SPLITS[dom.name]
        assert set(dom.test.tensors[1].unique().tolist()) == set(range(8)) | {255}
