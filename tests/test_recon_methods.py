"""AdaRound pieces, QDrop dropping, and properties every reconstruction method must have."""
import pytest
import torch

from mergeq.nn import QuantModule, quant_modules
from mergeq.ptq import calib_size, ptq_options, quantize
from mergeq.ptq.adaround import AdaRoundQuantizer, beta_schedule, rectified_sigmoid, round_penalty
from mergeq.quant import ActQuantizer, quantize_int, search_weight_step

from .conftest import MODEL_FACTORIES, randomize_bn

METHODS = ["adaround", "brecq", "qdrop", "hdrq"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind="resnet"):
    torch.manual_seed(0)
    return randomize_bn(MODEL_FACTORIES[kind]())


def _calib():
    return torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_adaround_init_reproduces_nearest_rounding():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    step = search_weight_step(w, 4)
    q = AdaRoundQuantizer(w, step)
    frac = w / step - torch.floor(w / step)
    assert torch.allclose(rectified_sigmoid(q.V), frac, atol=1e-5)
    assert torch.equal(q.hard(w, step, 4), quantize_int(w, step, 4) * step)
    q.soft = False  # after reconstruction the forward uses the same hard rounding
    assert torch.equal(q(w, step, 4), q.hard(w, step, 4))


def test_beta_schedule_and_penalty():
    iters = 1000
    betas = [beta_schedule(t, iters) for t in range(iters + 1)]
    assert betas[0] == betas[100] == betas[200] == 20.0
    assert betas[-1] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    assert betas[600] == pytest.approx(11.0)
    v = torch.tensor([-100.0, 100.0, 0.0])  # h = 0, 1 (no penalty) and 0.5 (full penalty)
    assert round_penalty(v, 2.0).item() == pytest.approx(1.0)


def test_qdrop_drop_rate():
    q = ActQuantizer(2)
    x = torch.rand(200_000) * 3
    q.init_from(x)
    q.drop_prob = 0.5
    torch.manual_seed(0)
    out = q.train()(x)
    xq = q.eval()(x)
    differs = xq != x  # only there can dropping be observed
    kept_fp = (out == x) & differs
    assert kept_fp.sum() / differs.sum() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", METHODS)
def test_weights_on_grid_after_method(method):
    model = _model()
    q = quantize(model, method, _calib(), w_bits=3, a_bits=4, source=model, iters=6, batch_size=8)
    for _, m in quant_modules(q):
        codes = m.int_weight()
        assert torch.equal(m.weight, codes * m.w_step)
        assert codes.min() >= -(2 ** (m.w_bits - 1)) and codes.max() <= 2 ** (m.w_bits - 1) - 1


@pytest.mark.parametrize("method", ["qdrop", "hdrq"])
def test_seeded_run_repeats_bit_for_bit(method):
    model, x = _model("nested_bottleneck"), _calib()
    runs = [quantize(model, method, x, source=model, seed=5, iters=5, batch_size=8) for _ in range(2)]
    for (_, a), (_, b) in zip(quant_modules(runs[0]), quant_modules(runs[1])):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.act_quant.step, b.act_quant.step)


@pytest.mark.parametrize("kind", ["vgg", "nested_bottleneck"])
def test_reconstruction_improves_on_rtn(kind):
    model, x = _model(kind), _calib()
    with torch.no_grad():
        y = model(x)
        err = lambda q: float(((q(x) - y) ** 2).mean())  # noqa: E731
        rtn = err(quantize(model, "rtn", x, w_bits=3, a_bits=3))
        brecq = err(quantize(model, "brecq", x, w_bits=3, a_bits=3, iters=60, batch_size=8))
    assert brecq < rtn


