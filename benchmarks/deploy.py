"""Deployment benchmark: file sizes, ONNX Runtime vs PyTorch parity, CPU latency of the merged model.

    python benchmarks/deploy.py --preset quick --bits W8A8 W4A4 W3A3 W2A4 --threads 1

For each bit pair: the digits SHOT experts (``Pool(Config(preset=...))``) are quantized
with RTN and merged (``mergeq.merge``, the config's rounding); the merged model is written as a
packed integer checkpoint and as QDQ ONNX. Reported: file sizes against the FP32 checkpoint
(``checkpoint.save_model`` of one expert), top-1 agreement between onnxruntime and the PyTorch
fake-quant model on every target's test set, both models' accuracies (harmonic mean over
targets) and the median latency of ``--runs`` interleaved runs on one batch of ``--batch`` images for
PyTorch FP32 (the merged BN-folded float experts), PyTorch fake-quant and onnxruntime, all on
the CPU with ``--threads`` intra-op threads. Prints a Markdown table and writes it to --out
(default docs/results/deploy.md).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from mergeq.deploy import export_onnx, load_packed, ort_session, save_packed, weight_storage
from mergeq.eval import harmonic_mean
from mergeq.io import atomic_write_text
from mergeq.merge import merge
from mergeq.nn import fold_bn, quant_modules
from mergeq.checkpoint import save_model
from mergeq.experiments import Config, Pool
from mergeq.quant import parse_bits


@torch.no_grad()
def median_ms(fns: list, runs: int) -> list[float]:
    """Median milliseconds of each function, timed in interleaved rounds (the machine is shared,
    so load drifts: interleaving exposes every function to the same drift)."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1000 * statistics.median(ts) for ts in times]


@torch.no_grad()
def torch_predict(model: torch.nn.Module, x: torch.Tensor, bs: int = 256) -> np.ndarray:
    return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)]).numpy()


def ort_predict(sess, x: torch.Tensor, bs: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + bs].numpy()})[0].argmax(1) for i in range(0, len(x), bs)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", nargs="+", default=["W8A8", "W4A4", "W3A3", "W2A4"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for PyTorch and onnxruntime")
    ap.add_argument("--opset", type=int, default=21)
    ap.add_argument("--out", default="docs/results/deploy.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    exp = Pool(Config.from_dict({"preset": args.preset, "runtime": {"seed": args.seed},
                                 "ptq": {"methods": ["rtn"], "bits": args.bits}}))
    cfg, targets, tests = exp.cfg, exp.targets, exp.tests
    batch = tests[targets[0]].tensors[0][: args.batch]
    example = batch[:2]
    fp_merged = merge([fold_bn(exp.experts[d], example) for d in targets]).eval()
    fp_acc = harmonic_mean([float((torch_predict(fp_merged, tests[d].tensors[0]) == tests[d].tensors[1].numpy()).mean())
                            for d in targets])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        meta = exp.checkpoint_meta()
        fp_size = save_model(exp.experts[targets[0]], tmp / "fp32.safetensors", meta).stat().st_size
        for spec in args.bits:
            w_bits, a_bits = parse_bits(spec)
            qexperts = exp.quantize_experts("rtn", exp.qconfig((w_bits, a_bits)))
            merged = exp.merged(list(qexperts.values())).eval()
            packed = save_packed(merged, tmp / f"{spec}.safetensors",
                                 {**meta, "method": "rtn", "bits": spec, "domains": targets})
            reloaded = load_packed(packed)
            assert all(torch.equal(a.quantized_weight(), b.quantized_weight())
                       for (_, a), (_, b) in zip(quant_modules(merged), quant_modules(reloaded)))
            onnx_path = export_onnx(merged, tmp / f"{spec}.onnx", opset=args.opset)
            sess = ort_session(onnx_path, threads=args.threads)
            agree, acc_pt, acc_ort = {}, {}, {}
            for d in targets:
                x, y = tests[d].tensors
                p_pt, p_ort = torch_predict(merged, x), ort_predict(sess, x)
                agree[d] = float((p_pt == p_ort).mean())
                acc_pt[d], acc_ort[d] = float((p_pt == y.numpy()).mean()), float((p_ort == y.numpy()).mean())
            name = sess.get_inputs()[0].name
            storage = sorted({weight_storage(m.w_bits, args.opset) for _, m in quant_modules(merged)})
            rows.append({
                "spec": spec, "packed": packed.stat().st_size, "onnx": onnx_path.stat().st_size,
                "storage": "+".join(storage), "agree": agree,
                "acc_pt": harmonic_mean(list(acc_pt.values())), "acc_ort": harmonic_mean(list(acc_ort.values())),
            })
            rows[-1]["fp_ms"], rows[-1]["pt_ms"], rows[-1]["ort_ms"] = median_ms(
                [lambda: fp_merged(batch), lambda: merged(batch), lambda: sess.run(None, {name: batch.numpy()})],
                args.runs)
            print(f"{spec}: agreement {agree}, latency PyTorch FP32 {rows[-1]['fp_ms']:.1f} ms, fake-quant "
                  f"{rows[-1]['pt_ms']:.1f} ms, onnxruntime {rows[-1]['ort_ms']:.1f} ms")

    kib = lambda b: f"{b / 1024:.1f}"  # noqa: E731
    lines = [
        f"Merged digits model ({cfg.model.name} {cfg.model.kwargs}, preset `{args.preset}`, seed {args.seed}; "
        f"{len(targets)} SHOT experts quantized with RTN, first/last layer {cfg.ptq.first_last_bits} bits, merged "
        f"with `{cfg.merge.rounding}` rounding). Packed = `mergeq export --format safetensors`; ONNX = QDQ, opset "
        f"{args.opset}, weights stored as the listed integer type. Agreement = top-1 agreement of "
        f"onnxruntime {onnxruntime.__version__} with the PyTorch fake-quant model on each target's full test "
        f"set. Latency: median of {args.runs} interleaved runs, one batch of {args.batch} 3x32x32 images, CPU, "
        f"{args.threads} thread(s), torch {torch.__version__}, {platform.machine()} (shared machine: "
        "compare within this table only).",
        "",
        "| model | file KiB | × FP32 | ONNX KiB (weights) | "
        + " | ".join(f"agree {d} %" for d in targets)
        + " | acc hmean PyTorch / ORT % | PyTorch FP32 ms | PyTorch fake-quant ms | ORT ms |",
        "|---|---:|---:|---:|" + "---:|" * len(targets) + "---:|---:|---:|---:|",
        f"| FP32 | {kib(fp_size)} | 1.00 | – | " + " | ".join("–" for _ in targets)
        + f" | {100 * fp_acc:.1f} / – | – | – | – |",
    ]
    for r in rows:
        lines.append(
            f"| {r['spec']} packed | {kib(r['packed'])} | {r['packed'] / fp_size:.3f} | "
            f"{kib(r['onnx'])} ({r['storage']}) | "
            + " | ".join(f"{100 * r['agree'][d]:.2f}" for d in targets)
            + f" | {100 * r['acc_pt']:.1f} / {100 * r['acc_ort']:.1f} | {r['fp_ms']:.1f} | {r['pt_ms']:.1f} | "
            f"{r['ort_ms']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
