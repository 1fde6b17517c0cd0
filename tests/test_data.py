"""The embedded digits benchmark: shapes, split sizes, disjoint roles, determinism, errors."""
import hashlib

import numpy as np
import pytest
import torch

from mergeq.data import TARGET_DOMAINS, load_benchmark, load_digits_benchmark, save_sample_grid
from mergeq.data.digits import split_indices


@pytest.fixture(scope="module")
def bench():
    return load_digits_benchmark(seed=0)


def test_shapes_labels_and_sizes(bench):
    assert set(bench.targets) == set(TARGET_DOMAINS) and len(TARGET_DOMAINS) >= 3
    assert bench.num_classes == 10
    for dom in [bench.source, *bench.targets.values()]:
        for split in (dom.train, dom.test):
            x, y = split.tensors
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
            assert y.dtype == torch.int64 and len(x) == len(y)
            assert set(y.unique().tolist()) == set(range(10))
            assert torch.isfinite(x).all()
        assert len(dom.test) >= 500
    assert len(bench.source.train) == 2000


def test_per_image_channel_standardisation(bench):
    x = bench.targets["mnistm"].test.tensors[0][:50]
    assert torch.allclose(x.mean(dim=(2, 3)), torch.zeros(50, 3), atol=1e-4)
    assert torch.allclose(x.std(dim=(2, 3)), torch.ones(50, 3), atol=1e-3)


def test_no_raw_image_in_two_roles():
    idx = split_indices(seed=0)
    for raw in ("mnist", "uci"):
        owners = {}
        for role, ix in idx.items():
            dataset = "uci" if role.startswith("uci/") else "mnist"
            if dataset != raw:
                continue
            assert len(np.unique(ix)) == len(ix)
            for i in ix.tolist():
                assert i not in owners, f"{raw} image {i} in {owners.get(i)} and {role}"
                owners[i] = role
    assert len([r for r in idx if not r.startswith("uci/")]) == 6
    assert sum(len(v) for k, v in idx.items() if not k.startswith("uci/")) == 5000
    assert sum(len(v) for k, v in idx.items() if k.startswith("uci/")) == 1797


def _hashes(x: torch.Tensor) -> set:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x}


def test_no_pixel_duplicates_across_splits():
    """Content check on the raw [0,1] images (targets are transformed, so reuse of a source
    MNIST image in a target is ruled out by the index test above)."""
    raw = load_digits_benchmark(seed=0, normalize=False)
    src = _hashes(raw.source.train.tensors[0]) | _hashes(raw.source.test.tensors[0])
    assert len(src) == 2500  # train and test share no image
    for name, dom in raw.targets.items():
        tr, te = _hashes(dom.train.tensors[0]), _hashes(dom.test.tensors[0])
        assert not tr & te and not (tr | te) & src, name


def test_deterministic_and_seed_dependent():
    a, b = load_digits_benchmark(seed=3), load_digits_benchmark(seed=3)
    c = load_digits_benchmark(seed=4, targets=["mnistm"])
    for name in TARGET_DOMAINS:
        assert torch.equal(a.targets[name].train.tensors[0], b.targets[name].train.tensors[0])
        assert torch.equal(a.targets[name].test.tensors[1], b.targets[name].test.tensors[1])
    assert torch.equal(a.source.train.tensors[0], b.source.train.tensors[0])
    assert not torch.equal(a.targets["mnistm"].test.tensors[0], c.targets["mnistm"].test.tensors[0])


def test_subset_of_targets_gives_same_domain_data(bench):
    only = load_digits_benchmark(seed=0, targets=["noisy"])
    assert list(only.targets) == ["noisy"]
    assert torch.equal(only.targets["noisy"].test.tensors[0], bench.targets["noisy"].test.tensors[0])


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="known: uci, mnistm, noisy"):
        load_digits_benchmark(targets=["svhn"])
    with pytest.raises(ValueError, match="known: digits"):
        load_benchmark("office-home")
    assert load_benchmark("digits", seed=0, targets=["uci"]).targets.keys() == {"uci"}


def test_sample_grid_png(bench, tmp_path):
    out = save_sample_grid(bench, tmp_path / "sub" / "grid.png", per_domain=4)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left behind


def test_source_swap_keeps_every_domain_and_split():
    base, swapped = load_benchmark("digits", seed=0), load_benchmark("digits-uci", seed=0)
    assert swapped.name == "digits-uci" and swapped.source.name == "uci"
    assert list(swapped.targets) == ["mnist", "mnistm", "noisy"]
    assert torch.equal(swapped.source.train.tensors[0], base.targets["uci"].train.tensors[0])
    assert torch.equal(swapped.targets["mnist"].test.tensors[1], base.source.test.tensors[1])
    assert torch.equal(swapped.targets["noisy"].test.tensors[0], base.targets["noisy"].test.tensors[0])
    with pytest.raises(ValueError, match="for source 'uci'"):
        load_benchmark("digits-uci", targets=["uci"])
    with pytest.raises(ValueError, match="unknown source domain"):
        load_digits_benchmark(source="svhn")
