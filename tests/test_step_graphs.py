"""Issue 30, item 3: each reconstruction step replayed as one CUDA graph (mergeq.ptq.graphs).

Without a GPU the capture runs on the logical CUDA device (tests/logical_device.py): it records
every torch call of the step and refuses what a real capture refuses (a device value read on the
host, a data-dependent size, a copy from host memory, the CUDA random state), and every replay
runs the step again and must make the same calls with the same arguments, since a real graph
would replay the captured ones (a Python float that changes per step would be frozen)."""
import logging

import pytest
import torch

from mergeq.nn import calibrate_activations, prepare, quant_modules
from mergeq.ptq import adaround, graphs, hdrq, quantize
from mergeq.ptq.graphs import StepGraphs, StepScalars
from mergeq.ptq.recon import ReconHooks, ReconOptions, capture, reconstruct_unit
from mergeq.quant.config import QuantConfig

from .conftest import MODEL_FACTORIES, randomize_bn
from .logical_device import GraphCaptureError, LogicalCuda

pytestmark = pytest.mark.usefixtures("one_thread")
ITERS = 12  # AdaRound's warm-up is 3 steps (eager), its regularised phase 9: 3 eager, 1 capture, 5 replays


@pytest.fixture
def captures(monkeypatch):
    """How many step graphs were captured, by unit name."""
    seen: dict[str, int] = {}
    init = graphs.StepGraph.__init__

    def counting(self, fn, device):
        init(self, fn, device)
        seen[device.type] = seen.get(device.type, 0) + 1

    monkeypatch.setattr(graphs.StepGraph, "__init__", counting)
    return seen


def _quantize(method: str, **options):
    """The tiny ResNet quantized on the logical GPU (W4A4, fixed seed): its state and unit errors."""
    with LogicalCuda():
        torch.manual_seed(0)
        model = randomize_bn(MODEL_FACTORIES["resnet"]()).cuda()
        calib = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        extra = {"source": randomize_bn(MODEL_FACTORIES["resnet"](), seed=1).cuda()} if method == "hdrq" else {}
        q = quantize(model, method, calib=calib, config=QuantConfig(4, 4, fold_bn=method != "ttaq"), seed=5,
                     iters=ITERS, batch_size=8, device="cuda", **extra, **options)
        return {k: v.cpu() for k, v in q.state_dict().items()}, q.mergeq_meta["recon_loss"]


@pytest.mark.parametrize("method,options", [("adaround", {}), ("brecq", {}), ("qdrop", {}), ("hdrq", {}),
                                            ("hdrq", {"dist_relative": True}), ("hdrq", {"act_noise": True}),
                                            ("ttaq", {})])
def test_graphed_steps_give_the_eager_result_bit_for_bit(method, options, captures):
    """Captured once per unit and phase and replayed; on the logical GPU (CPU kernels) the quantized
    model is the eager loop's bit for bit (every code, learned activation step and unit error)."""
    graphed = _quantize(method, **options)
    n_units = len(graphed[1])
    assert captures == {"cuda": n_units}  # each unit's regularised / noisy phase reaches a replay
    eager = _quantize(method, cuda_graphs=False, **options)
    assert captures == {"cuda": n_units}  # no capture without graphs
    assert graphed[1] == eager[1]
    for k in eager[0]:
        assert torch.equal(graphed[0][k], eager[0][k]), k


def test_a_trained_weight_step_differs_from_eager_by_float32_rounding_only(captures):
    """HDRQ's ``train_w_step`` keeps the trained float Δ in the model: the graphed step's learning
    rate is a float32 device tensor (eager: a Python float), so Δ differs in its last bits (allowed
    here: 1e-5 relative); the codes stay the same."""
    graphed = _quantize("hdrq", train_w_step=True)
    eager = _quantize("hdrq", train_w_step=True, cuda_graphs=False)
    assert captures["cuda"] == len(eager[1])
    for k in eager[0]:
        if k.endswith("w_step") or k.endswith("weight"):
            assert torch.allclose(graphed[0][k], eager[0][k], rtol=1e-5, atol=0), k
            if k.endswith("weight"):  # on the grid: w = code · Δ
                codes = [torch.round(s[0][k] / s[0][k.replace("weight", "w_step")]) for s in (graphed, eager)]
                assert torch.equal(codes[0], codes[1]), k
        else:
            assert torch.equal(graphed[0][k], eager[0][k]), k


