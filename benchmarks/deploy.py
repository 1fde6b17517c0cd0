"""Deployment benchmark: the merged low-bit model on onnxruntime's integer kernels, side by side.

    OMP_NUM_THREADS=1 python benchmarks/deploy.py --preset quick --out docs/results/deploy.md

Models (digits benchmark, the `--preset` adaptation and PTQ settings, `--seed`):

* ResNet-8 and ResNet-20 (``--archs``): SHOT experts quantized with ``--methods`` (default HDRQ;
  the main job's are ``rtn qdrop hdrq``) at each of ``--bits``
  (first/last layer 8 bits) on their own target's calibration split and merged (the config's
  rounding); the full-precision reference is the average of the BN-folded experts;
* the tiny ViT of benchmarks/configs/vit_digits.yaml (``--vit``): the experts' average
  quantized after merging (E-PMQ setting) with RTN W8A8 and with GPTQ W4 weight-only (groups
  of 32, for MatMulNBits).

Variants: PyTorch FP32 (the merged float model), PyTorch evaluated (the merged quantized model
as mergeq evaluates and reports it: the fake-quant model with the integer plan's
requantizations, ``mergeq.deploy.requant.deployed``; the fake-quant model alone, what mergeq
evaluated before issue 31, is reported beside it), and on onnxruntime's CPU provider: FP32 (``kernels="fp32"`` of the float model), QDQ
(``kernels="qdq"`` with the same plan, run in float), integer (``kernels="int8"``, requantization steps calibrated
on the union of the targets' calibration splits; ``target_cpu="any"``, the default, and
``"vnni"``) and the reference
``onnxruntime.quantization.quantize_static`` of the FP32 file (its default QDQ format, per-channel
int8 weights, uint8 activations, MinMax calibration on the same images; not for the ViT, whose
graph it fails on). For W4A8 rows also its W4A8 (int4 weights, the first and last layer int8 as
ours), accuracy only (onnxruntime has no int4 kernel; uint4 activations it refuses in QLinearConv).

Reported: file sizes; top-1 agreement of each onnxruntime model with the PyTorch model it came
from (QDQ with the evaluated model, integer with its PyTorch simulation ``IntegerSimulation``,
integer with the evaluated model, and integer with the fake-quant model alone, which shows what
modelling the requantizations changed) over every
target's full test set; where QEMU's user-mode emulator is installed, the agreement of both
integer files with the simulation on an emulated AVX2 CPU without VNNI (``Haswell-v4``; exact
arithmetic is checked there, speed is not); the harmonic mean of the targets' accuracies; the median latency of
``--runs`` interleaved rounds at batch 1 and 64 with one thread and all cores, and the speed
ratios. Writes Markdown to --out and the raw numbers next to it (.json).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from mergeq.deploy import IntegerSimulation, export_onnx, ort_session, plan_integer, save_packed
from mergeq.deploy.check import median_ms
from mergeq.deploy.emulate import qemu, run_emulated
from mergeq.deploy.requant import deployed
from mergeq.sysinfo import cpu
from mergeq.eval import harmonic_mean
from mergeq.io import atomic_write_text, write_json
from mergeq.merge import merge
from mergeq.nn import quant_modules
from mergeq.data_utils import take
from mergeq.experiments import Config, Pool, load_config
from mergeq.ptq import quantize
from mergeq.quant import parse_bits

VARIANTS = ("PyTorch FP32", "PyTorch evaluated", "ORT FP32", "ORT QDQ", "ORT integer", "ORT integer vnni",
            "ORT quantize_static")
EMULATED = 480  # test images (the first of each target's split) run on the emulated AVX2 CPU


@dataclass
class Case:
    """One merged model and everything measured about it."""

    name: str
    bits: str
    fp: nn.Module
    q: nn.Module
    calib: torch.Tensor
    tests: dict
    meta: dict
    files: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    acc: dict = field(default_factory=dict)
    agree: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)
    sim: nn.Module | None = None  # the PyTorch twin of the integer file
    evaluated: nn.Module | None = None  # the model mergeq reports: q with the plan's requantizations
    static: bool = True  # whether quantize_static handles the float model
    accuracy_only: dict = field(default_factory=dict)  # more onnxruntime files, not timed


@torch.no_grad()
def torch_predict(model: nn.Module, x: torch.Tensor, bs: int = 256) -> np.ndarray:
    return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)]).numpy()


def ort_predict(sess, x: torch.Tensor, bs: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + bs].numpy()})[0].argmax(1) for i in range(0, len(x), bs)])


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over calibration images."""

    def __init__(self, x: torch.Tensor, bs: int = 64) -> None:
        self.batches = iter([{"input": x[i:i + bs].numpy()} for i in range(0, len(x), bs)])

    def get_next(self):
        return next(self.batches, None)


