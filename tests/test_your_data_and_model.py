"""Issue 16's checks, CI-sized: an Office-Home-style folder (4 domains, 5 classes, 20 real PNG/JPEG
images each) through ``run --preset quick``, ``pmq`` and ``bench``, the written config rerunning to
the same numbers; an in-house ``builder:`` model whose forward returns a dict through ``run`` and
``pmq`` (cached and rebuilt from its checkpoints); ``pmq --config benchmarks/configs/vit_digits.yaml``."""
import importlib
import json
from pathlib import Path

import pytest
import yaml

from mergeq.checkpoint import model_from_checkpoint
from mergeq.io import read_checkpoint_header
from mergeq.cli import main
from mergeq.experiments import load_config
from mergeq.experiments import pool as pool_module

from .test_data_spec import make_tree

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "horizontal", "vertical", "ring", "dots")
DOMAINS = {"Art": "png", "Clipart": "jpg", "Product": "jpeg", "Real_World": "png"}
NETS = '''
from torch import nn


class LabNet(nn.Module):
    """An in-house CNN whose forward returns a dict (logits and features)."""

    def __init__(self, num_classes, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        features = self.body(x)
        return {"logits": self.head(features), "features": features}


def make(num_classes, width=8):
    return LabNet(num_classes, width)
'''


def _rows(path):
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("seconds")}  # noqa: E731
    return [strip(r) for r in json.loads(Path(path).read_text())["rows"]]


@pytest.fixture(scope="module")
def office(tmp_path_factory):
    """office.yaml over the generated folder (``preset: quick`` comes from the command line)."""
    base = tmp_path_factory.mktemp("office")
    root = make_tree(base / "OfficeHome", DOMAINS, CLASSES, 20)
    config = {"data": {"kind": "office_home", "root": str(root), "source": "Real_World", "image_size": 32,
                       "normalize": "standardize", "in_memory": True},
              "model": {"name": "resnet8", "kwargs": {"width": 4}},
              "adapt": {"source": {"steps": 6}, "shot": {"steps": 2}},
              "ptq": {"methods": ["rtn", "hdrq"], "bits": ["W4A4"]},
              "pmq": {"merges": ["ties"], "methods": ["rtn", "gptq"], "bits": ["W4"]},
              "runtime": {"threads": 1, "cache_dir": str(base / "cache")}}
    path = base / "office.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_office_home_folder_through_run_pmq_and_bench(office, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--config", str(office), "--preset", "quick", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"] == "office_home" and res["targets"] == ["Art", "Clipart", "Product"]
    assert [(r["method"], r["w_bits"]) for r in res["rows"]] == [("rtn", 4), ("hdrq", 4)]
    assert all(set(r["merged"]) == {"Art", "Clipart", "Product", "hmean"} for r in res["rows"])
    assert all(0 < r["ptq"]["Art"]["changed_codes"] < 1 and r["ptq"]["Art"]["recon_loss"]
               for r in res["rows"] if r["method"] == "hdrq")
    recorded = load_config(out / "config.yaml")
    assert recorded.preset == "quick" and recorded.data.classes == sorted(CLASSES)
    assert recorded.data.splits["Art"]["train"] + recorded.data.splits["Art"]["test"] == 100
    assert recorded.adapt.source.color == 0.2 and recorded.ptq.options["hdrq"]["iters"] == 100

    again = tmp_path / "again"  # the written config reruns to the same numbers
    assert main(["run", "--config", str(out / "config.yaml"), "--out", str(again), "--quiet"]) == 0
    assert _rows(again / "results.json") == _rows(out / "results.json")

    pmq = tmp_path / "pmq"
    assert main(["pmq", "--config", str(office), "--out", str(pmq), "--quiet"]) == 0
    assert [(r["merge"], r["method"]) for r in json.loads((pmq / "results.json").read_text())["rows"]] == [
        ("ties", "rtn"), ("ties", "gptq")]
    assert (pmq / "hmean_vs_bits.png").stat().st_size > 0

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**yaml.safe_load(office.read_text()),
                                    "grid": {"target_sets": [["Art", "Clipart"]], "seeds": [0]}}))
    bench = tmp_path / "bench"
    assert main(["bench", str(grid), "--methods", "rtn", "--bits", "W4A4", "--out", str(bench), "--quiet"]) == 0
    cell = json.loads((bench / "cells" / "Art+Clipart__seed0__W4A4__rtn.json").read_text())
    assert cell["config"]["data"]["targets"] == ["Art", "Clipart"] and set(cell["merged"]) == {"Art", "Clipart", "hmean"}
    assert "| rtn |" in (bench / "results.md").read_text()
    assert main(["data", "--config", str(office), "--out", str(tmp_path / "samples.png"), "--per-domain", "2"]) == 0
    assert (tmp_path / "samples.png").stat().st_size > 0


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_builder_model_with_a_dict_output_through_run_and_pmq(office, tmp_path, monkeypatch):
    (tmp_path / "lab_nets_issue16.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {**yaml.safe_load(office.read_text()),
              "model": {"builder": "lab_nets_issue16:make", "kwargs": {"width": 8}, "output": "logits"},
              "ptq": {"methods": ["rtn", "hdrq"], "bits": ["W4A4"], "options": {"hdrq": {"iters": 5}}},
              "pmq": {"merges": ["task_arithmetic"], "methods": ["rtn", "gptq", "epmq"], "bits": ["W4"]}}
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["run", "--config", str(path), "--preset", "quick", "--out", str(out), "--quiet"]) == 0
    rows = _rows(out / "results.json")
    assert [r["method"] for r in rows] == ["rtn", "hdrq"] and all(0 <= r["merged"]["hmean"] <= 1 for r in rows)
    # the cache holds the builder model's checkpoints, rebuilt from their metadata (no retraining)
    cache = Path(config["runtime"]["cache_dir"])
    expert = next(p for p in cache.glob("expert-Art-*.safetensors")
                  if "lab_nets_issue16" in json.dumps(read_checkpoint_header(p)[1].get("model")))
    model, meta = model_from_checkpoint(expert, trust_builder=True)  # the file names a builder: trusted here
    assert meta["model"]["builder"] == "lab_nets_issue16:make" and type(model.model).__name__ == "LabNet"

    def no_training(*a, **k):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(pool_module, "train_source", no_training)
    monkeypatch.setattr(pool_module, "shot", no_training)
    pmq = tmp_path / "pmq"
    assert main(["pmq", "--config", str(path), "--preset", "quick", "--out", str(pmq), "--quiet"]) == 0
    assert [r["method"] for r in _rows(pmq / "results.json")] == ["rtn", "gptq", "epmq"]
    again = tmp_path / "again"
    assert main(["run", "--config", str(out / "config.yaml"), "--out", str(again), "--quiet"]) == 0
    assert _rows(again / "results.json") == rows