def test_a_step_that_reads_the_device_on_the_host_runs_eagerly_with_a_warning(monkeypatch, captures, caplog):
    reference = _quantize("qdrop", cuda_graphs=False)
    penalty = adaround.AdaRoundHooks.penalty

    def syncing(self, t, iters, layers):
        out = penalty(self, t, iters, layers)
        if not isinstance(out, float) and float(out.detach()) < 0:  # reads the value on the host
            raise AssertionError("f_reg is never negative")
        return out

    monkeypatch.setattr(adaround.AdaRoundHooks, "penalty", syncing)
    with caplog.at_level(logging.WARNING, logger="mergeq.ptq.graphs"):
        got = _quantize("qdrop")
    assert captures == {}
    assert "cannot be captured as a CUDA graph" in caplog.text and "reads a device value on the host" in caplog.text
    # the eager fallback takes every step; the failed capture drew random numbers (a real one
    # advances the generator too), so the result is another draw of the same training
    assert got[1].keys() == reference[1].keys()
    assert all(got[1][u] == pytest.approx(reference[1][u], rel=0.05) for u in reference[1])


def test_a_per_step_float_in_a_graphed_step_is_caught_at_replay(monkeypatch):
    """β as a Python float (not a StepScalars tensor) would be frozen at its captured value."""
    def float_beta(self, t, iters, layers):
        beta = None if t < self.o.warmup * iters else adaround.beta_schedule(t, iters, self.o.warmup)
        for g in self.groups:
            g.new_step(beta)

    monkeypatch.setattr(adaround.AdaRoundHooks, "on_step", float_beta)
    with pytest.raises(GraphCaptureError, match="replay differs from the capture"):
        _quantize("brecq")


def test_hdrq_captures_its_noisy_and_its_fake_quantized_phase(captures):
    """switch_frac 0.5 of 16 steps: 8 noisy (3 eager, capture, replays), then 8 fake-quantized."""
    with LogicalCuda():
        torch.manual_seed(0)
        model = randomize_bn(MODEL_FACTORIES["resnet"]()).cuda()
        calib = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        source = randomize_bn(MODEL_FACTORIES["resnet"](), seed=1).cuda()
        q = quantize(model, "hdrq", calib=calib, config=QuantConfig(4, 4), seed=5, iters=16, batch_size=8,
                     device="cuda", source=source, switch_frac=0.5)
    assert captures == {"cuda": 2 * len(q.mergeq_meta["recon_loss"])}
    assert hdrq.HDRQHooks(hdrq.HDRQOptions(switch_frac=0.5), None).phase(7, 16) is True
    assert hdrq.HDRQHooks(hdrq.HDRQOptions(switch_frac=0.5), None).phase(8, 16) is False


def test_step_graphs_capture_after_the_warm_up_and_release_a_phase():
    with LogicalCuda():
        count = torch.zeros((), device="cuda")

        def step():
            return count.add_(1.0) * 1.0

        g = StepGraphs(torch.device("cuda"), enabled=True)
        outs = [float(g("a", step)) for _ in range(graphs.WARMUP + 3)]
        assert g.captured == 1 and g.graph is not None
        assert outs == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # the capture's step is the first replay's
        g("b", step)
        assert g.graph is None and g.seen == 1  # a new phase: eager again, the old graph released
        off = StepGraphs(torch.device("cuda"), enabled=False)
        off("a", step), off("a", step)
        assert off.captured == 0


