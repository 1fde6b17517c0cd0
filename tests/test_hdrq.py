"""HDRQ's noise samplers (Eq. 8-9), distance term (Eq. 10) and option handling."""
import pytest
import torch

from mergeq.ptq import quantize
from mergeq.ptq.hdrq import distance_penalty, warmup_cosine
from mergeq.ptq.noise import noisy_weight, residuals, sample_empirical, sample_uniform
from mergeq.quant import search_weight_step

from .conftest import randomize_bn, tiny_resnet


pytestmark = pytest.mark.usefixtures("one_thread")


def _w(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 8, 3, 3, generator=g)
    w[:, 0] += 0.3 * torch.sign(w[:, 0])  # some asymmetry so the residual histogram is not flat
    return w, search_weight_step(w, 3)


@pytest.mark.parametrize("kind", ["empirical", "uniform"])
def test_noise_within_half_step_and_centred(kind):
    w, step = _w()
    torch.manual_seed(0)
    eps = torch.stack([sample_empirical(w, step, 3) if kind == "empirical" else sample_uniform(w, step)
                       for _ in range(50)])
    assert (eps.abs() <= step / 2 + 1e-7).all()
    assert abs(float((eps / step).mean())) < 0.01


def test_empirical_sampler_reproduces_residual_histogram():
    w, step = _w(1)
    r, inside = residuals(w, step, 3)
    r = r[inside]
    torch.manual_seed(0)
    s = torch.cat([(sample_empirical(w, step, 3) / step)[inside] for _ in range(20)])
    grid = torch.linspace(-0.5, 0.5, 101)
    cdf = lambda v: (v[None, :] <= grid[:, None]).float().mean(1)  # noqa: E731
    ks = float((cdf(r) - cdf(s)).abs().max())
    ks_uniform = float((cdf(r) - (grid + 0.5)).abs().max())
    assert ks < 0.03, ks
    assert ks < ks_uniform / 2  # it follows this tensor's residuals, not just U[-1/2, 1/2]


def test_noisy_weight_clamps_and_passes_gradient():
    w, step = _w()
    w = w.clone().requires_grad_(True)
    out = noisy_weight(w, step, 3, "uniform")
    lo, hi = -4 * step, 3 * step
    assert (out >= lo - step / 2).all() and (out <= hi + step / 2).all()
    clipped = (w.detach() >= hi) | (w.detach() <= lo)
    assert torch.equal(out[clipped], torch.maximum(torch.minimum(w, hi), lo).detach()[clipped])
    out.sum().backward()
    assert torch.equal(w.grad, (~clipped).float())


@pytest.mark.parametrize("squared", [False, True])
def test_distance_gradient(squared):
    w, w_src = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    distance_penalty(w, w_src, 0.05, squared).backward()
    d = (w - w_src).detach()
    expect = 2 * 0.05 * d if squared else 0.05 * d / d.norm()
    assert torch.allclose(w.grad, expect, atol=1e-7)


def test_warmup_cosine():
    assert warmup_cosine(0, 100) == pytest.approx(1e-3)
    assert warmup_cosine(20, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 100) == pytest.approx(0.0, abs=1e-12)


def test_distance_needs_source_and_options():
    torch.manual_seed(0)
    model, x = randomize_bn(tiny_resnet()), torch.randn(16, 3, 16, 16)
    with pytest.raises(ValueError, match="source"):
        quantize(model, "hdrq", x, iters=2)
    with pytest.raises(ValueError, match="noise must be"):
        quantize(model, "hdrq", x, source=model, iters=2, noise="gaussian")
    for opts in ({"noise": "uniform", "dist_squared": True}, {"noise": False, "distance": False}):
        quantize(model, "hdrq", x, source=model if opts.get("distance", True) else None,
                 iters=3, batch_size=4, **opts)


def test_distance_pulls_toward_source():
    torch.manual_seed(0)
    model, x = randomize_bn(tiny_resnet()), torch.randn(16, 3, 16, 16)
    src = randomize_bn(tiny_resnet(), seed=1)  # same architecture, other weights
    dist = {}
    for lam in (0.0, 5.0):
        q = quantize(model, "hdrq", x, source=src, iters=40, batch_size=8, dist_lambda=lam, lr=1e-2)
        dist[lam] = float(sum(float((q.get_submodule(n).weight - src_fold.detach()).norm()) for n, src_fold in _folded(src, x)))
    assert dist[5.0] < dist[0.0]


def _folded(src, x):
    from mergeq.nn import fold_bn
    f = fold_bn(src, x[:2])
    return [(n, m.weight) for n, m in f.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_relative_distance_gradient_is_lambda_times_the_reconstruction_gradient():
    from mergeq.ptq.hdrq import HDRQHooks, HDRQOptions
    torch.manual_seed(0)
    layer, src = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    layer.act_quant = None  # what finish() reads of a QuantModule
    hooks = HDRQHooks(HDRQOptions(dist_lambda=0.2, dist_relative=True), torch.nn.ModuleDict({"fc": src}))
    (w,) = hooks.setup([("fc", layer)])
    target = torch.randn(4, 6)
    ((w - target) ** 2).sum().backward()
    g = 2 * (w - target).detach()
    d = (w - src.weight).detach()
    assert torch.allclose(w.grad, g + 0.2 * g.norm() * d / d.norm(), atol=1e-6)
    assert float(hooks.penalty(0, 10, [("fc", layer)])) == 0.0  # the term acts through the gradient only
    hooks.finish([("fc", layer)])
    w.grad = None
    ((w - target) ** 2).sum().backward()
    assert torch.allclose(w.grad, g, atol=1e-6)  # the hook is gone after the unit


def test_expert_bn_anchor_folds_the_sources_weights_with_the_experts_bn():
    from mergeq.nn import fold_bn
    from mergeq.ptq.hdrq import expert_bn_anchor
    x = torch.randn(4, 3, 16, 16)
    src, expert = randomize_bn(tiny_resnet(), seed=1), randomize_bn(tiny_resnet(), seed=2)
    anchor = expert_bn_anchor(src, expert, x[:2])
    bn = expert[1]  # the stem's BN: the anchor's stem is the source's conv times the expert's γ/σ
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(anchor[0].weight, src[0].weight * scale.reshape(-1, 1, 1, 1), atol=1e-6)
    assert torch.allclose(anchor[0].bias, bn.bias - bn.running_mean * scale, atol=1e-6)
    assert not torch.allclose(anchor[0].weight, fold_bn(src, x[:2])[0].weight, atol=1e-3)
    for a, b in zip(expert_bn_anchor(src, src, x[:2]).state_dict().values(), fold_bn(src, x[:2]).state_dict().values()):
        assert torch.equal(a, b)  # the expert's own BN is the source's: the paper's anchor
    q = quantize(expert, "hdrq", x, source=src, iters=2, batch_size=4, anchor="expert_bn", dist_relative=True)
    assert q.mergeq_meta["method"] == "hdrq"


@pytest.mark.parametrize("opts, match", [({"anchor": "expert"}, "anchor must be one of"),
                                         ({"dist_relative": True, "dist_squared": True}, "dist_squared")])
def test_bad_distance_options_are_refused_before_any_work(opts, match):
    from mergeq.errors import ConfigError
    from mergeq.ptq.base import check_options
    with pytest.raises(ConfigError, match=match):
        check_options("hdrq", opts)
