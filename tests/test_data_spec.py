"""``data:`` specs: folder trees of real JPEG / PNG files written here, end to end through the library."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import mergeq
from mergeq.adapt import ShotConfig, SourceConfig, shot, train_source
from mergeq.data import FolderDataError, FolderImages, load_data, load_stream, save_sample_grid
from mergeq.errors import ConfigError

CLASSES = ("circle", "horizontal", "vertical")
DOMAINS = {"Art": "png", "Clipart": "jpg", "Product": "jpeg", "Real_World": "png"}
PER_CLASS = 8


def _image(cls: int, domain: int, i: int) -> Image.Image:
    """A class shape (disc, horizontal bars, vertical bars, ring, checkerboard) drawn in a domain's
    colours, size varying."""
    h, w = 20 + 3 * (i % 3), 18 + 4 * (i % 2)
    yy, xx = np.mgrid[:h, :w]
    r = np.sqrt((yy - h / 2) ** 2 + (xx - w / 2) ** 2)
    mask = [r < min(h, w) / 3, (yy // 3) % 2 == 0, (xx // 3) % 2 == 0, abs(r - min(h, w) / 3) < 2,
            (yy // 3 + xx // 3) % 2 == 0][cls]
    rng = np.random.default_rng([cls, domain, i])
    bg = np.array([40 * domain, 90, 200 - 40 * domain])
    fg = np.array([230, 220 - 50 * domain, 30 + 60 * domain])
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_tree(root: Path, domains=DOMAINS, classes=CLASSES, n=PER_CLASS) -> Path:
    for d, (dom, ext) in enumerate(domains.items()):
        for c, cls in enumerate(classes):
            folder = root / dom / cls
            folder.mkdir(parents=True)
            for i in range(n):
                _image(c, d, i).save(folder / f"{i:03d}.{ext}")
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "office")


def _spec(root, **kw):
    return {"kind": "folder", "root": str(root), "source": "Real_World", "targets": ["Art", "Clipart", "Product"],
            "image_size": 16, "normalize": "standardize", **kw}


def small_cnn(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def test_folder_spec_end_to_end(tree, one_thread):
    bench = load_data(_spec(tree), seed=0)
    assert bench.num_classes == 3 and list(bench.targets) == ["Art", "Clipart", "Product"]
    art = bench.targets["Art"]
    assert isinstance(art.train, FolderImages) and art.train.classes == sorted(CLASSES)
    x, y = art.test[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 3
    spec = bench.spec
    assert spec["root"] == str(tree.resolve()) and spec["resize"] == 18 and spec["classes"] == sorted(CLASSES)
    assert {d: (s["train"], s["test"]) for d, s in spec["splits"].items()} == {
        d: (3 * (PER_CLASS - 2), 6) for d in DOMAINS}  # round(8 * 0.2) = 2 test images per class

    # the whole quantize-then-merge chain on the lazy datasets: train, SHOT, PTQ, merge, evaluate
    torch.manual_seed(0)
    source = train_source(small_cnn(), bench.source.train,
                          SourceConfig(steps=20, batch_size=8, lr=0.05, rotate=0, scale=0, translate=0), seed=0)
    assert mergeq.evaluate(source, {"src": bench.source.test})["src"] >= 0.8
    experts = [shot(source, dom.train, ShotConfig(steps=1, batch_size=8), seed=0) for dom in bench.targets.values()]
    qexperts = [mergeq.quantize(e, "rtn", calib=dom.train, w_bits=8, a_bits=8, calib_size=16)
                for e, dom in zip(experts, bench.targets.values())]
    res = mergeq.evaluate(mergeq.merge(qexperts), {d: dom.test for d, dom in bench.targets.items()})
    assert set(res) == {"Art", "Clipart", "Product", "hmean"} and 0.0 <= res["hmean"] <= 1.0


def test_resolved_spec_reloads_the_same_splits_and_refuses_a_changed_folder(tree, tmp_path):
    a = load_data(_spec(tree), seed=0)
    b = load_data(a.spec, seed=0)
    assert b.spec == a.spec
    for d in a.targets:
        assert b.targets[d].train.paths == a.targets[d].train.paths
        assert b.targets[d].test.paths == a.targets[d].test.paths
    c = load_data(a.spec, seed=1)  # another seed: another split of the same files, which the spec accepts
    assert c.spec["splits"] == a.spec["splits"] and c.targets["Art"].test.paths != a.targets["Art"].test.paths
    _image(0, 0, 99).save(tree / "Art" / "circle" / "099.png")
    with pytest.raises(FolderDataError, match=r"data.splits.Art: the files of domain 'Art'.*changed"):
        load_data(a.spec, seed=0)
    with pytest.raises(FolderDataError, match="data.classes"):
        load_data({**a.spec, "classes": ["a", "b", "c"], "splits": None}, seed=0)
    grown = load_data({**a.spec, "splits": None}, seed=0).spec["splits"]["Art"]
    assert grown["train"] == a.spec["splits"]["Art"]["train"] + 1


def test_class_lists_must_match(tmp_path):
    root = make_tree(tmp_path / "d", {"Art": "png", "Real_World": "jpg"})
    (root / "Art" / "circle").rename(root / "Art" / "disc")
    with pytest.raises(FolderDataError, match=r"domain 'Art'.*missing \['circle'\], extra \['disc'\]"):
        load_data(_spec(root, targets=["Art"]))


def test_spec_errors_name_the_key(tree):
    with pytest.raises(ConfigError, match=r"^data\.imagesize: unknown key; known: root, kind"):
        load_data(_spec(tree, imagesize=32))
    with pytest.raises(ConfigError, match=r"^data\.image_size: expected int, got str '16'"):
        load_data(_spec(tree, image_size="16"))
    with pytest.raises(ConfigError, match=r"^data\.targets\[1\]: expected str, got int 3"):
        load_data(_spec(tree, targets=["Art", 3]))
    with pytest.raises(ConfigError, match=r"^data\.normalize: expected one of \['imagenet', 'inception', 'standardize', 'none'\]"):
        load_data(_spec(tree, normalize="zscore"))
    with pytest.raises(ConfigError, match=r"^data\.kind: expected one of \['digits', 'folder', 'office_home', 'streets', 'segmentation'\], got 'imagenet'"):
        load_data({"kind": "imagenet"})
    with pytest.raises(ConfigError, match=r"^data\.root: required key is missing"):
        load_data({"kind": "folder", "source": "Art"})
    with pytest.raises(ConfigError, match="in_memory"):
        load_data(_spec(tree, in_memory=True, augment=True))
    with pytest.raises(ConfigError, match="data.source"):
        load_data({"kind": "digits", "source": "svhn"})


def test_in_memory_normalisations_office_home_names_and_sample_grid(tree, tmp_path):
    lazy = load_data(_spec(tree, targets=["Art"]), seed=0)
    dense = load_data(_spec(tree, targets=["Art"], in_memory=True), seed=0)
    assert isinstance(dense.targets["Art"].test, TensorDataset)
    xs = torch.stack([lazy.targets["Art"].test[i][0] for i in range(len(lazy.targets["Art"].test))])
    assert torch.equal(dense.targets["Art"].test.tensors[0], xs)
    x = xs[0]
    torch.testing.assert_close(x.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)  # standardised per image
    raw = load_data(_spec(tree, targets=["Art"], normalize="none", image_size=8, resize=8)).targets["Art"].test[0][0]
    assert raw.shape == (3, 8, 8) and 0.0 <= raw.min() and raw.max() <= 1.0
    oh = load_data({"kind": "office_home", "root": str(tree), "source": "R", "targets": ["a", "Clipart"],
                    "image_size": 16})
    assert oh.spec["source"] == "Real_World" and oh.spec["targets"] == ["Art", "Clipart"]
    assert oh.name == "office_home" and oh.spec["normalize"] == "imagenet"
    assert save_sample_grid(lazy, tmp_path / "grid.png", per_domain=4).stat().st_size > 0


def test_augment_only_on_the_source_training_split(tree):
    bench = load_data(_spec(tree, augment=True), seed=0)
    assert bench.source.train.transform.augment and not bench.source.test.transform.augment
    assert not any(dom.train.transform.augment for dom in bench.targets.values())


def test_digits_spec_resolves_targets():
    bench = load_data({"kind": "digits", "source": "uci", "targets": ["mnist"]}, seed=0)
    assert bench.name == "digits-uci" and bench.spec == {"kind": "digits", "source": "uci", "targets": ["mnist"]}
    assert load_data({}).spec["targets"] == ["uci", "mnistm", "noisy"]


def test_cifar10c_stream_spec(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    for name in ("fog", "snow"):
        np.save(folder / f"{name}.npy", np.arange(5 * 6 * 32 * 32 * 3, dtype=np.int64).astype(np.uint8)
                .reshape(30, 32, 32, 3))
    np.save(folder / "labels.npy", np.arange(30, dtype=np.int64) % 10)
    stream, resolved = load_stream({"kind": "cifar10c", "root": str(folder), "corruptions": ["snow", "fog"],
                                    "severity": 2, "normalize": "none"}, seed=0)
    assert [n for n, _ in stream] == ["snow", "fog"] and len(stream[0][1]) == 6
    assert resolved["n"] == 6 and resolved["corruptions"] == ["snow", "fog"]
    assert resolved["root"] == str(folder.resolve())
    again, _ = load_stream(resolved, seed=0)
    assert all(torch.equal(a[1].tensors[0], b[1].tensors[0]) for a, b in zip(stream, again))
    with pytest.raises(ConfigError, match=r"^stream\.severity: expected int, got float 2\.5"):
        load_stream({"kind": "cifar10c", "root": str(folder), "severity": 2.5})
    with pytest.raises(ConfigError, match=r"^stream\.kind: expected one of \['cifar10c'\]"):
        load_stream({"kind": "folder", "root": str(folder)})
