"""TTAQ: PEM / PCR on the reconstruction loop, TENT and ABL on a stream, the `mergeq tta` driver."""
import re

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mergeq.adapt.tta import ABL, ABLConfig, NoAdapt, Tent, TentConfig, configure_tent, entropy, entropy_grad_norm, \
    run_stream
from mergeq.nn import quant_modules
from mergeq.ptq import quantize
from mergeq.ptq.recon import ReconHooks
from mergeq.ptq.ttaq import consistency, pcr_loss, pem_penalty
from mergeq.quant.fakequant import record_masks, replay_masks
from mergeq.quant import quantize_int
from mergeq.quant.config import QuantConfig

from .conftest import MODEL_FACTORIES, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return randomize_bn(MODEL_FACTORIES["resnet"]())


def _calib(n=24):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _stream(n_domains=2, n=24, shift=0.5):
    g = torch.Generator().manual_seed(5)
    return [(f"d{k}", TensorDataset(torch.randn(n, 3, 16, 16, generator=g) * (1 + shift * k) + shift * k,
                                    torch.randint(10, (n,), generator=g))) for k in range(n_domains)]


# ---------------------------------------------------------------- ABL

def _onehot_logits(classes, k=10, scale=5.0):
    z = torch.zeros(len(classes), k)
    z[torch.arange(len(classes)), torch.tensor(classes)] = scale
    return z + 0.1 * torch.randn(len(classes), k, generator=torch.Generator().manual_seed(len(classes)))


def test_abl_weights_fall_for_frequent_and_rise_for_rare_classes():
    abl = ABL(10)
    frequent, rare = [], []
    for t in range(15):  # a hand-made stream: class 0 dominates every batch, class 7 shows up once
        classes = [0] * 15 + [1] if t != 10 else [0] * 14 + [1, 7]
        pred = abl.update(_onehot_logits(classes))
        w = abl.class_weights()
        frequent.append(float(w[0]))
        rare.append(float(w[7]))
        assert pred.tolist() == classes
    assert all(a > b for a, b in zip(frequent, frequent[1:]))  # keeps falling while class 0 keeps coming
    assert frequent[-1] < 1.0 < rare[-1]
    assert rare[-1] > rare[0]  # classes never (or rarely) predicted gain weight over time
    w = abl.weights(torch.tensor([0, 0, 7, 3]))
    assert w.mean().item() == pytest.approx(1.0) and w[0] < w[2] and w[0] < w[3]


def test_abl_weights_capped_and_uniform_at_start():
    abl = ABL(4, ABLConfig(max_weight=2.0))
    assert torch.allclose(abl.class_weights(), torch.ones(4), atol=1e-4)
    for _ in range(30):
        abl.update(_onehot_logits([0] * 8, k=4))
    w = abl.weights(torch.tensor([0] * 7 + [3]))
    assert w.max().item() <= 2.0 + 1e-6


def test_abl_bad_input():
    with pytest.raises(ValueError, match="2 classes"):
        ABL(1)
    with pytest.raises(ValueError, match="momentum"):
        ABL(3, ABLConfig(momentum=1.0))
    with pytest.raises(ValueError, match="non-empty"):
        ABL(3).update(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="B x 3"):
        ABL(3).update(torch.zeros(4, 5))


def test_entropy_gradient_closed_form():
    z = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (g,) = torch.autograd.grad(entropy(z).sum(), z)
    assert torch.allclose(entropy_grad_norm(z), g.norm(dim=1), atol=1e-6)


# ---------------------------------------------------------------- PEM / PCR