def test_hooks_that_do_not_say_they_are_graph_safe_run_eagerly(captures):
    """A method plugged in with its own hooks may read a per-step Python value: not graphed unless
    its hooks set ``graph_safe``."""
    class Mine(ReconHooks):
        def penalty(self, t, iters, layers):  # t-dependent, as a Python float would be frozen in a graph
            return 0.0 if t < 2 else sum(m.act_quant.step.sum() * (1.0 / (t + 1)) for _, m in layers)

    with LogicalCuda():
        torch.manual_seed(0)
        model = _quantize_ready()
        name, unit = "3", model[3]
        calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        x_q, _ = capture(model, name, calib, 8, "cuda", output=False)
        x_fp, y_fp = capture(model, name, calib, 8, "cuda", output=True)
        layers = [(f"{name}.{n}", m) for n, m in quant_modules(unit)]
        reconstruct_unit(unit, layers, (x_q, x_fp, y_fp), Mine(), ReconOptions(iters=8, batch_size=4), "cuda")
    assert captures == {}
    assert not ReconHooks.graph_safe and adaround.AdaRoundHooks.graph_safe and hdrq.HDRQHooks.graph_safe


def _quantize_ready():
    """The tiny ResNet prepared for W4A4 with calibrated activation steps, on the logical GPU."""
    model = randomize_bn(MODEL_FACTORIES["resnet"]())
    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    q = prepare(model, QuantConfig(4, 4), calib[:2]).cuda()
    calibrate_activations(q, calib)
    return q


def test_step_scalars_are_floats_eagerly_and_one_device_tensor_each_when_graphed():
    eager = StepScalars(torch.device("cpu"), graphed=False)
    assert eager("lr", 0.5) == 0.5
    with LogicalCuda():
        s = StepScalars(torch.device("cuda"), graphed=True)
        a = s("lr", 0.5)
        b = s("lr", 0.25)
        assert a is b and a.is_cuda and a.dim() == 0 and float(a) == 0.25
        assert s("beta", 20.0) is not a


def test_pinned_host_batches_are_not_graphed(captures):
    """Unit inputs that do not fit the GPU are copied in each step (not a static input): eager."""
    with LogicalCuda(free=1 << 10):
        torch.manual_seed(0)
        model = randomize_bn(MODEL_FACTORIES["resnet"]()).cuda()
        calib = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        quantize(model, "qdrop", calib=calib, config=QuantConfig(4, 4), seed=5, iters=ITERS, batch_size=8,
                 device="cuda")
    assert captures == {}


# --- what the harness refuses while capturing ----------------------------------------------------

@pytest.mark.parametrize("what", ["item", "bool", "mask", "nonzero", "host_copy", "tensor", "sync", "rng"])
def test_the_harness_refuses_what_a_capture_refuses(what):
    ops = {
        "item": lambda x: x.sum().item(),
        "bool": lambda x: bool(x.sum() > 0),
        "mask": lambda x: x[x > 0],
        "nonzero": lambda x: x.nonzero(),
        "host_copy": lambda x: torch.ones(3).to("cuda"),
        "tensor": lambda x: torch.tensor([1.0, 2.0], device="cuda"),
        "sync": lambda x: torch.cuda.synchronize(),
        "rng": lambda x: torch.cuda.get_rng_state(),
    }
    with LogicalCuda():
        x = torch.randn(4, device="cuda")
        ops[what](x)  # fine outside a capture
        g = torch.cuda.CUDAGraph()
        with pytest.raises(GraphCaptureError):
            with torch.cuda.graph(g):
                ops[what](x)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):  # what a capture takes
            y = torch.zeros(4, device="cuda").add_(x).mul_(torch.full((), 2.0, device="cuda"))
            torch.ones((), dtype=torch.float32).item()  # a host tensor: no synchronisation
        assert torch.equal(y, 2 * x)
