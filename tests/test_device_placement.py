"""Issue 30, item 2: every command on a logical CUDA device (tests/logical_device.py) that computes
on the CPU and raises where a real GPU would (a CPU tensor meeting a CUDA one, ``.numpy()`` of a
CUDA tensor, a CPU generator drawing CUDA numbers). Data and budgets are the smallest the suite
uses (a 3-domain folder of 8 images per class at 32 px, ResNet-8 of width 4, 2 steps per unit)."""
import json
import sys
import types
from unittest import mock

import pytest
import torch
import yaml
from torch import nn

from mergeq.cli import main
from mergeq.eval import evaluate
from mergeq.gpu import out_of_memory
from mergeq.experiments import Pool, load_config, run
from mergeq.experiments.compare import compare
from mergeq.experiments.pmq import run_pmq
from mergeq.experiments.tta import run_tta
from mergeq.merge import merge
from mergeq.merge.recalibrate import RECALIBRATIONS, recalibrate
from mergeq.ptq import graphs

from .conftest import randomize_bn, tiny_resnet
from .logical_device import MISMATCH, LogicalCuda, logical_device
from .test_data_spec import make_tree

pytestmark = pytest.mark.usefixtures("one_thread")
# every PTQ method runs on the logical GPU once: rtn, qdrop, hdrq in run; gptq in compare; epmq in pmq; ttaq
# in tta; adaround and brecq in test_gpu_check's probe
RECON = ["qdrop", "hdrq", "ttaq"]
METHODS = ["rtn", "qdrop", "hdrq"]


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
def gpu_setup(tmp_path_factory):
    """A folder benchmark and its config (device cuda), and ``run`` on it (noise rounding, bn+act), models
    trained on the logical GPU (the cache key holds the device kind: nothing comes from a CPU run)."""
    base = tmp_path_factory.mktemp("gpu")
    root = make_tree(base / "data", {"Art": "png", "Clipart": "jpg", "Real_World": "png"})
    cfg = {"preset": "quick",
           "data": {"kind": "folder", "root": str(root), "source": "Real_World", "image_size": 32,
                    "normalize": "standardize", "in_memory": True},
           "model": {"name": "resnet8", "kwargs": {"width": 4}},
           "adapt": {"source": {"steps": 4}, "shot": {"steps": 2}},
           "ptq": {"methods": METHODS, "bits": ["W3A3"], "calib_size": 8, "step_method": "absmax",
                   "options": {m: {"iters": 8} for m in RECON}},  # 8: each unit captures its step
           "merge": {"rounding": "noise", "rounding_options": {"samples": 2}},
           "pmq": {"merges": ["task_arithmetic"], "methods": ["epmq"], "bits": ["W4"]},
           "tta": {"methods": ["fp+tent", "ttaq"], "bits": ["W4A4"], "streams": ["balanced"], "severity": 3,
                   "corruptions": ["gaussian_noise"], "n_images": 16, "batch_size": 8},
           "runtime": {"device": "cuda", "threads": 1, "cache_dir": str(base / "cache")}}
    path = base / "gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    init = graphs.StepGraph.__init__

    def counting(self, fn, device):
        init(self, fn, device)
        CAPTURED.append(device)

    with LogicalCuda(), mock.patch.object(graphs.StepGraph, "__init__", counting):
        config = load_config(path)
        results = run(config, base / "run")
    return base, path, config, results


CAPTURED: list = []  # the reconstruction steps gpu_setup's run captured as CUDA graphs


def test_run_on_cuda_with_noise_rounding(gpu_setup):
    base, _, config, res = gpu_setup
    assert [r["method"] for r in res["rows"]] == METHODS
    assert all(0.0 <= v <= 1.0 for r in res["rows"] for v in r["merged"].values())
    assert yaml.safe_load((base / "run" / "config.yaml").read_text())["runtime"]["device"] == "cuda"
    # qdrop and hdrq x 2 experts x the 5 units of ResNet-8: every unit captured its step (its replays
    # checked by the harness)
    assert len(CAPTURED) == 2 * 2 * 5 and all(d.type == "cuda" for d in CAPTURED)