def test_pcr_is_zero_without_perturbation_even_with_qdrop_masks():
    q = quantize(_model(), "rtn", calib=_calib(), config=QuantConfig(4, 4, fold_bn=False))
    unit = q[3]  # a residual block with BN left unfolded
    for _, m in quant_modules(unit):
        m.act_quant.train()
        m.act_quant.drop_prob = 0.5  # random masks: both passes must share them
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    for kind in ("auto", "kl", "mse"):
        for sigma in (0.0, 0.1):
            with record_masks() as drawn:
                out = unit(x)  # the step's own forward, with its QDrop masks
            assert not torch.equal(out, unit(x))  # a later pass draws other masks

            def forward(a, a_fp):  # the loop's second pass of a step: the first pass's masks
                with replay_masks(drawn):
                    return unit(a)
            loss = pcr_loss(forward, x, x, out, sigma, kind).item()
            assert loss == 0.0 if sigma == 0.0 else loss > 0.0
    head = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    assert pcr_loss(lambda a, a_fp: head(a), x, x, head(x), 0.0).item() == 0.0


def test_consistency_and_pem_values():
    a = torch.randn(3, 4, 2, 2)
    assert consistency(a, a, "kl").item() == pytest.approx(0.0, abs=1e-7)
    assert consistency(a, a + 1.0, "mse").item() == pytest.approx(4.0)  # summed over 4 channels
    assert consistency(a, a + 1.0, "kl").item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift invariant
    with pytest.raises(ValueError, match="PCR kind"):
        consistency(a, a, "l1")
    w = torch.randn(8, 4)
    assert pem_penalty(w, w).item() == pytest.approx(1.0)
    assert pem_penalty(0.5 * w, w).item() == pytest.approx(0.25)


def test_default_unit_loss_adds_nothing():
    assert ReconHooks().unit_loss(0, 1, nn.Identity(), torch.ones(1), torch.ones(1), torch.ones(1)) == 0.0


