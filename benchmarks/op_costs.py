"""CPU time of the element-wise building blocks of a reconstruction step, side by side.

    PYTHONPATH=src python benchmarks/op_costs.py --threads 1

On one activation tensor of a ResNet-8 block (32 x 16 x 32 x 32 floats, 2 MB): the QDrop mask
and blend as the old loop did them (``torch.rand`` < p, ``torch.where``) and as the new one
does (random bits, ``lerp``); gathering a mini-batch by advanced indexing and by
``index_select``; and LSQ fake quantization forward + backward as an autograd chain, as
PyTorch's fused ``_fake_quantize_learnable_per_tensor_affine`` and as ``lsq_fake_quant``.
Each number is the minimum over five rounds of the mean CPU time of 50 calls (microseconds).
"""
from __future__ import annotations

import argparse
import time

import torch

from mergeq.quant import round_ste
from mergeq.quant.fakequant import bernoulli_mask, lsq_fake_quant


def cpu_us(fn, n: int = 50, rounds: int = 5) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t) / n)
    return 1e6 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, 32, 32, generator=g).relu()
    y = torch.randn(x.shape, generator=g)
    pool = torch.randn(512, 16, 32, 32, generator=g)
    idx = torch.randint(512, (32,), generator=g)
    buf = torch.empty_like(x)
    bool_mask = torch.rand(x.shape, generator=g) < 0.5
    float_mask = bool_mask.float()
    grad = torch.randn(x.shape, generator=g)
    step = torch.tensor(0.1, requires_grad=True)
    zp = torch.tensor(0.0)

    def chain():  # the autograd chain: LSQ gradient scale, STE rounding, clamp, rescale
        step.grad = None
        s = ((step - step * 0.01).detach() + step * 0.01).abs().clamp_min(1e-8)
        (torch.clamp(round_ste(x / s), 0, 15) * s).backward(grad)

    def torch_fused():
        step.grad = None
        torch._fake_quantize_learnable_per_tensor_affine(x, step.view(1), zp.view(1), 0, 15, 0.01).backward(grad)

    def ours():
        step.grad = None
        lsq_fake_quant(x, step, 0, 15, 0.01).backward(grad)

    rows = [
        ("QDrop mask: torch.rand(...) < 0.5", lambda: torch.rand(x.shape) < 0.5),
        ("QDrop mask: random bits (bernoulli_mask)", lambda: bernoulli_mask(x, 0.5)),
        ("blend: torch.where(random bool mask, a, b)", lambda: torch.where(bool_mask, x, y)),
        ("blend: torch.lerp(b, a, 0/1 float mask)", lambda: torch.lerp(y, x, float_mask)),
        ("batch: pool[idx]", lambda: pool[idx]),
        ("batch: index_select(pool, 0, idx, out=buffer)", lambda: torch.index_select(pool, 0, idx, out=buf)),
        ("LSQ fwd+bwd: autograd chain (old ActQuantizer)", chain),
        ("LSQ fwd+bwd: torch._fake_quantize_learnable_per_tensor_affine", torch_fused),
        ("LSQ fwd+bwd: lsq_fake_quant (one autograd node)", ours),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), tensor {tuple(x.shape)}\n")
    print("| operation | CPU µs |\n|---|---:|")
    for name, fn in rows:
        print(f"| {name} | {cpu_us(fn):.0f} |")


if __name__ == "__main__":
    main()