@pytest.mark.slow
def test_pmq_with_the_vit_config_of_the_readme(tmp_path):
    """``mergeq pmq --config benchmarks/configs/vit_digits.yaml`` (shrunk: one epoch, one layer, one target)."""
    out = tmp_path / "pmq-vit"
    assert main(["pmq", "--config", str(ROOT / "benchmarks/configs/vit_digits.yaml"), "--set", "adapt.source.epochs=1",
                 "--set", "adapt.shot.epochs=1", "--set", "model.kwargs.depth=1", "--targets", "uci,noisy",
                 "--merges", "task_arithmetic", "--methods", "rtn,gptq", "--bits", "W4", "--calib-size", "32",
                 "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet"]) == 0
    recorded = load_config(out / "config.yaml")
    assert recorded.model.name == "vit_tiny" and recorded.adapt.source.optimizer == "adam"
    assert [r["method"] for r in _rows(out / "results.json")] == ["rtn", "gptq"]


def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
        return True
    except Exception:  # noqa: BLE001  (torchvision raises RuntimeError beside a torch it was not built for)
        return False


@pytest.mark.slow  # a ResNet-18 through every command (a minute); CI runs it where the pair is installed
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(not _importable(n.split(":")[0]), reason=f"{n.split(':')[0]} is not "
                                             "importable here (install a matching torch/torchvision pair: README)"))
    for n in ("torchvision:resnet18", "timm:resnet18")])
def test_torchvision_and_timm_models_through_run_pmq_and_the_int8_export(office, tmp_path, name, capsys):
    """Issue 23: a torchvision and a timm model (random init, tiny folder data at 32 px) through run, pmq,
    the step commands and ``export --kernels int8``, whose integer model must equal its simulation."""
    config = {**yaml.safe_load(office.read_text()), "model": {"name": name},
              "ptq": {"methods": ["rtn"], "bits": ["W8A8"]},
              "pmq": {"merges": ["task_arithmetic"], "methods": ["rtn"], "bits": ["W4"]}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    for command in ("run", "pmq"):
        assert main([command, "--config", str(cfg), "--preset", "quick", "--out", str(tmp_path / command),
                     "--quiet"]) == 0
        rows = json.loads((tmp_path / command / "results.json").read_text())["rows"]
        assert rows and all(0.0 <= r["merged"]["hmean"] <= 1.0 for r in rows)
    src, q, onnx_path = (tmp_path / f for f in ("source.safetensors", "q.safetensors", "q.onnx"))
    assert main(["train-source", "--config", str(cfg), "--preset", "quick", "--out", str(src), "--quiet"]) == 0
    assert main(["quantize", "--config", str(cfg), "--preset", "quick", "--model", str(src), "--domain", "Art",
                 "--method", "rtn", "--bits", "W8A8", "--out", str(q), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", "--config", str(cfg), "--model", str(q), "--format", "onnx", "--kernels", "int8",
                 "--calib-size", "32", "--out", str(onnx_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "32 calibration images: agrees with its simulation on 100.00%" in printed, printed
