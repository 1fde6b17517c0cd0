"""GPTQ: the matrix algorithm on hand-made problems, and quantize(model, "gptq") on tiny models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergeq.nn import quant_modules
from mergeq.ptq import PTQ_METHODS, quantize
from mergeq.ptq.gptq import GPTQOptions, gptq_quantize_matrix, input_hessian, layer_rows, quantize_layer
from mergeq.quant import QuantConfig, qrange, quantize_int, search_weight_step

from .conftest import randomize_bn


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(out=16, n=48, N=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g) @ torch.randn(n, N, generator=g)  # strongly correlated inputs
    return torch.randn(out, n, generator=g), X


def _on_grid(w, step, bits):
    lo, hi = qrange(bits, True)
    codes = w / step
    return bool(torch.allclose(codes, codes.round(), atol=1e-4)) and lo <= codes.round().min() and codes.round().max() <= hi


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    W, X = _problem()
    step = search_weight_step(W, bits)
    rtn = quantize_int(W, step, bits) * step
    q = gptq_quantize_matrix(W, 2 * X @ X.T / X.shape[1], step, bits, blocksize=16, act_order=act_order)[0]
    assert _on_grid(q, step, bits)
    assert torch.equal(q, quantize_int(q, step, bits) * step)
    assert ((W - q) @ X).norm() < 0.9 * ((W - rtn) @ X).norm()


def test_lazy_block_updates_are_exact():
    W, X = _problem(out=6, n=20, N=100)
    step, H = search_weight_step(W, 3), 2 * X @ X.T / 100
    ref = gptq_quantize_matrix(W, H, step, 3, blocksize=20)[0]
    for bs in (1, 7):
        assert torch.allclose(gptq_quantize_matrix(W, H, step, 3, blocksize=bs)[0], ref)


def test_gptq_identity_hessian_is_rtn_and_dead_inputs_are_zeroed():
    W, _ = _problem(out=4, n=8)
    step = search_weight_step(W, 4)
    q = gptq_quantize_matrix(W, torch.eye(8), step, 4, percdamp=0.0)[0]
    assert torch.equal(q, quantize_int(W, step, 4) * step)  # no correlation: nothing to compensate
    H = torch.eye(8)
    H[3, 3] = 0.0
    assert (gptq_quantize_matrix(W, H, step, 4)[0][:, 3] == 0).all()
    with pytest.raises(ValueError):
        gptq_quantize_matrix(W, torch.eye(7), step, 4)


def test_conv_rows_match_conv_output():
    """The unfolded rows X satisfy ‖conv(x, ΔW)‖² = ‖ΔW Xᵀ‖², so H is the right quadratic form."""
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=False)
    model = nn.Sequential(conv)
    qm = quantize(model, "rtn", torch.randn(4, 3, 9, 9), config=QuantConfig(a_bits=None, first_last_bits=None))[0]
    x, dW = torch.randn(2, 3, 9, 9), torch.randn_like(conv.weight)
    X = layer_rows(qm, x)
    direct = F.conv2d(x, dW, stride=2, padding=1).pow(2).sum()
    assert torch.allclose(direct, (X @ dW.reshape(5, -1).T).pow(2).sum(), rtol=1e-4)


def _conv_model():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))


@pytest.mark.parametrize("a_bits", [None, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_quantize_gptq_on_grid_and_beats_rtn(a_bits, act_order):
    model, x = _conv_model(), torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(w_bits=3, a_bits=a_bits, first_last_bits=None)
    q = quantize(model, "gptq", x, config=cfg, act_order=act_order, blocksize=32)
    r = quantize(model, "rtn", x, config=cfg)
    for _, m in quant_modules(q):
        assert torch.equal(m.weight, m.int_weight() * m.w_step) and _on_grid(m.weight, m.w_step, m.w_bits)
    ref = model.eval()(x)
    assert (q(x) - ref).pow(2).mean() < (r(x) - ref).pow(2).mean()


class _Tok(nn.Module):
    """Linear layers on [B, T, D] inputs, like a transformer MLP."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(12, 24), nn.Linear(24, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.down(F.gelu(self.up(x))) + x).mean(1)


