"""Issue 30 for segmentation: every segmentation command on a logical CUDA device
(tests/logical_device.py), which computes on the CPU and raises where a real GPU would.

Sizes are the smallest that run the whole pipeline: ``streets`` shrunk to 8 training and 12
test images per domain (every class is still in every test split), ``deeplab_mini`` of width
4, 2 steps of source training and of DACS, W4A4 with 4 calibration images, HDRQ 2 iterations
per unit. On the logical GPU every number equals the CPU run's bit for bit (a logical device's
generator draws the CPU's stream for the same seed, and its kernels are the CPU's), which the
tests assert: a CPU tensor or generator that slipped into the CUDA path would raise or change them."""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from mergeq.cli import main
from mergeq.data import streets
from mergeq.experiments import Pool, load_config, run
from mergeq.io import load_checkpoint
from mergeq.nn.sliding import SlidingWindow

from .logical_device import LogicalCuda
from .test_device_placement import off_device
from .test_seg_pipeline import _pair_tree

# slow: 18 s on 2 cores, kept out of the default run's 3 minutes; CI runs it (pytest -m slow)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "no_pictures")]
SMALL = {d: (8, 12) for d in streets.DOMAINS}  # (train, test) images per domain
METHODS = ["rtn", "hdrq"]
TINY = {"preset": "quick", "data": {"kind": "streets"}, "model": {"name": "deeplab_mini", "kwargs": {"width": 4}},
        "adapt": {"seg_source": {"steps": 2, "batch_size": 4}, "dacs": {"steps": 2, "batch_size": 4}},
        "ptq": {"methods": METHODS, "bits": ["W4A4"], "calib_size": 4,
                "options": {"hdrq": {"iters": 2, "batch_size": 4}}},
        "merge": {"data_free_row": True}}
DEVICE_KEYS = ("seconds", "seconds_per_expert", "machine", "settings_sha256")  # what differs between devices


@pytest.fixture(scope="module")
def no_pictures():
    """No PNGs: matplotlib would take half of each run's time, and it draws from results.json."""
    with mock.patch("mergeq.experiments.report.pictures"):
        yield


@pytest.fixture(scope="module")
def small_streets():
    """``streets`` with :data:`SMALL` splits (its cache key holds the split sizes: no clash with the full one)."""
    with pytest.MonkeyPatch.context() as mp:
        for dom, sizes in SMALL.items():
            mp.setitem(streets.SPLITS, dom, sizes)
        yield