def quantize_static_reference(fp_path: Path, out: Path, calib: torch.Tensor, int4_except: list[str] | None = None
                               ) -> Path:
    """Its default (8-bit weights), or 4-bit weights except the listed layers' (``int4_except``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib)
    extra = {} if int4_except is None else {"TensorQuantOverrides": {
        f"{n.replace('.', '_')}_w": [{"quant_type": QuantType.QInt8}] for n in int4_except}}
    quantize_static(str(fp_path), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8 if int4_except is None
                    else QuantType.QInt4, extra_options=extra)
    return out


def _calib(pool: Pool) -> torch.Tensor:
    """The union of the targets' calibration splits (the config's calibration size each)."""
    return torch.cat([pool.calib(d, pool.cfg.ptq.calib_size) for d in pool.targets])


def _meta(pool: Pool) -> dict:
    return pool.checkpoint_meta(domains=pool.targets, seed=pool.seed)


def cnn_cases(args, arch: str) -> list[Case]:
    pool = Pool(Config.from_dict({"preset": args.preset, "model": {"name": arch, "kwargs": {"width": 16}},
                                  "ptq": {"methods": args.methods, "bits": args.bits},
                                  "runtime": {"seed": args.seed, "threads": 1}}))
    targets = pool.targets
    fp = merge([pool.fold(pool.experts[d]) for d in targets]).eval()
    calib, cases = _calib(pool), []
    for method in args.methods:
        for spec in args.bits:
            qexperts = pool.quantize_experts(method, pool.qconfig(parse_bits(spec)))
            q = pool.merged(list(qexperts.values())).eval()
            cases.append(Case(f"{arch} {method.upper() if method != 'qdrop' else 'QDrop'}", spec, fp, q, calib,
                              pool.tests, {**_meta(pool), "method": method, "bits": spec}))
    return cases


def vit_cases(args) -> list[Case]:
    cfg = load_config(args.vit_config).updated({"preset": args.preset, "runtime.seed": args.seed,
                                                "runtime.threads": 1, "ptq.methods": ["rtn"], "ptq.bits": ["W8A8"]})
    pool = Pool(cfg)
    targets = pool.targets
    fp = merge([pool.experts[d] for d in targets]).eval()
    calib, meta = _calib(pool), _meta(pool)
    w8a8 = quantize(fp, "rtn", calib=calib, w_bits=8, a_bits=8, calib_size=len(calib))
    w4 = quantize(fp, "gptq", calib=calib, w_bits=4, a_bits=None, calib_size=len(calib), group_size=32)
    # quantize_static (1.32) fails on this graph: per-channel, it gives the 3-D input of a MatMul a per-axis
    # scale that QuantizeLinear refuses at run time; per-tensor, its Gemm bias quantization raises
    return [Case("vit_tiny RTN", "W8A8", fp, w8a8, calib, pool.tests, {**meta, "method": "rtn", "bits": "W8A8"},
                 static=False),
            Case("vit_tiny GPTQ g32", "W4", fp, w4, calib, pool.tests, {**meta, "method": "gptq", "bits": "W4"},
                 static=False)]


def export_all(case: Case, tmp: Path, fp_files: dict) -> None:
    key = id(case.fp)
    if key not in fp_files:  # one FP32 file and one quantize_static reference per float model
        fp_path = export_onnx(case.fp, tmp / f"fp{len(fp_files)}.onnx", kernels="fp32")
        fp_files[key] = (fp_path, quantize_static_reference(fp_path, tmp / f"qs{len(fp_files)}.onnx", case.calib)
                         if case.static else None)
    stem = tmp / f"{case.name}-{case.bits}".replace(" ", "_")
    plan = plan_integer(case.q, case.calib, calib_size=len(case.calib)) if case.bits != "W4" else None
    case.files = {"ORT FP32": fp_files[key][0],
                  "ORT QDQ": export_onnx(case.q, f"{stem}.qdq.onnx", meta=case.meta, plan=plan),
                  "ORT integer": export_onnx(case.q, f"{stem}.int8.onnx", meta=case.meta, kernels="int8", plan=plan),
                  "ORT integer vnni": export_onnx(case.q, f"{stem}.int8-vnni.onnx", meta=case.meta, kernels="int8",
                                                  plan=plan, target_cpu="vnni")}
    if fp_files[key][1] is not None:
        case.files["ORT quantize_static"] = fp_files[key][1]
    w_bits, a_bits = parse_bits(case.bits)
    if case.static and w_bits == 4 and a_bits == 8:  # its W4A8: int4 weights but the first and last layer's
        eights = [n for n, m in quant_modules(case.q) if m.w_bits == 8]
        case.accuracy_only = {"ORT quantize_static W4A8": quantize_static_reference(
            case.files["ORT FP32"], Path(f"{stem}.static-w4a8.onnx"), case.calib, eights)}
    case.sizes = {k: p.stat().st_size for k, p in case.files.items()}
    case.sizes["packed"] = save_packed(case.q, f"{stem}.packed.safetensors", case.meta).stat().st_size
    case.sim = IntegerSimulation(case.q, plan) if plan is not None else case.q
    case.evaluated = deployed(case.q, plan) if plan is not None else case.q


def evaluate(case: Case) -> None:
    sessions = {k: ort_session(p) for k, p in {**case.files, **case.accuracy_only}.items()}
    preds: dict[str, dict[str, np.ndarray]] = {k: {} for k in (*VARIANTS, *case.accuracy_only, "sim",
                                                                "fake-quant alone")}
    labels = {}
    for d, test in case.tests.items():
        x, y = take(test, range(len(test)))
        labels[d] = y.numpy()
        preds["PyTorch FP32"][d], preds["PyTorch evaluated"][d] = torch_predict(case.fp, x), torch_predict(
            case.evaluated, x)
        preds["fake-quant alone"][d] = torch_predict(case.q, x)
        preds["sim"][d] = torch_predict(case.sim, x)
        for k, sess in sessions.items():
            preds[k][d] = ort_predict(sess, x)
    everything = lambda k: np.concatenate([preds[k][d] for d in case.tests])  # noqa: E731
    case.acc = {k: harmonic_mean([float((preds[k][d] == labels[d]).mean()) for d in case.tests])
                for k in preds if preds[k]}
    pairs = {"QDQ vs evaluated": ("ORT QDQ", "PyTorch evaluated"), "integer vs simulation": ("ORT integer", "sim"),
             "integer vs evaluated": ("ORT integer", "PyTorch evaluated"),
             "integer vs fake-quant alone": ("ORT integer", "fake-quant alone"),
             "quantize_static vs FP32": ("ORT quantize_static", "PyTorch FP32")}
    case.agree = {k: float((everything(a) == everything(b)).mean()) for k, (a, b) in pairs.items() if preds[a]}
    case.agree["images"] = len(everything("sim"))
    if qemu() is not None and case.sim is not case.q:  # uint8 x int8 kernels (not weight-only MatMulNBits) on an
        # AVX2 CPU without VNNI: exact only where int8 cannot saturate
        per = EMULATED // len(case.tests)
        x = torch.cat([take(t, range(min(per, len(t))))[0] for t in case.tests.values()])
        with torch.no_grad():
            sim, evaluated = case.sim(x).numpy(), case.evaluated(x).numpy()
        outs = run_emulated([(case.files[k], x.numpy()) for k in ("ORT integer", "ORT integer vnni")])
        case.agree["integer vs evaluated, AVX2"] = float((outs[0].argmax(1) == evaluated.argmax(1)).mean())
        for k, out in zip(("integer", "integer vnni"), outs):
            case.agree[f"{k} vs simulation, AVX2"] = float((out.argmax(1) == sim.argmax(1)).mean())
            case.agree[f"{k} max diff, AVX2"] = float(np.abs(out - sim).max())
        case.agree["images AVX2"] = len(x)


def time_all(case: Case, runs: int, threads: int, batch: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    x = take(next(iter(case.tests.values())), range(batch))[0]
    xn = x.numpy()
    fns = {"PyTorch FP32": lambda: case.fp(x), "PyTorch evaluated": lambda: case.evaluated(x)}
    for k, path in case.files.items():
        sess = ort_session(path, threads=threads)
        fns[k] = (lambda s: lambda: s.run(None, {"input": xn}))(sess)
    with torch.no_grad():
        return median_ms(fns, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", nargs="+", default=["W8A8", "W4A8", "W4A4"])
    ap.add_argument("--archs", nargs="*", default=["resnet8", "resnet20"])
    ap.add_argument("--methods", nargs="+", default=["hdrq"], help="PTQ methods of the CNN merges")
    ap.add_argument("--vit", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--vit-config", default="benchmarks/configs/vit_digits.yaml")
    ap.add_argument("--runs", type=int, default=30, help="timed rounds per setting (batch 1: 10x as many)")
    ap.add_argument("--out", default="docs/results/deploy.md")
    args = ap.parse_args()
    all_cores = os.cpu_count() or 1
    cases = [c for arch in args.archs for c in cnn_cases(args, arch)] + (vit_cases(args) if args.vit else [])
    with tempfile.TemporaryDirectory() as tmp:
        fp_files: dict = {}
        for case in cases:
            export_all(case, Path(tmp), fp_files)
            evaluate(case)
            for threads in sorted({1, all_cores}):
                for batch in (1, 64):
                    case.ms[f"b{batch} t{threads}"] = time_all(case, args.runs * (10 if batch == 1 else 1),
                                                               threads, batch)
            print(f"{case.name} {case.bits}: accuracy {case.acc}, agreement {case.agree}, ms {case.ms}", flush=True)
    lines = report(cases, args, all_cores)
    atomic_write_text(args.out, lines)
    write_json(Path(args.out).with_suffix(".json"), [
        {k: getattr(c, k) for k in ("name", "bits", "sizes", "acc", "agree", "ms")} for c in cases])
    print(lines)


def report(cases: list[Case], args, all_cores: int) -> str:
    kib = lambda b: "–" if b is None else f"{b / 1024:.0f}"  # noqa: E731
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    c0 = cpu()
    out = [
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, {platform.machine()}, {all_cores} cores "
        f"(shared machine), CPU {c0['model']} ({', '.join(c0['flags'])}); preset `{args.preset}`, seed {args.seed}; "
        f"accuracies are harmonic means over the targets' test sets ({cases[0].agree['images']} images for the "
        f"agreements; {cases[0].agree.get('images AVX2', 0)} on the emulated AVX2 CPU without VNNI, QEMU "
        "`Haswell-v4`). `integer`: `--target-cpu any` (the default), `integer vnni`: `--target-cpu vnni`.",
        "",
        "| model | bits | KiB FP32 / QDQ / integer / static / packed | acc PyTorch FP32 / evaluated / fake-quant alone "
        "% | acc ORT QDQ / integer / quantize_static % | acc quantize_static W4A8 % | agree QDQ vs evaluated % | agree "
        "integer vs simulation % | agree integer vs evaluated % | agree integer vs fake-quant alone % | AVX2 agree "
        "integer / integer vnni vs simulation % | AVX2 agree integer vs evaluated % | AVX2 max logit diff integer / "
        "integer vnni |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        s, a, g = c.sizes, c.acc, c.agree
        out.append(
            f"| {c.name} | {c.bits} | {kib(s['ORT FP32'])} / {kib(s['ORT QDQ'])} / {kib(s['ORT integer'])} / "
            f"{kib(s.get('ORT quantize_static'))} / {kib(s['packed'])} | {pct(a['PyTorch FP32'])} / "
            f"{pct(a['PyTorch evaluated'])} / {pct(a['fake-quant alone'])} | {pct(a['ORT QDQ'])} / {pct(a['ORT integer'])} / "
            f"{pct(a.get('ORT quantize_static'))} | {pct(a.get('ORT quantize_static W4A8'))} | "
            f"{pct(g['QDQ vs evaluated'])} | "
            f"{pct(g['integer vs simulation'])} | {pct(g['integer vs evaluated'])} | "
            f"{pct(g['integer vs fake-quant alone'])} | "
            f"{pct(g.get('integer vs simulation, AVX2'))} / {pct(g.get('integer vnni vs simulation, AVX2'))} | "
            f"{pct(g.get('integer vs evaluated, AVX2'))} | "
            f"{g.get('integer max diff, AVX2', float('nan')):.3g} / {g.get('integer vnni max diff, AVX2', float('nan')):.3g} |")
    out += ["", f"Latency, ms (median of {args.runs} interleaved rounds at batch 64, {10 * args.runs} at batch 1). "
            "Ratios: the other model's time over ORT integer's (> 1: ORT integer is faster).", "",
            "| model | bits | batch | threads | " + " | ".join(VARIANTS) + " | × PyTorch FP32 | × ORT FP32 | "
            "× quantize_static | × ORT integer vnni |", "|---|---|---:|---:|" + "---:|" * (len(VARIANTS) + 4)]
    for c in cases:
        for key, ms in c.ms.items():
            batch, threads = (int(t[1:]) for t in key.split())
            ratio = lambda k: "–" if k not in ms else f"{ms[k] / ms['ORT integer']:.2f}"  # noqa: E731
            out.append(f"| {c.name} | {c.bits} | {batch} | {threads} | " + " | ".join(
                f"{ms[k]:.2f}" if k in ms else "–" for k in VARIANTS)
                + f" | {ratio('PyTorch FP32')} | {ratio('ORT FP32')} | {ratio('ORT quantize_static')} | "
                f"{ratio('ORT integer vnni')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
