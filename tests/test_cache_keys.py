"""A cache that cannot go stale (issue 24, item 2): everything that determines a cached model is
in its key: the data's file contents, the builder's source."""
import importlib
import os
import sys

import numpy as np
import pytest
from PIL import Image

from mergeq.data import FolderDataError, load_data
from mergeq.experiments import Config
from mergeq.experiments import pool as pool_module

from .test_data_spec import make_tree

NETS = '''
import mergeq.models


def make(num_classes=3):
    return mergeq.models.build_model("resnet8", num_classes, width=4)  # {comment}
'''


@pytest.fixture
def tree(tmp_path):
    """Two domains of uncompressed BMP images: changed pixels keep a file's size."""
    return make_tree(tmp_path / "data", domains={"A": "bmp", "B": "bmp"}, n=3)


def _config(tree, cache, **model):
    return Config.from_dict({
        "preset": "quick", "model": model or {"name": "resnet8", "kwargs": {"width": 4}},
        "data": {"kind": "folder", "root": str(tree), "source": "A", "targets": ["B"], "image_size": 16,
                 "normalize": "standardize"},
        "runtime": {"cache_dir": str(cache), "threads": 1}})


@pytest.fixture
def trainings(monkeypatch):
    """Source training replaced by a call list (the model comes back as built)."""
    calls = []

    def fake_train(model, data, cfg, seed, device, progress):
        calls.append(len(data))
        return model

    monkeypatch.setattr(pool_module, "train_source", fake_train)
    return calls


def test_changed_pixels_under_the_same_names_give_another_fingerprint_and_a_retrain(tree, tmp_path, trainings):
    """The issue's case: images swapped between class folders kept the fingerprint (names only),
    and the source model of the earlier images was reused."""
    cfg = _config(tree, tmp_path / "cache")
    before = load_data(cfg.to_dict()["data"]).spec
    pool_module.Pool(cfg).source
    pool_module.Pool(cfg).source
    assert len(trainings) == 1  # the same files: reused
    image = tree / "A" / "circle" / "000.bmp"
    st = image.stat()
    pixels = np.asarray(Image.open(image))
    Image.fromarray(255 - pixels).save(image)  # one image's pixels changed: same name, same size, same mtime
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    after = load_data(cfg.to_dict()["data"]).spec
    assert after["splits"]["A"]["fingerprint"] != before["splits"]["A"]["fingerprint"]
    assert after["splits"]["B"] == before["splits"]["B"]
    pool_module.Pool(cfg).source
    assert len(trainings) == 2  # retrained, not reused
    with pytest.raises(FolderDataError, match="the files of domain 'A' .* changed since the config was written"):
        load_data(before)  # a recorded config of the earlier contents is refused


def test_a_changed_builder_source_gives_another_cache_key(tree, tmp_path, monkeypatch, trainings):
    """The issue's case: a changed ``model.builder`` function (same shapes) reused cached weights."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "mq_cache_nets.py"
    keys = []
    for comment in ("first", "first", "second"):
        module.write_text(NETS.format(comment=comment))
        sys.modules.pop("mq_cache_nets", None)
        importlib.invalidate_caches()
        pool = pool_module.Pool(_config(tree, tmp_path / "cache", builder="mq_cache_nets:make"))
        pool.source
        keys.append(pool._source_key)
    sys.modules.pop("mq_cache_nets", None)
    assert keys[0] == keys[1] != keys[2] and len(trainings) == 2
    assert len(list((tmp_path / "cache").glob("source-*.safetensors"))) == 2