def _config(base: Path, device: str, data: dict | None = None, methods: list[str] = METHODS) -> Path:
    cfg = {**TINY, **({"data": data} if data else {}), "ptq": {**TINY["ptq"], "methods": methods},
           "runtime": {"device": device, "threads": 1, "cache_dir": str(base / "cache")}}
    path = base / f"{device}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _same_but_device(a, b, where: str = "results") -> None:
    """``a == b`` bit for bit, leaving out the timings, the machine, the row hashes (they hold the
    config, device included) and ``config.runtime.device``."""
    if isinstance(a, dict):
        keys = {k for k in a.keys() | b.keys() if k not in DEVICE_KEYS}
        assert {k for k in a if k in keys} == {k for k in b if k in keys}, where
        for k in keys:
            if not (where.endswith(".runtime") and k == "device"):
                _same_but_device(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_but_device(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def seg_setup(small_streets, tmp_path_factory):
    """The tiny streets ``run`` on the logical GPU (models trained there: the cache key holds the
    device kind) and on the CPU, same seed, one cache."""
    base = tmp_path_factory.mktemp("seg-gpu")
    gpu_path, cpu_path = _config(base, "cuda"), _config(base, "cpu")
    with LogicalCuda():
        gpu = run(load_config(gpu_path), base / "run-cuda")
    cpu = run(load_config(cpu_path), base / "run-cpu")
    return base, gpu_path, cpu_path, gpu, cpu


def test_streets_run_on_cuda_equals_the_cpu_run(seg_setup):
    """Recalibrated (bn+act) and data-free rows, mIoU per target and H, the previews: as on the CPU."""
    base, _, _, gpu, cpu = seg_setup
    assert gpu["task"] == "segmentation" and [r["method"] for r in gpu["rows"]] == METHODS
    for r in gpu["rows"]:
        for key in ("merged", "merged_data_free"):
            assert set(r[key]["iou"]) == {"city", "india"}
            assert all(0.0 <= r[key][d] <= 1.0 for d in ("city", "india", "hmean")), (r["method"], key)
        assert all(0.0 <= v <= 1.0 for v in r["experts"].values())
    assert all(0.0 <= gpu["fp"]["merged"][k] <= 1.0 for k in ("city", "india", "hmean"))
    recorded = yaml.safe_load((base / "run-cuda" / "config.yaml").read_text())
    assert recorded["runtime"]["device"] == "cuda" and recorded["merge"]["recalibrate"] == "bn+act"
    assert recorded["data"]["kind"] == "streets"
    _same_but_device(gpu, cpu)
    assert json.loads((base / "run-cuda" / "results.json").read_text())["config"]["runtime"]["device"] == "cuda"


def test_every_segmentation_model_lives_on_the_gpu(seg_setup):
    """Source, DACS experts, HDRQ experts and their merges (recalibrated, data-free) wholly on the GPU."""
    _, gpu_path, _, _, _ = seg_setup
    with LogicalCuda():
        pool = Pool(load_config(gpu_path))
        q = list(pool.quantize_experts("hdrq", pool.qconfig((4, 4))).values())
        merged = {mode: pool.merged(q, recalibrate=mode) for mode in ("bn+act", "none")}
        for name, model in [("source", pool.source), *pool.experts.items(), *zip(("city-q", "india-q"), q),
                            *merged.items()]:
            assert off_device(model) == [], name
        scores = pool.evaluate(merged["bn+act"])
    assert 0.0 <= scores["hmean"] <= 1.0 and all(0.0 <= scores[d] <= 1.0 for d in pool.targets)


def test_sliding_window_run_on_cuda_equals_the_cpu_run(tmp_path):
    """``data.window`` (real layouts by path): every window's input is on the GPU; results as on the CPU."""
    domains = {}
    for k, (name, shift) in enumerate((("src", 1.0), ("dark", 0.6), ("bright", 1.3))):
        images, labels = _pair_tree(tmp_path / name, 8, k, shift)
        domains[name] = {"dataset": "pair", "images": str(images), "labels": str(labels)}
    data = {"kind": "segmentation", "source": "src", "domains": domains, "window": [16, 24]}  # images: 24 x 32
    results, seen = {}, []
    forward = SlidingWindow.forward

    def spy(self, x):
        seen.append(x.device.type)
        return forward(self, x)

    with mock.patch.object(SlidingWindow, "forward", spy):
        with LogicalCuda():
            results["cuda"] = run(load_config(_config(tmp_path, "cuda", data, ["rtn"])), tmp_path / "run-cuda")
        assert seen and set(seen) == {"cuda"}
        results["cpu"] = run(load_config(_config(tmp_path, "cpu", data, ["rtn"])), tmp_path / "run-cpu")
    for r in results["cuda"]["rows"]:
        assert all(0.0 <= r[key]["hmean"] <= 1.0 for key in ("merged", "merged_data_free"))
    _same_but_device(results["cuda"], results["cpu"])


def test_step_commands_on_the_second_gpu_equal_the_cpu_pool(seg_setup, tmp_path, capsys):
    """train-source, adapt (DACS), quantize, merge (noise rounding, bn+act) and export on ``cuda:1``
    of two GPUs (a tensor made on ``cuda``, i.e. cuda:0, fails), in a fresh cache (trained there):
    the source and the experts equal the CPU run's, bit for bit."""
    _, gpu_path, cpu_path, _, _ = seg_setup
    common = ["--config", str(gpu_path), "--device", "cuda:1", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    ck = {n: tmp_path / f"{n}.safetensors" for n in ("source", "city", "india", "city-q", "india-q", "merged")}
    with LogicalCuda(devices=2):
        assert main(["train-source", *common, "--out", str(ck["source"])]) == 0
        for d in ("city", "india"):
            assert main(["adapt", *common, "--source", str(ck["source"]), "--domain", d, "--out", str(ck[d])]) == 0
        assert main(["quantize", *common, "--model", str(ck["city"]), "--method", "hdrq", "--bits", "W4A4",
                     "--source", str(ck["source"]), "--out", str(ck["city-q"])]) == 0
        assert main(["quantize", *common, "--model", str(ck["india"]), "--method", "rtn", "--bits", "W4A4",
                     "--out", str(ck["india-q"])]) == 0
        assert main(["merge", str(ck["city-q"]), str(ck["india-q"]), "--device", "cuda:1", "--rounding", "noise",
                     "--samples", "2", "--out", str(ck["merged"])]) == 0
        assert main(["export", "--model", str(ck["merged"]), "--out", str(tmp_path / "packed.safetensors"),
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("synthetic=") and "hmean" in out  # train-source's scores (mIoU per domain)
    report = json.loads(ck["merged"].with_suffix(".report.json").read_text())
    assert report["recalibrate"] == "bn+act" and set(report["accuracy"]["iou"]) == {"city", "india"}
    assert all(0.0 <= report["accuracy"][k] <= 1.0 for k in ("city", "india", "hmean"))
    for name in ("source", "city", "city-q", "merged"):
        side = yaml.safe_load(ck[name].with_suffix(".config.yaml").read_text())
        assert side["runtime"]["device"] == "cuda:1", name
    recorded = load_checkpoint(ck["source"])[1]["config"]  # adapt.seg_source (adapt.source is null here)
    assert recorded["steps"] == 2 and recorded["batch_size"] == 4 and "alpha" not in recorded
    cpu = Pool(load_config(cpu_path))  # the CPU run's models, from its cache
    for name, model in (("source", cpu.source), ("city", cpu.expert("city")), ("india", cpu.expert("india"))):
        tensors = load_checkpoint(ck[name])[0]
        state = model.state_dict()
        assert set(tensors) == set(state) and all(torch.equal(tensors[k], state[k]) for k in state), name
