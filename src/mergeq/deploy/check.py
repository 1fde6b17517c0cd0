"""After an ``int8`` export, on this machine: does onnxruntime compute what mergeq evaluated, and
is it faster than onnxruntime's FP32 model of the same weights?

``mergeq export --kernels int8`` prints this (:meth:`ExportCheck.report`): the integer model's
top-1 agreement with its PyTorch simulation (100% wherever the kernels are exact) and with the
model that mergeq evaluated, the fake-quant model with the plan's requantizations
(:func:`~.requant.deployed`; below :data:`MIN_AGREEMENT` a warning; for dense outputs, logits
``[N, C, H, W]``, the agreements are over every pixel's argmax), and the median latency at
batch 64 on one thread of the integer file against the FP32 twin (the quantized weights as
float layers, ``kernels="fp32"``) and the QDQ form of the same model with the same plan (run in
float, the evaluated model to float rounding), measured side by side on this CPU. ``--kernels
auto`` keeps the integer file where it is exact here, agrees with the evaluated model on at
least :data:`MIN_AGREEMENT` and is faster than the QDQ form, else the QDQ form
(:meth:`ExportCheck.choice`).
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn.fold import set_module
from ..nn.qmodule import quant_modules
from ..sysinfo import cpu
from .integer import IntegerPlan, IntegerSimulation
from .requant import deployed

MIN_AGREEMENT = 0.995  # issue 31: the integer file predicts what mergeq reports


@dataclass
class ExportCheck:
    images: int
    agree_simulation: float  # top-1 agreement of onnxruntime's integer model with IntegerSimulation
    max_diff_simulation: float  # largest output difference to IntegerSimulation
    agree_model: float  # ... with the fake-quant model mergeq evaluated
    ms_int8: float  # median latency, batch 64, one thread
    ms_fp32: float
    ms_qdq: float
    cpu: str
    dense: bool = False  # per-pixel predictions (logits [N, C, H, W]): agreements are over pixels

    @property
    def speedup(self) -> float:
        return self.ms_fp32 / self.ms_int8

    def choice(self) -> tuple[str, str]:
        """``("int8" | "qdq", why)``: the faster of the two forms that compute the evaluated model here."""
        if self.agree_simulation < 1.0:
            return "qdq", "the integer kernels are not exact on this CPU"
        if self.agree_model < MIN_AGREEMENT:
            return "qdq", (f"the integer model agrees with the evaluated model on {100 * self.agree_model:.2f}% "
                           f"{'of pixels' if self.dense else 'of images'}, under {100 * MIN_AGREEMENT:.1f}%")
        if self.ms_int8 <= self.ms_qdq:
            return "int8", f"exact here and {self.ms_qdq / self.ms_int8:.2f}x as fast as the QDQ form"
        return "qdq", f"the QDQ form is {self.ms_int8 / self.ms_qdq:.2f}x as fast as the integer kernels on this CPU"

    def report(self) -> tuple[list[str], list[str]]:
        """``(lines, warnings)`` in plain words."""
        of = " of pixels" if self.dense else ""
        lines = [f"integer model on this CPU ({self.cpu}), {self.images} calibration images: "
                 f"agrees with its simulation on {100 * self.agree_simulation:.2f}%{of} "
                 f"(max output difference {self.max_diff_simulation:.2g}), with the evaluated fake-quant model "
                 f"on {100 * self.agree_model:.2f}%{of}",
                 f"latency at batch 64, 1 thread: integer {self.ms_int8:.2f} ms, onnxruntime FP32 of the same "
                 f"weights {self.ms_fp32:.2f} ms ({self.speedup:.2f}x), QDQ form {self.ms_qdq:.2f} ms"]
        warnings = []
        if self.agree_simulation < 1.0:
            warnings.append("onnxruntime's integer kernels on this CPU do not compute the simulated model "
                            "exactly; export with --target-cpu any (exact on every x86 kind)")
        if self.agree_model < MIN_AGREEMENT:
            what = "pixels" if self.dense else "images"
            warnings.append(f"the integer model agrees with the evaluated model on less than "
                            f"{100 * MIN_AGREEMENT:.1f}% of {what}; deploy --kernels qdq (float kernels, the "
                            f"evaluated model)")
        if self.speedup < 1.0:
            hint = ("--target-cpu native (this CPU has VNNI: int8 weights everywhere)"
                    if cpu()["vnni"] else "--kernels qdq or the FP32 model (this CPU has no VNNI)")
            warnings.append(f"the integer model is slower than onnxruntime's FP32 model here; consider {hint}")
        return lines, warnings


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose QuantModules are plain Conv2d/Linear layers with the quantized
    weights (activations unquantized): the same model on onnxruntime's FP32 kernels."""
    twin = copy.deepcopy(model).eval()
    for name, m in quant_modules(twin):
        w = m.quantized_weight().detach()
        layer: nn.Module
        if m.kind == "conv":
            layer = nn.Conv2d(w.shape[1] * m.conv_kwargs["groups"], w.shape[0], tuple(w.shape[2:]),
                              bias=m.bias is not None, **m.conv_kwargs)
        else:
            layer = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        layer.weight.data = w.clone()
        if m.bias is not None:
            layer.bias.data = m.bias.detach().clone()
        set_module(twin, name, layer)
    return twin


def median_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds of each function over ``rounds`` interleaved rounds after one warm-up
    call each (a shared machine's load drifts: interleaving exposes every function to it alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def check_int8_export(model: nn.Module, path: str | Path, plan: IntegerPlan, images: torch.Tensor,
                      rounds: int = 10, opset: int | None = None) -> ExportCheck:
    """Run the int8 file at ``path`` on ``images`` with onnxruntime here and compare (see module doc);
    ``opset``: the QDQ form's (default: :func:`~.onnx_export.to_onnx`'s)."""
    from .onnx_export import export_onnx, ort_session

    model = model.eval()
    images = images.float().cpu()
    sess = ort_session(path)
    out = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: images[i:i + 256].numpy()})[0]
                          for i in range(0, len(images), 256)])
    sim = IntegerSimulation(model, plan)(images).numpy()
    ref = deployed(model, plan)(images).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = ort_session(export_onnx(float_twin(model), Path(tmp) / "fp32.onnx", kernels="fp32",
                                       input_shape=plan.input_shape))
        qdq = ort_session(export_onnx(model, Path(tmp) / "qdq.onnx", input_shape=plan.input_shape, plan=plan,
                                      **({} if opset is None else {"opset": opset})))
        x = images[:64].repeat(-(-64 // len(images)), *[1] * (images.dim() - 1))[:64].numpy()
        ms = median_ms({k: (lambda s: lambda: s.run(None, {s.get_inputs()[0].name: x}))(s)
                        for k, s in {"int8": sess, "fp32": fp32, "qdq": qdq}.items()}, rounds)
    return ExportCheck(len(images), float((out.argmax(1) == sim.argmax(1)).mean()), float(np.abs(out - sim).max()),
                       float((out.argmax(1) == ref.argmax(1)).mean()), ms["int8"], ms["fp32"], ms["qdq"],
                       cpu()["model"], dense=out.ndim > 2)
