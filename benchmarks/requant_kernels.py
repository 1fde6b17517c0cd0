"""Which integer convolution can carry a residual path without an 8-bit rounding? (issue 31 item 1)

    OMP_NUM_THREADS=1 python benchmarks/requant_kernels.py

The int8 export rounds a convolution's output to 8 bits (QLinearConv, uint8 out). The one ONNX
integer convolution with a wide output is ConvInteger (int32 out; then Cast, the accumulator
scale and the float bias). This times one 3 x 3 convolution of each kind at batch 64 on one
thread, interleaved (median of ``--runs`` rounds after a warm-up), against the float Conv, at
the channel widths and sizes of the digits ResNets. Prints a Markdown table with the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mergeq.sysinfo import cpu

SHAPES = ((16, 32), (32, 16), (64, 8))  # (channels, height = width)


def session(kind: str, c: int, h: int, rng: np.random.Generator) -> ort.InferenceSession:
    """One 3 x 3 convolution, ``kind`` in {qlinear, convinteger, float}, input float [N, c, h, h]."""
    w = rng.integers(-7, 8, (c, c, 3, 3)).astype(np.int8)
    c_ = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [c_("sx", np.float32(0.02)), c_("zx", np.uint8(128))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"])]
    if kind == "qlinear":
        inits += [c_("w", w), c_("sw", np.full(c, 0.01, np.float32)), c_("zw", np.zeros(c, np.int8)),
                  c_("sy", np.float32(0.05)), c_("zy", np.uint8(128)), c_("bq", np.zeros(c, np.int32))]
        nodes += [helper.make_node("QLinearConv", ["xq", "sx", "zx", "w", "sw", "zw", "sy", "zy", "bq"], ["yq"],
                                   pads=[1] * 4),
                  helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    elif kind == "convinteger":
        inits += [c_("w", w), c_("acc", np.full((1, c, 1, 1), 2e-4, np.float32)),
                  c_("b", np.zeros((1, c, 1, 1), np.float32))]
        nodes += [helper.make_node("ConvInteger", ["xq", "w", "zx"], ["acc32"], pads=[1] * 4),
                  helper.make_node("Cast", ["acc32"], ["accf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["accf", "acc"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    else:
        inits = [c_("wf", w.astype(np.float32))]
        nodes = [helper.make_node("Conv", ["x", "wf"], ["y"], pads=[1] * 4)]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    kinds = ("qlinear", "convinteger", "float")
    print(f"onnxruntime {ort.__version__}, CPU {cpu()['model']} ({', '.join(cpu()['flags'])}), one thread, "
          f"batch {args.batch}, median of {args.runs} interleaved rounds\n")
    print("| channels | size | QLinearConv ms | ConvInteger + scale ms | float Conv ms | ConvInteger / QLinearConv "
          "| ConvInteger / float |\n|---:|---:|---:|---:|---:|---:|---:|")
    for c, h in SHAPES:
        x = rng.normal(size=(args.batch, c, h, h)).astype(np.float32)
        sessions = {k: session(k, c, h, rng) for k in kinds}
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for s in sessions.values():
            s.run(None, {"x": x})
        for _ in range(args.runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[k].append(1e3 * (time.perf_counter() - t))
        ms = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {c} | {h} | {ms['qlinear']:.2f} | {ms['convinteger']:.2f} | {ms['float']:.2f} | "
              f"{ms['convinteger'] / ms['qlinear']:.1f} | {ms['convinteger'] / ms['float']:.1f} |")


if __name__ == "__main__":
    main()
