"""Kernel launches per reconstruction step, eager and as a CUDA graph (issue 30, item 3).

A GPU step that is launch-bound costs about (host time per launched op) x (ops per step), not
FLOPs. This counts, on the CPU, the ATen operators one steady-state step dispatches (forward,
backward and Adam; a ``TorchDispatchMode`` sees each, as a GPU would launch each: an upper
bound on the kernels, since views and empty tensors launch none), summed over the units of
the probe network of ``gpu_check.py`` (torchvision's ResNet-50 layers; the count does not depend
on the image size, so it runs at 32 px, batch 4), next to a plain FP forward+backward of the same
units. It also counts the host-side calls of a graphed step on the logical CUDA device
(``tests/logical_device.py``): what the loop dispatches outside the replay (the step's scalars
filled in place) plus the replay itself.

    PYTHONPATH=src python benchmarks/step_launches.py                 # every method
    PYTHONPATH=src python benchmarks/step_launches.py --methods hdrq --json out.json
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bottleneck_resnet import ResNet  # noqa: E402
from recon_cost import plain_loss, run_unit  # noqa: E402

METHODS = ("adaround", "brecq", "qdrop", "hdrq", "ttaq")
SKIP = {"aten.detach.default", "aten.view.default", "aten._unsafe_view.default", "aten.alias.default",
        "aten.t.default", "aten.expand.default", "aten.reshape.default", "aten.select.int", "aten.slice.Tensor",
        "aten.split.Tensor", "aten.split_with_sizes.default", "aten.unsqueeze.default", "aten.squeeze.dim",
        "aten.empty.memory_format", "aten.empty_like.default", "aten.as_strided.default", "aten.permute.default",
        "aten.lift_fresh.default", "aten._to_copy.default"}  # views and allocations launch no kernel


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name not in SKIP:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def counted(fn) -> Counter:
    with Count() as c:
        fn()
    return c.ops


def per_step(fn_n, n1: int, n2: int) -> tuple[float, Counter]:
    """Ops of a steady-state step: the count of ``fn_n(n2)`` minus that of ``fn_n(n1)``, per step."""
    a, b = counted(lambda: fn_n(n1)), counted(lambda: fn_n(n2))
    diff = b.copy()
    diff.subtract(a)
    return (sum(b.values()) - sum(a.values())) / (n2 - n1), diff


def setup(size: int = 32, batch: int = 4, n_calib: int = 16):
    from mergeq.nn import calibrate_activations, fold_bn, prepare
    from mergeq.nn.blocks import partition
    from mergeq.ptq.recon import capture
    from mergeq.quant.config import QuantConfig

    torch.manual_seed(0)
    model = ResNet().eval()
    calib = torch.randn(n_calib, 3, size, size)
    fp = fold_bn(model, calib[:2]).requires_grad_(False)
    q = prepare(model, QuantConfig(w_bits=4, a_bits=4), calib[:2])
    calibrate_activations(q, calib)

    def units(method: str):
        for name, unit in partition(q, calib[:2], layerwise=method == "adaround"):
            x_q, _ = capture(q, name, calib, 64, "cpu", output=False)
            x_fp, y_fp = capture(fp, name, calib, 64, "cpu", output=True)
            yield name, unit, (x_q, x_fp, y_fp)
    return fp, units, batch


def fp_ops(fp_unit, x, y, batch: int) -> float:
    unit = copy.deepcopy(fp_unit).requires_grad_(True)

    def run(n: int) -> None:
        for _ in range(n):
            unit.zero_grad(set_to_none=True)
            plain_loss(unit(x[:batch]), y[:batch]).backward()
    return per_step(run, 2, 6)[0]


def graphed_host_calls(method: str, name: str, unit, data, batch: int, fp) -> float:
    """Torch calls per graphed step that reach the host outside the replay, on the logical GPU
    (there a replay runs the step again: its calls, which a GPU replay does not make, are left out)."""
    from mergeq.ptq.graphs import StepGraph
    from tests.logical_device import LogicalCuda

    with LogicalCuda() as h:
        unit_c, fp_c = copy.deepcopy(unit).cuda(), copy.deepcopy(fp).cuda()
        replay = StepGraph.replay  # the harness's emulation, patched in by LogicalCuda
        inside = [0]

        def counted(self):
            start = h.calls
            out = replay(self)
            inside[0] += h.calls - start
            return out

        calls = []
        with mock.patch.object(StepGraph, "replay", counted):
            for n in (20, 30):
                before, inside[0] = h.calls, 0
                run_unit(method, name, copy.deepcopy(unit_c), data, n, batch, fp_c, "cuda")
                calls.append(h.calls - before - inside[0])
    return (calls[1] - calls[0]) / 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fp, units, batch = setup()
    res = {}
    print("| method | units | ATen ops per step, eager (Σ units) | per plain FP f+b (Σ units) | ratio "
          "| torch calls per graphed step outside the replay (Σ units, logical GPU) |\n|---|---:|---:|---:|---:|---:|")
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        eager = plain = host = 0.0
        n_units = 0
        top: Counter = Counter()
        for name, unit, data in units(method):
            ops, diff = per_step(lambda n: run_unit(method, name, copy.deepcopy(unit), data, n, batch, fp), 20, 30)
            eager += ops
            top.update({k: v / 10 for k, v in diff.items() if v > 0})
            plain += fp_ops(fp.get_submodule(name), data[1], data[2], batch)
            host += graphed_host_calls(method, name, unit, data, batch, fp)
            n_units += 1
        res[method] = {"units": n_units, "eager_ops": eager, "fp_ops": plain, "graphed_host_calls": host,
                       "top_ops": dict(top.most_common(12))}
        print(f"| {method} | {n_units} | {eager:.0f} | {plain:.0f} | {eager / plain:.1f} | {host:.0f} |", flush=True)
    if args.json:
        from mergeq.io import write_json

        write_json(args.json, res)  # atomically


if __name__ == "__main__":
    main()
