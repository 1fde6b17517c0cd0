import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeq.errors import BitWidthError
from mergeq.quant import ActQuantizer, fake_quantize, qrange, quantize_int, round_ste, search_weight_step
from mergeq.quant.config import QuantConfig, parse_bits


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), method=st.sampled_from(["mse", "lp", "absmax"]), seed=st.integers(0, 1000))
def test_weight_codes_on_grid_and_in_range(bits, method, seed):
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) * 3
    step = search_weight_step(w, bits, method)
    assert step.shape == (6, 1, 1, 1) and (step > 0).all()
    q = quantize_int(w, step, bits)
    lo, hi = qrange(bits, True)
    assert torch.equal(q, torch.round(q)) and q.min() >= lo and q.max() <= hi
    wq = fake_quantize(w, step, bits)
    assert torch.allclose(wq / step, q, atol=1e-4)
    # nearest rounding: inside the clip range the error is at most half a step
    inside = (w / step >= lo) & (w / step <= hi)
    assert ((wq - w).abs() <= step / 2 + 1e-6)[inside].all()


def test_absmax_step_covers_the_largest_weight():
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]])
    step = search_weight_step(w, 4, "absmax")
    assert torch.allclose(step.flatten(), torch.tensor([1.0 / 7, 2.0 / 7]))


def test_mse_step_never_worse_than_absmax():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        errs = {m: ((fake_quantize(w, search_weight_step(w, bits, m), bits) - w) ** 2).sum(1) for m in ("mse", "absmax")}
        assert (errs["mse"] <= errs["absmax"] + 1e-6).all()


def test_round_ste_has_identity_gradient():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


@pytest.mark.parametrize("bad", [0, 1, 9, 16, -4, 4.0, "4", True])
def test_bad_bit_widths_raise(bad):
    with pytest.raises(BitWidthError, match="from 2 to 8"):
        QuantConfig(w_bits=bad)
    with pytest.raises(BitWidthError):
        ActQuantizer(bad)


@pytest.mark.parametrize("spec,expected", [("W4A4", (4, 4)), ("w8a8", (8, 8)), ("W3", (3, None)), ("W2A32", (2, None))])
def test_parse_bits(spec, expected):
    assert parse_bits(spec) == expected


@pytest.mark.parametrize("spec", ["4A4", "W9A4", "W4A1", "WxA4", "", "W4A", "W4A4x", "W+4", "W 4"])
def test_parse_bits_rejects(spec):
    with pytest.raises(ValueError):
        parse_bits(spec)


@pytest.mark.parametrize("bits", range(2, 9))
def test_activation_quantizer_unsigned_after_relu(bits):
    x = torch.relu(torch.randn(4096, generator=torch.Generator().manual_seed(bits)))
    q = ActQuantizer(bits)
    q.init_from(x)
    assert not bool(q.signed)
    y = q.eval()(x)
    codes = y / q.step
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


def test_activation_quantizer_signed_input_and_lsq_gradient():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    q = ActQuantizer(4)
    q.init_from(x)
    assert bool(q.signed)
    q.train()(x).pow(2).sum().backward()
    assert q.step.grad is not None and torch.isfinite(q.step.grad)


def test_activation_quantizer_needs_calibration_and_rejects_nan():
    from mergeq.errors import CalibrationDataError

    q = ActQuantizer(8)
    with pytest.raises(CalibrationDataError, match="before calibration"):
        q(torch.ones(3))
    q.start_observing()
    q(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationDataError, match="NaN"):
        q.finish_observing()


def test_quantize_refuses_a_calib_size_below_one():
    from torch import nn

    from mergeq import quantize
    from mergeq.errors import CalibrationDataError

    for bad in (0, -5):  # -5 once calibrated on all but the last 5 inputs, 0 on the preset's number
        with pytest.raises(CalibrationDataError, match="positive integer"):
            quantize(nn.Sequential(nn.Linear(4, 2)), "rtn", calib=torch.randn(8, 4), calib_size=bad)