def test_ttaq_keeps_bn_unfolded_and_on_grid():
    model = _model()
    q = quantize(model, "ttaq", calib=_calib(), config=QuantConfig(4, 4, fold_bn=False), iters=4, batch_size=8)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in q.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for _, m in quant_modules(q):
        assert torch.equal(m.weight, quantize_int(m.weight, m.w_step, m.w_bits) * m.w_step)
    assert torch.isfinite(q(_calib(4))).all()
    folded = quantize(model, "ttaq", calib=_calib(), config=QuantConfig(4, 4), iters=2, batch_size=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_ttaq_options():
    with pytest.raises(ValueError, match="pcr_kind"):
        quantize(_model(), "ttaq", calib=_calib(), iters=1, pcr_kind="l1")
    with pytest.raises(TypeError, match="unknown option"):
        quantize(_model(), "ttaq", calib=_calib(), iters=1, pcr_lambda=1.0)
    a = quantize(_model(), "ttaq", calib=_calib(), config=QuantConfig(4, 4, fold_bn=False), iters=3, batch_size=8,
                 pem=False, pcr=False)
    b = quantize(_model(), "qdrop", calib=_calib(), config=QuantConfig(4, 4, fold_bn=False), iters=3, batch_size=8)
    for (_, ma), (_, mb) in zip(quant_modules(a), quant_modules(b)):  # without PEM and PCR: QDrop exactly
        assert torch.equal(ma.weight, mb.weight)


# ---------------------------------------------------------------- TENT on a stream

def _snapshot(model):
    out = {}
    for n, m in quant_modules(model):
        out[n] = (m.weight.clone(), m.int_weight().clone(), m.w_step.clone(),
                  None if m.act_quant is None else m.act_quant.step.detach().clone(),
                  None if m.bias is None else m.bias.clone())
    return out


@pytest.mark.parametrize("abl", [False, True])
def test_adaptation_changes_only_bn_affine_and_keeps_quantized_weights(abl):
    q = quantize(_model(), "rtn", calib=_calib(), config=QuantConfig(4, 4, fold_bn=False))
    adapter = Tent(q, TentConfig(lr=1e-2), abl=ABL(10) if abl else None)
    before = _snapshot(adapter.model)
    bn_before = [(m.weight.clone(), m.bias.clone()) for m in adapter.model.modules() if isinstance(m, nn.BatchNorm2d)]
    trainable = {id(p) for p in adapter.params}
    res = run_stream(adapter, _stream(), batch_size=8)
    after = _snapshot(adapter.model)
    for n in before:
        for a, b in zip(before[n], after[n]):
            assert (a is None and b is None) or torch.equal(a, b), n  # bit-identical
    bns = [m for m in adapter.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not torch.equal(m.weight, w) for m, (w, _) in zip(bns, bn_before))
    assert all(m.running_mean is None and m.training for m in bns)  # batch statistics (TENT)
    assert {id(p) for p in adapter.model.parameters() if p.requires_grad} == trainable
    assert len(res["batch_error"]) == 2 * 3 and set(res["error"]) == {"d0", "d1"}
    # the caller's model is untouched (adaptation works on a copy)
    assert all(m.running_mean is not None for m in q.modules() if isinstance(m, nn.BatchNorm2d))


def test_tent_fp_changes_only_bn():
    model = _model()
    adapter = Tent(model, TentConfig(lr=1e-2))
    bn = {id(p) for m in adapter.model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    frozen = {n: p.clone() for n, p in adapter.model.named_parameters() if id(p) not in bn}
    bn_before = [p.clone() for p in adapter.params]
    run_stream(adapter, _stream(1), batch_size=8)
    for n, p in adapter.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert {id(p) for p in adapter.params} == bn
    assert not all(torch.equal(a, b) for a, b in zip(bn_before, adapter.params))


def test_tent_needs_batchnorm():
    q = quantize(_model(), "rtn", calib=_calib(), config=QuantConfig(4, 4))  # BN folded away
    with pytest.raises(ValueError, match="fold_bn=False"):
        configure_tent(q)
    with pytest.raises(ValueError, match="optimizer"):
        Tent(_model(), TentConfig(optimizer="rmsprop"))


def test_stream_runs_on_without_reset():
    stream = _stream(3)
    a = Tent(_model(), TentConfig(lr=1e-2))
    run_stream(a, stream, batch_size=8)
    b = Tent(_model(), TentConfig(lr=1e-2))  # the same batches by hand, one adapter throughout
    for _, ds in stream:
        for i in range(0, len(ds), 8):
            b(ds.tensors[0][i:i + 8])
    c = Tent(_model(), TentConfig(lr=1e-2))  # what a reset before the last domain would give
    for i in range(0, 24, 8):
        c(stream[-1][1].tensors[0][i:i + 8])
    pa, pb, pc = ([p.detach().clone() for p in x.params] for x in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))


def test_run_stream_errors_match_a_plain_evaluation():
    model = _model().eval()
    stream = _stream(2)
    res = run_stream(model, stream, batch_size=5)
    for name, ds in stream:
        x, y = ds.tensors
        with torch.no_grad():
            err = (model(x).argmax(1) != y).float().mean().item()
        assert res["error"][name] == pytest.approx(err)
    assert res["mean_error"] == pytest.approx(sum(res["error"].values()) / 2)
    assert res["batch_domain"] == ["d0"] * 5 + ["d1"] * 5
    assert len(res["class_error"]) == 10
    with pytest.raises(ValueError, match="no domains"):
        run_stream(model, [], 4)
    with pytest.raises(ValueError, match="hold no images"):
        run_stream(model, [("e", TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)))], 4)
    assert isinstance(NoAdapt(model)(stream[0][1].tensors[0][:2]), torch.Tensor)


# ---------------------------------------------------------------- driver

def test_parse_method_and_config():
    from mergeq.errors import ConfigError
    from mergeq.experiments.config import Config, parse_tta_method
    from mergeq.experiments.tta import plan

    assert parse_tta_method("ttaq") == ("ttaq", "abl")
    assert parse_tta_method("qdrop+tent") == ("qdrop", "tent")
    assert parse_tta_method("fp") == ("fp", "none")
    with pytest.raises(ValueError, match="adapter"):
        parse_tta_method("qdrop+cotta")
    with pytest.raises(KeyError):
        parse_tta_method("nonsense+tent")
    for bad, where in [({"streams": ["shuffled"]}, "tta.streams[0]"), ({"severity": 9}, "tta.severity"),
                       ({"corruptions": ["rain"]}, "tta.corruptions"), ({"bits": ["W4X"]}, "tta.bits[0]"),
                       ({"imbalance": "zipf"}, "tta.imbalance"), ({"methods": []}, "tta.methods"),
                       ({"methods": ["qdrop+cotta"]}, "tta.methods[0]"), ({"batch_size": 0}, "tta.batch_size")]:
        with pytest.raises(ConfigError, match=re.escape(where)):
            Config.from_dict({"tta": bad})
    rows = plan(Config.from_dict({"tta": {"bits": ["W4A4", "W2A4"]}}))
    assert len(rows) == 2 * 2 + 2 * 2 * 3 and rows[0] == ("balanced", "fp", "FP32")


