"""Issue 30, item 2: every command on a logical CUDA device (tests/logical_device.py) that computes
on the CPU and raises where a real GPU would (a CPU tensor meeting a CUDA one, ``.numpy()`` of a
CUDA tensor, a CPU generator drawing CUDA numbers). Data and budgets are the smallest the suite
uses (a 3-domain folder of 8 images per class at 32 px, ResNet-8 of width 4, 2 steps per unit)."""
import json

import pytest
import torch
import yaml
from torch import nn

from mergeq.cli import main
from mergeq.experiments import Pool, load_config, run
from mergeq.experiments.pmq import run_pmq
from mergeq.experiments.tta import run_tta
from mergeq.merge import merge
from mergeq.merge.recalibrate import RECALIBRATIONS, recalibrate

from .conftest import randomize_bn, tiny_resnet
from .logical_device import MISMATCH, LogicalCuda, logical_device
from .test_data_spec import make_tree

pytestmark = pytest.mark.usefixtures("one_thread")
RECON = ["adaround", "brecq", "qdrop", "hdrq", "ttaq"]
METHODS = ["rtn", *RECON, "gptq"]


# --- the harness itself ------------------------------------------------------------------------

def test_the_harness_raises_where_cuda_would():
    with LogicalCuda(devices=2, max_alloc=1 << 20):
        assert torch.cuda.is_available() and torch.cuda.device_count() == 2
        layer = nn.Linear(3, 2)
        weight = layer.weight
        layer.to("cuda")
        assert layer.weight is weight and layer.weight.device == torch.device("cuda", 0) and layer.weight.is_cuda
        x = torch.randn(4, 3)
        with pytest.raises(RuntimeError, match=MISMATCH):
            layer(x)
        y = layer(x.cuda())
        assert y.device.type == "cuda" and (y + torch.tensor(1.0)).device.type == "cuda"  # a CPU scalar may join
        assert torch.equal(y.detach().cpu(), nn.functional.linear(x, weight.detach().cpu(), layer.bias.detach().cpu()))
        with pytest.raises(TypeError, match="can't convert cuda:0"):
            y.detach().numpy()
        with pytest.raises(RuntimeError, match=MISMATCH):
            y.to("cuda:1") + y
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.rand(3, generator=torch.Generator().manual_seed(0), device="cuda")
        torch.manual_seed(3)  # seeds the logical GPUs too, each its own stream
        a, b = torch.rand(4, device="cuda"), torch.rand(4)
        torch.manual_seed(3)
        assert torch.equal(torch.rand(4), b) and torch.equal(torch.rand(4, device="cuda").cpu(), a.cpu())
        pinned = torch.zeros(8).pin_memory()
        assert pinned.is_pinned() and pinned.device.type == "cpu"
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            torch.zeros(1 << 20, device="cuda")
        torch.cuda.synchronize()
        assert torch.cuda.mem_get_info()[1] == 80 << 30
        layer.cpu()
        assert layer.weight is weight and logical_device(layer.weight) is None
    assert not torch.cuda.is_available() and layer.weight.device.type == "cpu"