def off_device(model: nn.Module) -> list[str]:
    """Parameters and buffers of ``model`` that are not on a (logical) GPU."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_cuda]


def test_every_recalibration_and_the_float_merge_on_cuda(gpu_setup):
    """Every model the pool makes lives wholly on the GPU (a parameter left on the CPU, e.g. an
    activation step, costs a host copy per training step), merged with each mode and rounding."""
    _, _, config, _ = gpu_setup
    with LogicalCuda():
        pool = Pool(config)
        q = list(pool.quantize_experts("rtn", pool.qconfig((4, 4))).values())
        for model in (pool.source, *pool.experts.values(), *q):
            assert off_device(model) == []
        for mode in [m for m in RECALIBRATIONS if m != "bn+act"]:  # bn+act: the run's
            merge_pool = Pool(config.updated({"merge.recalibrate": mode}))
            for rounding in ("float", "noise"):
                merged = merge_pool.merged(q, rounding)
                assert off_device(merged) == [], (mode, rounding)
                assert 0.0 <= evaluate(merged, pool.tests, "cuda")["hmean"] <= 1.0


def test_step_commands_and_export_of_checkpoints_written_on_the_second_gpu(gpu_setup, tmp_path):
    """On ``cuda:1`` of two GPUs: a tensor made on the current device (``cuda``, i.e. cuda:0) fails."""
    _, path, _, _ = gpu_setup
    common = ["--config", str(path), "--device", "cuda:1", "--quiet"]
    src, expert, q, merged = (tmp_path / f"{n}.safetensors" for n in ("source", "art", "art-w4a4", "merged"))
    with LogicalCuda(devices=2):
        assert main(["train-source", *common, "--out", str(src)]) == 0
        assert main(["adapt", *common, "--source", str(src), "--domain", "Art", "--out", str(expert)]) == 0
        assert main(["quantize", *common, "--model", str(expert), "--method", "hdrq", "--bits", "W4A4",
                     "--step-method", "mse", "--source", str(src), "--out", str(q)]) == 0
        assert main(["merge", str(q), str(q), "--device", "cuda:1", "--rounding", "noise", "--samples", "2",
                     "--out", str(merged)]) == 0
        assert main(["export", "--model", str(merged), "--out", str(tmp_path / "packed.safetensors"), "--quiet"]) == 0
        for name in ("barrier", "surface"):
            assert main([name, *common, "--methods", "rtn", "--bits", "W4A4", "--points", "2",
                         "--out", str(tmp_path / name)]) == 0
    report = json.loads(merged.with_suffix(".report.json").read_text())
    assert report["recalibrate"] == "bn+act" and 0.0 <= report["accuracy"]["hmean"] <= 1.0


def test_pmq_tta_and_compare_on_cuda(gpu_setup, tmp_path):
    _, _, config, _ = gpu_setup
    with LogicalCuda():
        pmq = run_pmq(config, tmp_path / "pmq")
        tta = run_tta(config, tmp_path / "tta")
        compared = compare(config.updated({"ptq.methods": ["rtn", "gptq"], "ptq.bits": ["W4A4"]}), tmp_path / "cmp")
    assert [r["method"] for r in pmq["rows"]] == ["epmq"]
    assert [r["method"] for r in tta["rows"]] == ["fp+tent", "ttaq"]
    assert all(0.0 <= r["mean_error"] <= 1.0 for r in tta["rows"])
    assert set(compared["bits"]["W4A4"]["methods"]) == {"rtn", "gptq"}  # bench's grid, cells computed in-process
    cells = [json.loads(p.read_text()) for p in sorted((tmp_path / "cmp" / "grid" / "cells").glob("*.json"))]
    assert [c["method"] for c in cells] == ["gptq", "rtn"] and cells[0]["config"]["runtime"]["device"] == "cuda"


# --- memory ------------------------------------------------------------------------------------

def test_unit_inputs_that_do_not_fit_stay_in_pinned_host_memory():
    """UnitBatches (ptq/recon.py): captured unit data above a quarter of the free GPU memory stays
    in pinned host memory, each batch copied through two pinned buffers; it fits: moved once."""
    from mergeq.ptq.recon import UnitBatches

    x, y = torch.randn(40, 4, 6, 6), torch.randn(40, 4, 6, 6)
    with LogicalCuda(free=4 * 2 * x.numel() * 4 - 1):  # just too little: 2 tensors must fit 4 times
        staged = UnitBatches((x, y), 8, torch.device("cuda"))
        assert staged.staged and all(t.is_pinned() for t in staged.src)
        assert all(b.is_pinned() and not b.is_cuda for bufs in staged.bufs for b in bufs)
        for _ in range(3):
            xb, yb = staged.next()
            assert xb.is_cuda and yb.is_cuda and xb.shape == (8, 4, 6, 6)
            rows = [int((x == r).flatten(1).all(1).nonzero()[0]) for r in xb.cpu()]
            assert torch.equal(yb.cpu(), y[rows])  # the same rows of both tensors
    with LogicalCuda(free=4 * 2 * x.numel() * 4 + 4):
        moved = UnitBatches((x, y), 8, torch.device("cuda"))
        assert not moved.staged and all(t.is_cuda for t in moved.src)
        xb, yb = moved.next()
        assert xb.is_cuda and torch.equal(yb.cpu(), y[[int((x == r).flatten(1).all(1).nonzero()[0]) for r in xb.cpu()]])


def test_reconstruction_through_pinned_host_memory_on_cuda():
    """QDrop end to end with every unit's data staged (a GPU with 1 KiB free): it runs on the device."""
    from mergeq.ptq import quantize
    from mergeq.ptq.recon import UnitBatches
    from mergeq.quant.config import QuantConfig

    torch.manual_seed(0)
    model, calib = randomize_bn(tiny_resnet()), torch.randn(32, 3, 16, 16)
    staged = []
    real_next = UnitBatches.next

    def spy(self):
        staged.append(self.staged)
        return real_next(self)

    with LogicalCuda(free=1 << 10), mock.patch.object(UnitBatches, "next", spy):
        q = quantize(model, "qdrop", calib=calib, config=QuantConfig(4, 4), device="cuda", iters=3)
        assert off_device(q) == []
    assert staged and all(staged)
    assert all(torch.isfinite(torch.tensor(v)) for v in q.mergeq_meta["recon_loss"].values())


