"""Segmentation through the whole pipeline: real layouts by path as a config's data, the task
switch (model, adaptation, metric, report), a run with its Table-1 report and strips, the steps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergeq.data.spec import load_data, task_of
from mergeq.errors import ConfigError
from mergeq.eval import evaluate, score
from mergeq.eval.strips import decode, encode, palette
from mergeq.experiments.config import Config, resolve
from mergeq.experiments.run import run

H, W = 24, 32


def _scene(rng: np.random.Generator, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """A road/building/sky image (3 bands at random heights) and its Cityscapes train ids."""
    a, b = sorted(rng.integers(4, H - 4, size=2))
    label = np.full((H, W), 0, np.uint8)  # road
    label[:a], label[a:b] = 10, 2  # sky, building
    colours = {0: (90, 90, 90), 2: (150, 60, 40), 10: (90, 150, 230)}
    img = np.stack([np.array(colours[int(c)]) for c in label.ravel()]).reshape(H, W, 3).astype(np.float64)
    img = np.clip(img * shift + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    label[a, :] = 255  # a boundary row: ignored
    return img, label


def _pair_tree(root: Path, n: int, seed: int, shift: float) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(n):
        img, lab = _scene(rng, shift)
        Image.fromarray(img).save(images / f"{i:03d}.png")
        Image.fromarray(lab, mode="L").save(labels / f"{i:03d}.png")
    return images, labels


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("seg")
    domains = {}
    for k, (name, shift) in enumerate((("src", 1.0), ("dark", 0.6), ("bright", 1.3))):
        images, labels = _pair_tree(root / name, 16, k, shift)
        domains[name] = {"dataset": "pair", "images": str(images), "labels": str(labels)}
    return {"kind": "segmentation", "source": "src", "domains": domains}


def _tiny(seg_data: dict, tmp_path: Path, **extra) -> Config:
    return Config.from_dict({
        "preset": "quick", "data": seg_data, "model": {"name": "deeplab_mini", "kwargs": {"width": 8}},
        "adapt": {"seg_source": {"steps": 3, "batch_size": 4}, "dacs": {"steps": 2, "batch_size": 4}},
        "ptq": {"methods": ["rtn", "hdrq"], "bits": ["W4A4"], "calib_size": 8,
                "options": {"hdrq": {"iters": 2, "batch_size": 4}}},
        "runtime": {"cache_dir": str(tmp_path / "cache"), "threads": 1}, **extra})


def test_real_layout_by_path_is_a_segmentation_benchmark(seg_data):
    bench = load_data(seg_data, seed=0)
    assert task_of(bench.spec) == "segmentation" and bench.classes[0] == "road" and len(bench.classes) == 19
    assert list(bench.targets) == ["dark", "bright"]
    x, y = bench.targets["dark"].test[0]
    assert x.shape == (3, H, W) and y.shape == (H, W) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= {0, 2, 10, 255}
    assert Path(bench.spec["domains"]["src"]["images"]).is_absolute()


def test_bad_segmentation_specs_are_one_line_errors(seg_data):
    with pytest.raises(ConfigError, match="data.source: 'nope' is not one of data.domains"):
        Config.from_dict({"data": {**seg_data, "source": "nope"}})
    with pytest.raises(ConfigError, match=r"data.targets: \['src'\]"):
        Config.from_dict({"data": {**seg_data, "targets": ["src"]}})
    with pytest.raises(ConfigError, match=r"data.size: expected \[H, W\]"):
        Config.from_dict({"data": {**seg_data, "size": [8]}})


def test_segmentation_data_pick_model_and_adaptation(seg_data):
    cfg = resolve(Config.from_dict({"data": seg_data}))
    assert cfg.model.name == "deeplab_mini"
    assert cfg.adapt.dacs is not None and cfg.adapt.seg_source is not None
    assert cfg.adapt.shot is None and cfg.adapt.source is None
    digits = resolve(Config())
    assert digits.model.name == "resnet8" and digits.adapt.dacs is None and digits.adapt.shot is not None


def test_score_and_evaluate_are_miou_for_per_pixel_labels(seg_data):
    bench = load_data(seg_data, seed=0)
    test = bench.targets["dark"].test

    class Oracle(torch.nn.Module):  # predicts the label (ignore pixels as road)
        def forward(self, x):
            y = torch.stack([test[i][1] for i in range(len(x))]).clamp_max(18)
            return torch.nn.functional.one_hot(y, 19).permute(0, 3, 1, 2).float()

    full = {"dark": torch.utils.data.Subset(test, range(4))}
    assert score(Oracle(), full["dark"], batch_size=4) == pytest.approx(1.0)
    result = evaluate(Oracle(), full, batch_size=4)
    assert result["dark"] == pytest.approx(1.0) and result["hmean"] == pytest.approx(1.0)
    iou = result["iou"]["dark"]
    assert iou[0] == pytest.approx(1.0) and iou[1] is None  # sidewalk never occurs: left out


def test_strip_arrays_round_trip_and_palette_follows_class_names():
    a = np.random.default_rng(0).integers(0, 256, (2, 5, 7), dtype=np.uint8)
    assert np.array_equal(decode(json.loads(json.dumps(encode(a)))), a)
    colours = palette(["sky", "road", "digit"])
    assert tuple(colours[0]) == (70, 130, 180) and tuple(colours[1]) == (128, 64, 128)
    assert len({tuple(c) for c in colours}) == 3


def test_segmentation_run_writes_table_1_and_strips(seg_data, tmp_path):
    cfg = _tiny({**seg_data, "window": [16, 24]}, tmp_path, merge={"data_free_row": True})  # evaluated in windows
    results = run(cfg, tmp_path / "out")
    assert results["task"] == "segmentation" and results["classes"][:3] == ["road", "sidewalk", "building"]
    for r in results["rows"]:
        for key in ("merged", "merged_data_free"):
            m = r[key]
            assert 0 <= m["hmean"] <= 1 and set(m["iou"]) == {"dark", "bright"}
            assert decode(m["preview"]["dark"]).shape == (4, H, W)
        assert all(0 <= v <= 1 for v in r["experts"].values())
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## dark" in md and "| model | bits | road | sidewa |" in md and "H (data-free merge)" in md
    assert "hdrq merged | W4A4" in md
    for d in ("dark", "bright"):
        assert (tmp_path / "out" / f"strip_{d}.png").stat().st_size > 1000
    iou = json.loads((tmp_path / "out" / "results.json").read_text())["fp"]["experts_iou"]["dark"]
    assert len(iou) == 19 and None in iou and all(x is None or 0 <= x <= 1 for x in iou)


def test_sliding_window_matches_mmseg_starts_and_averages_overlaps():
    from mergeq.nn.sliding import SlidingWindow, window_starts

    assert window_starts(10, 4, 3) == [0, 3, 6]  # the last window moved back to end at 10
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 2) == [0]  # a window larger than the image: the whole side
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 9, 13)
    # a 1x1 convolution sees each pixel alone: windows give the whole-image output exactly
    assert torch.allclose(SlidingWindow(conv, (4, 6), (3, 4))(x), conv(x), atol=1e-6)

    class Position(torch.nn.Module):  # output: the window's own left edge position, per pixel
        def forward(self, x):
            return torch.arange(x.shape[-1], dtype=x.dtype).expand(x.shape[0], 1, *x.shape[-2:]).clone()

    out = SlidingWindow(Position(), (1, 4), (1, 2))(torch.zeros(1, 1, 1, 6))
    # windows [0,4) [2,6): pixels 2 and 3 are the mean of (2, 0) and (3, 1)
    assert out.flatten().tolist() == [0, 1, 1, 2, 2, 3]


def test_window_needs_a_segmentation_spec_of_two_sides(seg_data):
    with pytest.raises(ConfigError, match="data.stride: sets the steps of data.window"):
        Config.from_dict({"data": {**seg_data, "stride": [4, 4]}})
    cfg = resolve(Config.from_dict({"data": {**seg_data, "window": [16, 16]}}))
    assert cfg.data.window == [16, 16]