def test_repair_statistics_moves_its_example_batch_to_the_model():
    """Issue 30: ``merge.recalibrate: bn`` passed the CPU example batch ``calib[0][:2]`` to a merged
    model on the GPU (every ``run`` on CUDA failed). On the logical device it equals the CPU result."""
    torch.manual_seed(0)
    experts = [randomize_bn(tiny_resnet(), seed) for seed in (1, 2)]
    calib = [torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    from mergeq.nn import fold_bn

    folded = [fold_bn(e, calib[0][:2]) for e in experts]
    on_cpu = recalibrate(merge(folded), folded, calib, "bn")
    with LogicalCuda():
        gpu = [f.to("cuda") for f in folded]
        merged = merge(gpu)
        assert next(merged.parameters()).is_cuda
        recalibrate(merged, gpu, calib, "bn")
        assert all(p.is_cuda for p in merged.parameters())
    for (name, a), b in zip(on_cpu.state_dict().items(), merged.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


# --- the commands ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder benchmark and its config (device cuda), and ``run`` of every PTQ method on it, models
    trained on the logical GPU (the cache key holds the device kind: nothing comes from a CPU run)."""
    base = tmp_path_factory.mktemp("gpu")
    root = make_tree(base / "data", {"Art": "png", "Clipart": "jpg", "Real_World": "png"})
    cfg = {"preset": "quick",
           "data": {"kind": "folder", "root": str(root), "source": "Real_World", "image_size": 32,
                    "normalize": "standardize", "in_memory": True},
           "model": {"name": "resnet8", "kwargs": {"width": 4}},
           "adapt": {"source": {"steps": 4}, "shot": {"steps": 2}},
           "ptq": {"methods": METHODS, "bits": ["W3A3"], "calib_size": 16, "step_method": "absmax",
                   "options": {m: {"iters": 2} for m in RECON}},
           "merge": {"rounding": "noise", "rounding_options": {"samples": 2}},
           "pmq": {"merges": ["task_arithmetic"], "methods": ["rtn", "gptq", "epmq"], "bits": ["W4"]},
           "tta": {"methods": ["fp+tent", "ttaq"], "bits": ["W4A4"], "streams": ["balanced"], "severity": 3,
                   "corruptions": ["gaussian_noise"], "n_images": 16, "batch_size": 8},
           "runtime": {"device": "cuda", "threads": 1, "cache_dir": str(base / "cache")}}
    path = base / "gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with LogicalCuda():
        config = load_config(path)
        results = run(config, base / "run")
    return base, path, config, results


def test_run_on_cuda_with_every_ptq_method_and_noise_rounding(setup):
    base, _, config, res = setup
    assert [r["method"] for r in res["rows"]] == METHODS
    assert all(0.0 <= v <= 1.0 for r in res["rows"] for v in r["merged"].values())
    assert yaml.safe_load((base / "run" / "config.yaml").read_text())["runtime"]["device"] == "cuda"


def test_every_recalibration_and_the_float_merge_on_cuda(setup):
    _, _, config, _ = setup
    with LogicalCuda():
        pool = Pool(config.updated({"ptq.methods": ["rtn"]}))
        q = list(pool.quantize_experts("rtn", pool.qconfig((4, 4))).values())
        for mode in RECALIBRATIONS:
            for rounding in ("float", "noise"):
                merged = Pool(config.updated({"merge.recalibrate": mode})).merge_and_evaluate(q, rounding)
                assert 0.0 <= merged["hmean"] <= 1.0, (mode, rounding)


def test_pmq_and_tta_on_cuda(setup, tmp_path):
    _, _, config, _ = setup
    with LogicalCuda():
        pmq = run_pmq(config, tmp_path / "pmq")
        tta = run_tta(config, tmp_path / "tta")
    assert [r["method"] for r in pmq["rows"]] == ["rtn", "gptq", "epmq"]
    assert [r["method"] for r in tta["rows"]] == ["fp+tent", "ttaq"]
    assert all(0.0 <= r["mean_error"] <= 1.0 for r in tta["rows"])


def test_step_commands_and_export_of_checkpoints_written_on_cuda(setup, tmp_path):
    _, path, _, _ = setup
    common = ["--config", str(path), "--quiet"]
    src, expert, q, merged = (tmp_path / f"{n}.safetensors" for n in ("source", "art", "art-w4a4", "merged"))
    with LogicalCuda():
        assert main(["train-source", *common, "--out", str(src)]) == 0
        assert main(["adapt", *common, "--source", str(src), "--domain", "Art", "--out", str(expert)]) == 0
        assert main(["quantize", *common, "--model", str(expert), "--method", "hdrq", "--bits", "W4A4",
                     "--step-method", "mse", "--source", str(src), "--out", str(q)]) == 0
        assert main(["merge", str(q), str(q), "--device", "cuda", "--rounding", "noise", "--samples", "2",
                     "--out", str(merged)]) == 0
        assert main(["export", "--model", str(merged), "--out", str(tmp_path / "packed.safetensors"), "--quiet"]) == 0
        for name in ("barrier", "surface"):
            assert main([name, *common, "--methods", "rtn", "--bits", "W4A4", "--points", "2",
                         "--out", str(tmp_path / name)]) == 0
    report = json.loads(merged.with_suffix(".report.json").read_text())
    assert report["recalibrate"] == "bn+act" and 0.0 <= report["accuracy"]["hmean"] <= 1.0