def test_out_of_gpu_memory_is_one_line(gpu_setup, tmp_path, capsys):
    """A batch that does not fit: ``mergeq`` prints what was asked and what is free, exit 2."""
    _, path, _, _ = gpu_setup
    with LogicalCuda(max_alloc=64 << 10, free=3 << 30):  # nothing above 64 KiB fits
        code = main(["train-source", "--config", str(path), "--quiet", "--out", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("mergeq train-source: error: out of GPU memory on cuda:0: asked for ") and \
        "MiB with 3.00 GiB free of 80.00 GiB" in err and "--device cpu" in err
    host = out_of_memory(torch.OutOfMemoryError("DefaultCPUAllocator: not enough memory: you tried to allocate "
                                                "4000000000000 bytes."))
    assert str(host).startswith("out of host memory: asked for 4000000000000 bytes; lower the batch sizes")


# --- devices of worker processes and configs ---------------------------------------------------

def test_local_workers_spread_over_the_visible_gpus():
    from mergeq.experiments.run import default_workers
    from mergeq.gpu import pin_worker, worker_devices

    assert worker_devices("cpu", None) == [None] and worker_devices("cpu", 3) == [None] * 3
    with LogicalCuda(devices=3):
        assert worker_devices("cuda", None) == ["cuda:0", "cuda:1", "cuda:2"]
        assert worker_devices("cuda", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
        assert worker_devices("cuda:1", None) == [None]  # an explicit GPU: one process there
        assert default_workers("cuda", 8) == 3 and default_workers("cuda:2", 8) == 1
        queue = queue_of(["cuda:2"])
        pin_worker(queue)
        assert torch.cuda.current_device() == 2 and torch.zeros(1, device="cuda").device == torch.device("cuda", 2)
    with LogicalCuda(devices=2):
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.zeros(1, device="cuda:2")


def queue_of(items):
    import queue

    q = queue.SimpleQueue()
    for item in items:
        q.put(item)
    return q


def test_ray_cells_ask_for_a_gpu_on_cuda(monkeypatch, tmp_path):
    from mergeq.experiments import bench

    asked = []
    fake = types.SimpleNamespace(init=lambda **kw: None, remote=lambda **kw: asked.append(kw) or (lambda fn: fn))
    monkeypatch.setitem(sys.modules, "ray", fake)
    for device, gpus in (("cuda", 1), ("cpu", 0)):
        bench._ray({"runtime": {"device": device, "cache_dir": str(tmp_path)}}, str(tmp_path), None, print)
        assert asked.pop() == {"num_gpus": gpus}
    with pytest.raises(ValueError, match="set runtime.device to cuda, not cuda:1"):
        bench._ray({"runtime": {"device": "cuda:1", "cache_dir": str(tmp_path)}}, str(tmp_path), None, print)


def test_config_accepts_the_gpus_torch_sees():
    from mergeq.experiments.config import check_device

    with pytest.raises(ValueError, match="needs a GPU"):
        check_device("cuda")
    with LogicalCuda(devices=2):
        assert check_device("cuda") == "cuda" and check_device("cuda:1") == "cuda:1"
        with pytest.raises(ValueError, match="names GPU 2, and torch sees 2 GPU"):
            check_device("cuda:2")