def test_unknown_option_and_presets():
    with pytest.raises(TypeError, match="unknown option.*'itrs'"):
        quantize(_model(), "brecq", _calib(), itrs=3)
    with pytest.raises(TypeError):
        quantize(_model(), "hdrq", _calib(), distance=False, round_weight=0.1)  # an AdaRound option
    assert ptq_options("rtn", "quick") == {}
    assert ptq_options("hdrq", "paper")["iters"] == 20000 and calib_size("paper") == 1024
    for preset in ("quick", "default"):
        assert 0 < ptq_options("qdrop", preset)["iters"] < 20000
    with pytest.raises(ValueError, match="unknown preset"):
        ptq_options("qdrop", "huge")


def test_weight_only_config_and_unit_types():
    q = quantize(_model("vgg"), "qdrop", _calib(), w_bits=4, a_bits=None, iters=3, batch_size=4)
    assert all(isinstance(m, QuantModule) and m.act_quant is None for _, m in quant_modules(q))


def test_qdrop_unit_input_is_fp_or_quantized_per_element_once():
    """QDrop's rule at a unit's input: each element is x_fp (p = 0.5) or Q(x_q), never x_q or Q(x_fp);
    the two layers that read a down-sampling block's input share one mask."""
    from mergeq.nn import calibrate_activations, fold_bn, prepare
    from mergeq.ptq.adaround import AdaRoundHooks, AdaRoundOptions
    from mergeq.ptq.recon import capture, reconstruct_unit
    from mergeq.quant.config import QuantConfig

    model, calib = _model(), _calib()
    fp = fold_bn(model, calib[:2]).requires_grad_(False)
    q = prepare(model, QuantConfig(4, 4), calib[:2])
    calibrate_activations(q, calib)
    name = "4"  # Basic(8, 16, stride=2): conv1 and the 1x1 down-sampling conv read the block input
    unit = q.get_submodule(name)
    x_q, _ = capture(q, name, calib, 8, "cpu", output=False)
    x_fp, y_fp = capture(fp, name, calib, 8, "cpu", output=True)
    seen = {}

    def record(tag):
        def hook(mod, args, out):
            if not mod.training:  # the probe forward that finds the input layers
                return
            s = mod.step.detach().abs()
            seen[tag] = (args[0].detach().clone(), out.detach().clone(),
                         torch.clamp(torch.round(args[0] / s), *mod._grid) * s, mod.fp_input[1].clone())
        return hook

    handles = [unit.conv1.act_quant.register_forward_hook(record("conv1")),
               unit.down[0].act_quant.register_forward_hook(record("down"))]
    opts = AdaRoundOptions(iters=1, batch_size=24, drop_prob=0.5)
    torch.manual_seed(0)
    reconstruct_unit(unit, [(n, m) for n, m in quant_modules(unit)], (x_q, x_fp, y_fp),
                     AdaRoundHooks(opts), opts, "cpu")
    for h in handles:
        h.remove()
    xin, out, quantized, alt = seen["conv1"]
    fp_kept = (out == alt) & (quantized != alt)
    q_kept = (out == quantized) & (quantized != alt)
    assert torch.all(fp_kept | q_kept | (quantized == alt))  # every element is one of the two
    differ = quantized != alt
    assert float(fp_kept.sum() / differ.sum()) == pytest.approx(0.5, abs=0.03)
    assert not torch.any((out == xin) & (xin != quantized) & (xin != alt))  # x_q itself never passes
    _, out_down, quantized_down, _ = seen["down"]
    assert torch.equal(out_down == alt, out == alt)  # one mask for both layers reading the input
    for _, m in quant_modules(unit):
        assert m.act_quant.fp_input is None  # cleared after reconstruction


def test_cpu_presets_train_adaround_v_faster_and_paper_keeps_the_papers_lr():
    for m in ("adaround", "brecq", "qdrop"):
        for preset in ("default", "quick"):
            assert ptq_options(m, preset)["lr"] == 1e-2  # chosen from the convergence curves (RESULTS §3b)
        assert "lr" not in ptq_options(m, "paper")
    assert ptq_options("hdrq", "quick")["iters"] == 100 and ptq_options("hdrq", "default")["iters"] == 300
    assert "lr" not in ptq_options("hdrq", "default") and "lr" not in ptq_options("ttaq", "default")