def test_gptq_linear_on_token_inputs():
    torch.manual_seed(0)
    model = _Tok().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 6, 12, generator=g) @ torch.randn(12, 12, generator=g)
    cfg = QuantConfig(w_bits=3, a_bits=None, first_last_bits=None)
    q, r = quantize(model, "gptq", x, config=cfg), quantize(model, "rtn", x, config=cfg)
    assert all(torch.equal(m.weight, m.int_weight() * m.w_step) for _, m in quant_modules(q))
    ref = model(x)
    assert (q(x) - ref).pow(2).mean() < (r(x) - ref).pow(2).mean()
    q2 = quantize(model, "gptq", x, config=cfg, sequential=False)
    assert torch.isfinite(q2(x)).all()


def test_gptq_options_and_grouped_conv():
    x = torch.randn(8, 3, 8, 8)
    assert "gptq" in PTQ_METHODS
    with pytest.raises(TypeError, match="unknown option"):
        quantize(_conv_model(), "gptq", x, bogus=1)
    with pytest.raises(ValueError, match="group_size"):
        quantize(_conv_model(), "gptq", x, group_size=0)
    with pytest.raises(ValueError):
        quantize(_conv_model(), "gptq", x, blocksize=0)


def _grouped_layer(c_in=4, c_out=6, groups=2, k=2, seed=0):
    """A grouped conv QuantModule (8 bits, no activation quantizer) and correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, padding=1, groups=groups, bias=False)
    conv.weight.data = torch.randn(conv.weight.shape, generator=g)
    mix = torch.randn(c_in, c_in, generator=g)  # channels correlated within and across groups
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(6, c_in, 5, 5, generator=g))
    qm = quantize(nn.Sequential(conv), "rtn", x, config=QuantConfig(w_bits=3, a_bits=None, first_last_bits=None))[0]
    qm.weight.data = conv.weight.detach().clone()  # back to the full-precision weight (rtn rounded it)
    return conv, qm, x


@pytest.mark.parametrize("c_in,c_out,groups", [(4, 6, 2), (3, 6, 3), (4, 4, 4)])
def test_grouped_conv_hessian_is_the_brute_force_hessian_of_the_layer_error(c_in, c_out, groups):
    """H[g] = the autograd Hessian of E(W) = ‖conv(x, W) − conv(x, W0)‖² / N (N patch rows) for
    every row of group g, and E has no cross-row terms (depthwise: groups = channels)."""
    conv, qm, x = _grouped_layer(c_in, c_out, groups)
    H = input_hessian(nn.Sequential(qm), "0", qm, x, bs=4, device="cpu")
    n = conv.weight[0].numel()
    assert H.shape == (groups, n, n)
    W0, x64 = conv.weight.detach().double(), x.double()
    N = x.shape[0] * F.conv2d(x64, W0, padding=1, groups=groups)[0, 0].numel()

    def err(w):
        return (F.conv2d(x64, w.reshape(W0.shape), padding=1, groups=groups)
                - F.conv2d(x64, W0, padding=1, groups=groups)).pow(2).sum() / N

    brute = torch.autograd.functional.hessian(err, W0.reshape(-1)).reshape(c_out, n, c_out, n)
    per_group = c_out // groups
    for o in range(c_out):
        for o2 in range(c_out):
            want = H[o // per_group] if o == o2 else torch.zeros(n, n, dtype=torch.float64)
            torch.testing.assert_close(brute[o, :, o2, :], want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("act_order,group_size", [(False, None), (True, None), (False, 4)])
def test_grouped_conv_gptq_is_gptq_of_each_group_as_its_own_conv(act_order, group_size):
    """Reference: every conv group cut out as an ordinary conv on its own input channels, its H
    from the groups == 1 path, quantized with the matrix algorithm; and the result beats RTN."""
    conv, qm, x = _grouped_layer(4, 6, 2, k=3)
    opts = GPTQOptions(act_order=act_order, group_size=group_size, blocksize=5)
    rtn_w = qm.int_weight() * qm.w_step
    step = qm.w_step.clone()
    quantize_layer(qm, input_hessian(nn.Sequential(qm), "0", qm, x, 4, "cpu"), opts)
    for g in range(2):
        part = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        part.weight.data = conv.weight.detach()[3 * g:3 * g + 3].clone()
        ref = quantize(nn.Sequential(part), "rtn", x[:, 2 * g:2 * g + 2],
                       config=QuantConfig(w_bits=3, a_bits=None, first_last_bits=None))[0]
        H_g = input_hessian(nn.Sequential(ref), "0", ref, x[:, 2 * g:2 * g + 2], 4, "cpu")
        want, _ = gptq_quantize_matrix(part.weight.detach().reshape(3, -1), H_g, step[3 * g:3 * g + 3], 3,
                                       5, 0.01, act_order, group_size)
        assert torch.equal(qm.weight[3 * g:3 * g + 3].reshape(3, -1), want)
    assert torch.equal(qm.weight, qm.int_weight() * qm.w_step)

    def out_err(w):
        return (F.conv2d(x, w, padding=1, groups=2) - conv(x)).pow(2).sum()

    assert out_err(qm.weight) < out_err(rtn_w)


def test_gptq_on_a_depthwise_separable_model():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),   # depthwise
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),                     # pointwise
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4), nn.ReLU(),                      # grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)))
    x = torch.randn(32, 3, 8, 8)
    cfg = QuantConfig(w_bits=3, a_bits=None, first_last_bits=None)
    q, r = quantize(model, "gptq", x, config=cfg), quantize(model, "rtn", x, config=cfg)
    assert all(torch.equal(m.weight, m.int_weight() * m.w_step) for _, m in quant_modules(q))
    ref = model(x)
    assert (q(x) - ref).pow(2).mean() < (r(x) - ref).pow(2).mean()


@pytest.mark.parametrize("act_order", [False, True])
def test_grouped_steps_lie_on_each_groups_grid_and_help(act_order):
    """group_size g: every g processed columns get their own per-row step; the result lies on that
    grid, is exact for steps equal within a group, and beats per-channel steps on the layer output."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(32, 256, generator=g) * torch.linspace(0.2, 3, 32)[:, None]
    W = torch.randn(6, 32, generator=g) * torch.linspace(0.05, 2, 32)  # column scales differ a lot
    H = 2 * X @ X.T / X.shape[1]
    step = search_weight_step(W, 3)
    per_ch, s1 = gptq_quantize_matrix(W, H, step, 3)
    grouped, S = gptq_quantize_matrix(W, H, step, 3, group_size=8, act_order=act_order)
    assert s1.shape == (6, 1) and S.shape == (6, 32)
    codes = grouped / S
    assert torch.allclose(codes, codes.round(), atol=1e-5) and codes.abs().max() <= 4
    order = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(32)
    for k in range(4):  # one step per row within each group of 8 processed columns
        cols = order[8 * k : 8 * k + 8]
        assert torch.allclose(S[:, cols], S[:, cols[:1]].expand(-1, 8))
    err = lambda Q: (W @ X - Q @ X).pow(2).sum()  # noqa: E731
    assert err(grouped) < err(per_ch)


def test_grouped_gptq_model_roundtrip_and_export(tmp_path):
    from mergeq.deploy import check_exportable

    torch.manual_seed(0)
    model = _Tok().eval()
    x = torch.randn(16, 6, 12)
    cfg = QuantConfig(w_bits=3, a_bits=None, first_last_bits=None)
    q = quantize(model, "gptq", x, config=cfg, group_size=4)
    for _, m in quant_modules(q):
        assert m.w_step.shape == m.weight.shape
        assert torch.equal(m.weight, m.int_weight() * m.w_step)
    fresh = quantize(model, "rtn", x, config=cfg)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    assert len(check_exportable(q)) == len(quant_modules(q))  # grouped steps export (mergeq.deploy.groups)