@pytest.mark.slow  # end to end on the tiny models (several seconds); CI runs it
def test_driver_smoke_and_resume(tmp_path, monkeypatch):
    """The whole `mergeq tta` path on a tiny random ResNet-8, 8 images, two corruptions (seconds)."""
    import json

    from mergeq.cli import main
    from mergeq.experiments import load_config, tta as T
    from mergeq.models import build_model
    from mergeq.ptq import presets

    def tiny_source(self):
        torch.manual_seed(0)
        return build_model("resnet8", 10, width=4).eval()

    monkeypatch.setattr(T.Pool, "source", property(tiny_source))
    monkeypatch.setitem(presets._ITERS, "quick", 2)
    monkeypatch.setitem(presets._CALIB, "quick", 16)
    out = tmp_path / "run"
    argv = ["tta", "--preset", "quick", "--seed", "0", "--corruptions", "contrast,pixelate", "--n-images", "8",
            "--batch-size", "4", "--bits", "W4A4", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--quiet"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    keys = {(r["stream"], r["method"], r["bits"]) for r in res["rows"]}
    assert ("imbalanced", "ttaq", "W4A4") in keys and ("balanced", "fp", "FP32") in keys and len(keys) == 10
    assert all(set(r["error"]) == {"contrast", "pixelate"} and len(r["batch_error"]) == 4 for r in res["rows"])
    md = (out / "results.md").read_text()
    assert "imbalanced stream (dirichlet)" in md and "| ttaq | W4A4 |" in md
    assert (out / "stream_error.png").stat().st_size > 0
    cfg = load_config(out / "config.yaml")
    assert cfg.tta.corruptions == ["contrast", "pixelate"] and cfg.runtime.seed == 0
    assert cfg.ptq.options["ttaq"] == {"iters": 2, "batch_size": 32}  # the preset's, recorded

    def boom(*a, **k):
        raise AssertionError("resumed run recomputed a row")

    monkeypatch.setattr(T.TTARows, "row", boom)
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    assert main([*argv, "--streams", "balanced"]) == 0  # fewer rows asked for: none dropped
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]


def test_driver_on_cifar10c_arrays(tmp_path, monkeypatch):
    """``tta.cifar10c``: the stream's domains are the arrays, normalised as the data section says."""
    import json

    import numpy as np

    from mergeq.cli import main
    from mergeq.experiments import tta as T
    from mergeq.models import build_model

    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("fog", "snow"):
        np.save(folder / f"{name}.npy", rng.integers(0, 256, (5 * 6, 32, 32, 3), dtype=np.uint8))
    np.save(folder / "labels.npy", np.arange(30) % 10)
    monkeypatch.setattr(T.Pool, "source", property(lambda self: build_model("resnet8", 10, width=4).eval()))
    out = tmp_path / "run"
    assert main(["tta", "--cifar10c", str(folder), "--corruptions", "snow,fog", "--severity", "2", "--methods",
                 "fp,fp+tent", "--batch-size", "3", "--streams", "balanced", "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["fp", "fp+tent"]
    assert all(list(r["error"]) == ["snow", "fog"] and len(r["batch_error"]) == 4 for r in res["rows"])
    stream = T.TTARows(T.Pool(T.Config.from_dict({"tta": {"cifar10c": str(folder), "corruptions": ["fog"]}}))
                       ).stream("balanced")
    x = stream[0][1].tensors[0]
    torch.testing.assert_close(x.mean(dim=(2, 3)), torch.zeros(len(x), 3), atol=1e-5, rtol=0)  # standardised
