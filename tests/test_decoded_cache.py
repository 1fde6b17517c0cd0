"""Folder images decoded once (in worker processes), cached as 8-bit pixels, reused, and the same
numbers as the lazy path: a few dozen tiny PNG / JPEG files written here."""
import pytest
import torch

from mergeq.data import FolderImages, load_data, standardize
from mergeq.data import decoded as decoded_module
from mergeq.data.decoded import DecodedImages
from mergeq.data_utils import iter_batches, take

from .test_data_spec import _image, make_tree

DOMAINS = {"Art": "jpg", "Real_World": "png"}


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "office", DOMAINS, ("circle", "horizontal", "vertical"), 12)  # 36 per domain


def _spec(root, **kw):
    return {"kind": "folder", "root": str(root), "source": "Real_World", "targets": ["Art"], "image_size": 12,
            "resize": 14, **kw}


@pytest.mark.parametrize("normalize", ["standardize", "imagenet"])
def test_cached_splits_equal_the_lazy_ones(tree, tmp_path, normalize):
    lazy = load_data(_spec(tree, normalize=normalize))
    cached = load_data(_spec(tree, normalize=normalize), cache_dir=tmp_path / "cache")
    assert lazy.spec == cached.spec
    for a, b in [(lazy.source, cached.source), (lazy.targets["Art"], cached.targets["Art"])]:
        for split in ("train", "test"):
            x, y = getattr(a, split), getattr(b, split)
            assert isinstance(x, FolderImages) and isinstance(y, DecodedImages) and len(x) == len(y)
            idx = list(range(len(x)))[::-1]
            xa, ya = take(x, idx)
            xb, yb = take(y, idx)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert torch.equal(torch.cat(list(iter_batches(y, 5))), take(y, range(len(y)))[0])
            assert torch.equal(y[3][0], xb[len(y) - 4]) and y[3][1] == int(yb[len(y) - 4])


def test_decoded_once_in_workers_then_read_back_and_redone_when_a_file_changes(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    decode = decoded_module.decode
    monkeypatch.setattr(decoded_module, "decode", lambda *a, **k: calls.append(len(a[0])) or decode(*a, **k))
    first = load_data(_spec(tree, normalize="none"), cache_dir=cache)
    assert calls == [36, 36] and len(list((cache / "images").glob("*.safetensors"))) == 2
    again = load_data(_spec(tree, normalize="standardize", image_size=12), cache_dir=cache)  # another normalisation
    assert calls == [36, 36]  # pixels are stored before normalising: the same entries serve it
    assert torch.equal(take(again.source.test, [0])[0], standardize(take(first.source.test, [0])[0]))
    _image(1, 0, 0).save(tree / "Art" / "circle" / "000.jpg")  # edited in place: the fingerprint changes
    load_data(_spec(tree, normalize="none"), cache_dir=cache)
    assert calls == [36, 36, 36]  # only the changed domain is decoded again
    load_data(_spec(tree, normalize="none", image_size=10, resize=12), cache_dir=cache)
    assert calls == [36, 36, 36, 36, 36]  # another size: new entries


def test_parallel_decode_equals_one_process(tree):
    paths = sorted((tree / "Art").rglob("*.jpg"))
    assert len(paths) > decoded_module.CHUNK  # two chunks: two worker processes
    assert torch.equal(decoded_module.decode(paths, 14, 12, workers=2), decoded_module.decode(paths, 14, 12, workers=1))


def test_a_damaged_cache_entry_is_rebuilt(tree, tmp_path, caplog):
    cache = tmp_path / "cache"
    load_data(_spec(tree, normalize="none"), cache_dir=cache)
    entry = next((cache / "images").glob("folder-Art-*.safetensors"))
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0xFF
    entry.write_bytes(bytes(data))
    bench = load_data(_spec(tree, normalize="none"), cache_dir=cache)
    assert "rebuilding decoded images" in caplog.text and len(bench.targets["Art"].test) > 0
