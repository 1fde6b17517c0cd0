"""Image-folder benchmarks (Office-Home layout) on a tiny tree of PNGs written here."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from mergeq.data import (BENCHMARKS, FolderDataError, FolderImages, FolderNotFoundError, ImageTransform,
                         load_benchmark, load_folder_benchmark, load_office_home, materialize)
from mergeq.data.folder import IMAGENET_MEAN, IMAGENET_STD, office_home_domain, split_indices

CLASSES = ("dog", "Bike", "cat")  # sorted: Bike, cat, dog
DOMAINS = ("Art", "Clipart", "Real World")
PER_CLASS = 4
SMALL = {"resize": 10, "crop": 8}


def _colour(domain: int, cls: int, i: int) -> tuple[int, int, int]:
    return (40 * cls + 10, 60 * domain + 5, 50 * i + 20)


def make_tree(root: Path, domains=DOMAINS, classes=CLASSES, n=PER_CLASS) -> Path:
    """``root/<domain>/<class>/<i>.png``: solid colours, sizes alternating portrait / landscape."""
    for d, dom in enumerate(domains):
        for c, cls in enumerate(classes):
            folder = root / dom / cls
            folder.mkdir(parents=True)
            for i in range(n):
                size = (12, 16) if i % 2 else (17, 11)
                Image.new("RGB", size, _colour(d, c, i)).save(folder / f"{i}.png")
    (root / "Art" / "dog" / ".DS_Store").write_bytes(b"junk")  # hidden and non-image files are skipped
    (root / "Art" / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "office")


def _expected(colour) -> torch.Tensor:
    c = torch.tensor(colour, dtype=torch.float32) / 255
    return (c - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_shapes_labels_and_class_order(tree):
    bench = load_office_home(tree, source="Real World", targets=("Art", "Clipart"), seed=0, **SMALL)
    assert bench.name == "office_home" and bench.num_classes == 3
    assert bench.source.name == "Real_World" and list(bench.targets) == ["Art", "Clipart"]
    art = bench.targets["Art"]
    assert art.train.classes == ["Bike", "cat", "dog"]
    assert len(art.train) + len(art.test) == 3 * PER_CLASS
    x, y = art.test[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    for ds in (art.train, art.test):
        for i in range(len(ds)):
            x, y = ds[i]
            path = ds.paths[i]
            assert ds.classes[y] == path.parent.name  # label = index of the sorted class folder name
            cls = CLASSES.index(path.parent.name)
            expected = _expected(_colour(DOMAINS.index("Art"), cls, int(path.stem)))
            torch.testing.assert_close(x, expected[:, None, None].expand(3, 8, 8), atol=1e-5, rtol=0)


def test_split_disjoint_stratified_and_deterministic(tree):
    a = load_office_home(tree, source="Real_World", targets=["Art", "Clipart"], seed=0, test_fraction=0.25, **SMALL)
    b = load_office_home(tree, source="R", targets=["Clipart", "Art"], seed=0, test_fraction=0.25, **SMALL)
    c = load_office_home(tree, source="real_world", targets=["Art"], seed=1, test_fraction=0.25, **SMALL)
    for dom in (a.source, *a.targets.values()):
        train, test = set(dom.train.paths), set(dom.test.paths)
        assert not train & test and len(train | test) == 3 * PER_CLASS
        assert sorted(dom.test.labels.tolist()) == [0, 1, 2]  # one test image per class
        assert sorted(dom.train.labels.tolist()) == [0] * 3 + [1] * 3 + [2] * 3
    # a domain's split depends on the seed and its own name only, not on which others are loaded
    assert b.targets["Art"].train.paths == a.targets["Art"].train.paths
    assert b.targets["Clipart"].test.paths == a.targets["Clipart"].test.paths
    assert c.targets["Art"].train.paths != a.targets["Art"].train.paths


def test_split_indices_edge_cases():
    train, test = split_indices([0, 0, 1, 1, 1], 0.9, seed=0, domain="x")  # at least one train image per class
    assert sorted(np.concatenate([train, test]).tolist()) == [0, 1, 2, 3, 4] and len(train) == 2
    with pytest.raises(FolderDataError, match="at least 2"):
        split_indices([0, 1, 1], 0.5, seed=0, domain="x")
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices([0, 0], 1.0, seed=0, domain="x")


def test_registry_transductive_and_generic_folder(tree):
    assert {"office_home", "folder"} <= set(BENCHMARKS)
    bench = load_benchmark("office_home", seed=0, targets=["Clipart"], root=tree, source="Art",
                           transductive=True, **SMALL)
    clip = bench.targets["Clipart"]
    assert clip.train.paths == clip.test.paths and len(clip.test) == 3 * PER_CLASS
    assert len(bench.source.train) + len(bench.source.test) == 3 * PER_CLASS  # the source is still split
    generic = load_benchmark("folder", root=tree, source="Real World", **SMALL)
    assert generic.name == "folder" and list(generic.targets) == ["Art", "Clipart"]
    assert office_home_domain("Real World") == "Real_World" and office_home_domain("p") == "Product"


def test_errors(tmp_path, tree):
    with pytest.raises(FolderNotFoundError, match="does not exist"):
        load_office_home(tmp_path / "nowhere")
    with pytest.raises(FolderNotFoundError, match="needs root"):
        load_benchmark("office_home")
    with pytest.raises(FolderNotFoundError, match="Product"):
        load_office_home(tree, source="Art", targets=["Product"])
    with pytest.raises(ValueError, match="unknown Office-Home domain 'Sketch'"):
        load_office_home(tree, source="Sketch")
    with pytest.raises(ValueError, match="distinct"):
        load_office_home(tree, source="Art", targets=["Art"])
    (tree / "Clipart" / "cat").rename(tree / "Clipart" / "kitten")
    with pytest.raises(FolderDataError, match=r"'Clipart'.*missing \['cat'\], extra \['kitten'\]"):
        load_office_home(tree, source="Art", targets=["Clipart"])
    for p in (tree / "Art" / "cat").iterdir():
        p.unlink()
    with pytest.raises(FolderDataError, match=r"Art/cat holds no images"):
        load_office_home(tree, source="Real_World", targets=["Art"])


def test_corrupt_image_named(tree):
    bad = tree / "Art" / "cat" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    bench = load_office_home(tree, source="Real_World", targets=["Art"], transductive=True, **SMALL)
    ds = bench.targets["Art"].test
    with pytest.raises(FolderDataError, match=r"cannot read image .*Art/cat/2\.png"):
        ds[ds.paths.index(bad)]
    with pytest.raises(FolderDataError, match=r"Art/cat/2\.png"):
        load_office_home(tree, source="Real_World", targets=["Art"], verify=True, **SMALL)


def test_augment_and_with_transform(tree):
    bench = load_folder_benchmark(tree, source="Art", targets=["Clipart"], augment=True, **SMALL)
    ds = bench.source.train
    assert ds.transform.augment and not bench.source.test.transform.augment
    torch.manual_seed(0)
    first = torch.stack([ds[0][0] for _ in range(3)])
    torch.manual_seed(0)
    again = torch.stack([ds[0][0] for _ in range(3)])
    assert first.shape == (3, 3, 8, 8) and torch.equal(first, again)
    # a photo-like image (not solid): flips and crops change the pixels
    img = Image.fromarray(np.arange(20 * 14 * 3, dtype=np.uint8).reshape(20, 14, 3))
    t = ImageTransform(10, 8, augment=True)
    torch.manual_seed(0)
    outs = [t(img) for _ in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    plain = ds.with_transform(ImageTransform(**SMALL))
    assert isinstance(plain, FolderImages) and plain.paths == ds.paths and not plain.transform.augment
    with pytest.raises(ValueError, match="crop <= resize"):
        ImageTransform(resize=8, crop=10)


def test_eval_resize_centre_crop_geometry():
    """Shorter side to ``resize``, then the centre ``crop``: a left/right split image keeps its halves."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255  # right half white
    x = ImageTransform(10, 10)(Image.fromarray(arr))  # 20x40 -> 10x20 -> centre 10x10
    white, black = _expected((255, 255, 255)), _expected((0, 0, 0))
    torch.testing.assert_close(x[:, :, 0], black[:, None].expand(3, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, :, -1], white[:, None].expand(3, 10), atol=1e-5, rtol=0)


def test_works_with_quantize_evaluate_and_materialize(tree, one_thread):
    from mergeq.eval import evaluate
    from mergeq.ptq import quantize

    bench = load_office_home(tree, source="Real_World", targets=["Art", "Clipart"], **SMALL)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    q = quantize(model, "rtn", calib=bench.targets["Art"].train, calib_size=5, w_bits=8, a_bits=8)
    accs = evaluate(q, {d: t.test for d, t in bench.targets.items()})
    assert set(accs) == {"Art", "Clipart", "hmean"}
    dense = materialize(bench.targets["Art"].test)
    assert isinstance(dense, TensorDataset) and dense.tensors[0].shape == (len(bench.targets["Art"].test), 3, 8, 8)
    assert torch.equal(dense.tensors[1], bench.targets["Art"].test.labels)
