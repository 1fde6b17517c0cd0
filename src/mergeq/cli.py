"""``mergeq`` command line: run the pipeline, train the source, adapt experts, show the data."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from .config import PRESET_NAMES, RunConfig


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESET_NAMES, default=None, help="size of the run (default: default)")
    p.add_argument("--seed", type=int, default=None, help="seed for data splits, training and PTQ (default 0)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--targets", type=_csv, default=None, help="comma-separated target domains (default: all)")
    p.add_argument("--cache-dir", default=None, help="where trained source/expert models are cached")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); a seeded CPU run repeats bit for bit per thread count")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _config(args: argparse.Namespace) -> RunConfig:
    base = RunConfig.from_yaml(args.config) if getattr(args, "config", None) else RunConfig()
    overrides = {
        "preset": args.preset, "seed": args.seed, "device": args.device, "targets": args.targets,
        "cache_dir": args.cache_dir, "threads": getattr(args, "threads", None),
        "methods": getattr(args, "methods", None), "bits": getattr(args, "bits", None),
        "rounding": getattr(args, "rounding", None), "step_method": getattr(args, "step_method", None),
    }
    d = asdict(base)
    d.update({k: v for k, v in overrides.items() if v is not None})
    if getattr(args, "samples", None) is not None:
        d["merge_options"] = {**d.get("merge_options", {}), "samples": args.samples}
    if getattr(args, "first_last_bits", None) is not None:
        d["first_last_bits"] = None if args.first_last_bits == 0 else args.first_last_bits
    return RunConfig.from_dict(d)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run
    from .report import results_markdown

    cfg = _config(args)
    progress = not args.quiet

    def on_row(row: dict) -> None:
        if progress:
            a = row["a_bits"] if row["a_bits"] is not None else 32
            print(f"  {row['method']:>9} W{row['w_bits']}A{a}: merged hmean {100 * row['merged']['hmean']:.1f}% "
                  f"({row['seconds']:.0f} s)", file=sys.stderr)

    results = run(cfg, args.out, progress=progress, on_row=on_row)
    print(results_markdown(results))
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, config.yaml", file=sys.stderr)
    return 0


def cmd_pmq(args: argparse.Namespace) -> int:
    from .pmq import run_pmq

    cfg = _config(args)
    results = run_pmq(cfg, args.out, args.merges, cfg.methods, args.anchor, progress=not args.quiet)
    print((Path(args.out) / "results.md").read_text())
    return 0 if results["rows"] else 1


def cmd_train_source(args: argparse.Namespace) -> int:
    from .data import load_benchmark
    from .eval import evaluate
    from .zoo import ModelPool, save_model

    cfg = _config(args).resolved()
    bench = load_benchmark(cfg.benchmark, seed=cfg.seed, targets=cfg.targets)
    pool = ModelPool(bench, cfg.arch, cfg.arch_kwargs, cfg.source, cfg.shot, cfg.seed, cfg.cache_dir,
                     cfg.device, not args.quiet)
    model = pool.source()
    accs = evaluate(model, {bench.source.name: bench.source.test, **{d: t.test for d, t in bench.targets.items()}},
                    cfg.device)
    save_model(model, args.out, {"benchmark": bench.name, "arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs,
                                 "num_classes": bench.num_classes, "seed": cfg.seed, "domain": bench.source.name,
                                 "role": "source", "config": asdict(cfg.source), "accuracy": accs})
    print(" ".join(f"{k}={100 * v:.1f}%" for k, v in accs.items()))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from .adapt.shot import shot
    from .data import load_benchmark
    from .eval import accuracy
    from .zoo import model_from_checkpoint, save_model

    cfg = _config(args).resolved()
    source, meta = model_from_checkpoint(args.source, cfg.device)
    bench = load_benchmark(meta.get("benchmark", cfg.benchmark), seed=cfg.seed, targets=[args.domain])
    dom = bench.targets[args.domain]
    expert = shot(source, dom.train, cfg.shot, seed=cfg.seed, device=cfg.device, progress=not args.quiet)
    before, after = accuracy(source, dom.test, device=cfg.device), accuracy(expert, dom.test, device=cfg.device)
    save_model(expert, args.out, {**{k: meta[k] for k in ("benchmark", "arch", "arch_kwargs", "num_classes")},
                                  "seed": cfg.seed, "domain": args.domain, "role": "expert",
                                  "config": asdict(cfg.shot), "accuracy": {"source": before, "expert": after}})
    print(f"{args.domain}: source {100 * before:.1f}% -> SHOT expert {100 * after:.1f}%")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .data import load_benchmark
    from .eval import accuracy
    from .ptq import quantize
    from .quant import QuantConfig, parse_bits
    from .zoo import model_from_checkpoint, save_model

    cfg = _config(args).resolved()
    model, meta = model_from_checkpoint(args.model, cfg.device)
    source = model_from_checkpoint(args.source, cfg.device)[0] if args.source else None
    domain = args.domain or meta.get("domain")
    bench = load_benchmark(meta.get("benchmark", cfg.benchmark), seed=meta.get("seed", cfg.seed), targets=[domain])
    dom = bench.targets[domain]
    w_bits, a_bits = parse_bits(args.bit_pair)
    qcfg = QuantConfig(w_bits, a_bits, cfg.first_last_bits, cfg.step_method)
    q = quantize(model, args.method, calib=dom.train, config=qcfg, source=source, calib_size=cfg.calib_size,
                 device=cfg.device, seed=cfg.seed, progress=not args.quiet, **cfg.ptq_options.get(args.method, {}))
    acc = accuracy(q, dom.test, device=cfg.device)
    save_model(q, args.out, {**{k: meta[k] for k in ("benchmark", "arch", "arch_kwargs", "num_classes", "seed")},
                             "domain": domain, "role": "quantized expert", "method": args.method,
                             "bits": qcfg.tag, "accuracy": acc})
    print(f"{domain}: {args.method} {qcfg.tag} accuracy {100 * acc:.1f}% -> {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .data import load_benchmark
    from .eval import evaluate
    from .io import write_json
    from .merge import merge
    from .pipeline import rounding_options
    from .zoo import model_from_checkpoint, save_model

    loaded = [model_from_checkpoint(p, args.device or "cpu") for p in args.experts]
    models, metas = [m for m, _ in loaded], [meta for _, meta in loaded]
    options = {}
    if args.method == "average":
        extra = {"samples": args.samples} if args.samples is not None else {}
        options = {"rounding": args.rounding, **rounding_options(args.rounding, extra, args.seed)}
    if args.base:
        options["base"] = model_from_checkpoint(args.base, args.device or "cpu")[0]
    merged = merge(models, method=args.method, **options)
    domains = [m.get("domain") for m in metas]
    meta = {k: metas[0][k] for k in ("benchmark", "arch", "arch_kwargs", "num_classes", "seed") if k in metas[0]}
    report = {"experts": [str(p) for p in args.experts], "domains": domains, "method": args.method,
              "options": {k: v for k, v in options.items() if k != "base"}, "base": args.base}
    if meta.get("benchmark") and all(domains):
        bench = load_benchmark(meta["benchmark"], seed=meta.get("seed", 0), targets=domains)
        report["accuracy"] = evaluate(merged, {d: bench.targets[d].test for d in domains}, args.device or "cpu")
    save_model(merged, args.out, {**meta, "role": "merged", "domains": domains, "merge": report})
    write_json(args.report or Path(args.out).with_suffix(".report.json"), report)
    print(report.get("accuracy", "merged (no benchmark metadata to evaluate on)"))
    return 0


def _analysis_models(args: argparse.Namespace, n_targets: int):
    """The experiment and, per family (fp + each method), the quantized (or FP) experts."""
    from .nn import fold_bn
    from .pipeline import Experiment
    from .quant import QuantConfig, parse_bits

    cfg = _config(args)
    exp = Experiment(cfg, progress=not args.quiet)
    if len(exp.targets) < n_targets:
        raise ValueError(f"this analysis needs {n_targets} target domains, got {exp.targets}")
    w_bits, a_bits = parse_bits(args.bit_pair)
    example = exp.bench.source.test.tensors[0][:2]
    families = {"fp": {d: fold_bn(m, example) for d, m in exp.experts.items()}}
    for method in exp.cfg.methods:
        qcfg = QuantConfig(w_bits, a_bits, exp.cfg.first_last_bits, exp.cfg.step_method)
        families[method] = exp.quantize_experts(method, qcfg)
    return exp, families


def cmd_barrier(args: argparse.Namespace) -> int:
    from .eval import linear_path
    from .eval.plots import plot_paths
    from .io import atomic_write_text, write_json

    exp, families = _analysis_models(args, 2)
    d1, d2 = exp.targets[:2]
    domains = {d: exp.tests[d] for d in (d1, d2)}
    paths = {name: linear_path(ms[d1], ms[d2], domains, args.points, exp.cfg.device) for name, ms in families.items()}
    out = Path(args.out)
    write_json(out / "barrier.json", {"targets": [d1, d2], "bits": args.bit_pair, "seed": exp.cfg.seed, "paths": paths})
    atomic_write_text(out / "config.yaml", exp.cfg.to_yaml())
    plot_paths(paths, out / "barrier.png", f"{d1} -> {d2} experts, {args.bit_pair} (fp: full precision)")
    for name, p in paths.items():
        print(f"{name:>8}: loss barrier {p['loss_barrier']:.4f}, accuracy barrier {100 * p['accuracy_barrier']:.1f} pts")
    return 0


def cmd_surface(args: argparse.Namespace) -> int:
    from .eval import loss_surface
    from .eval.plots import plot_surfaces
    from .io import atomic_write_text, write_json

    exp, families = _analysis_models(args, 1)
    d = exp.targets[0]
    data = {d: exp.tests[d]}
    surfaces = {name: loss_surface(ms[d], data, args.points, args.radius, exp.cfg.seed, exp.cfg.device)
                for name, ms in families.items()}
    out = Path(args.out)
    write_json(out / "surface.json", {"domain": d, "bits": args.bit_pair, "seed": exp.cfg.seed, "surfaces": surfaces})
    atomic_write_text(out / "config.yaml", exp.cfg.to_yaml())
    plot_surfaces(surfaces, out / "surface.png", f"loss around the {d} expert, {args.bit_pair}")
    for name, s in surfaces.items():
        mid = len(s["loss"]) // 2
        print(f"{name:>8}: centre loss {s['loss'][mid][mid]:.4f}, max on grid {max(map(max, s['loss'])):.4f}")
    return 0


def _export_calibration(meta: dict, size: int):
    """Calibration images for integer kernels: the checkpoint's domains' calibration splits, evenly."""
    import torch

    from .data import load_benchmark
    from .deploy import ExportError

    domains = meta.get("domains") or ([meta["domain"]] if meta.get("domain") else [])
    if not domains:
        raise ExportError("--kernels int8 calibrates on the checkpoint's domains, but its metadata names none")
    bench = load_benchmark(meta.get("benchmark", "digits"), seed=meta.get("seed", 0))
    splits = {bench.source.name: bench.source.train, **{d: t.train for d, t in bench.targets.items()}}
    unknown = [d for d in domains if d not in splits]
    if unknown:
        raise ExportError(f"domains {unknown} are not in benchmark {bench.name}; known: {sorted(splits)}")
    return torch.cat([splits[d].tensors[0][: -(-size // len(domains))] for d in domains])[:size]


def cmd_export(args: argparse.Namespace) -> int:
    from .deploy import export_onnx, save_packed
    from .zoo import model_from_checkpoint

    if args.format != "onnx" and args.kernels != "qdq":
        raise ValueError("--kernels chooses the ONNX graph: it needs --format onnx")
    if args.calib_size is not None and (args.kernels != "int8" or args.calib_size < 1):
        raise ValueError("--calib-size is a positive number of images, and only --kernels int8 calibrates")
    model, meta = model_from_checkpoint(args.model)
    if args.format == "onnx":
        calib = _export_calibration(meta, args.calib_size or 512) if args.kernels == "int8" else None
        path = export_onnx(model, args.out, opset=args.opset, int4=not args.no_int4, meta=meta,
                           kernels=args.kernels, calib=calib)
    else:
        path = save_packed(model, args.out, meta)
    kib = Path(path).stat().st_size / 1024, Path(args.model).stat().st_size / 1024
    print(f"wrote {path} ({args.format}, {kib[0]:.1f} KiB; input checkpoint {kib[1]:.1f} KiB)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .bench import run_grid

    bar = None

    def progress(i: int, n: int, text: str) -> None:
        nonlocal bar
        if args.quiet:
            return
        bar = bar or tqdm(total=n, desc="cells", unit="cell")
        bar.set_postfix_str(text[:100])
        bar.update(i - bar.n)

    run_grid(args.grid, args.out, args.executor, args.workers, args.address, progress)
    if bar:
        bar.close()
    print((Path(args.out) / "bench.md").read_text())
    return 0


def cmd_tta(args: argparse.Namespace) -> int:
    from .tta import TTAConfig, load_config, run_tta

    if args.config:
        run_cfg, tta_cfg = load_config(args.config)
        d = asdict(run_cfg)
        d.update({k: v for k, v in {"preset": args.preset, "seed": args.seed, "device": args.device,
                                     "cache_dir": args.cache_dir, "threads": args.threads}.items() if v is not None})
        base = RunConfig.from_dict(d)
        t = asdict(tta_cfg)
    else:
        # --methods / --bits are TTA rows here, not the run config's PTQ methods and bits
        base = _config(argparse.Namespace(**{**vars(args), "methods": None, "bits": None}))
        t = asdict(TTAConfig())
    overrides = {"methods": args.methods, "bits": args.bits, "streams": args.streams, "imbalance": args.imbalance,
                 "severity": args.severity, "corruptions": args.corruptions, "n_images": args.n_images,
                 "batch_size": args.batch_size}
    t.update({k: v for k, v in overrides.items() if v is not None})
    if args.lr is not None:
        t["tent"] = {**t["tent"], "lr": args.lr}
    tta_cfg = TTAConfig(**t)
    progress = not args.quiet

    def on_row(row: dict) -> None:
        if progress:
            print(f"  {row['stream']:>10} {row['method']:>10} {row['bits']}: mean error "
                  f"{100 * row['mean_error']:.1f}% ({row['seconds']:.0f} s)", file=sys.stderr)

    run_tta(base, tta_cfg, args.out, progress=progress, on_row=on_row)
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, config.yaml, stream_error.png", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import load_benchmark, save_sample_grid

    bench = load_benchmark(args.benchmark, seed=args.seed or 0, targets=args.targets)
    path = save_sample_grid(bench, args.out, per_domain=args.per_domain)
    for d in [bench.source, *bench.targets.values()]:
        print(f"{d.name}: train {len(d.train)}, test {len(d.test)}")
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mergeq", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train source, adapt experts, quantize each, merge, evaluate")
    p.add_argument("--config", help="YAML run config (e.g. a config.yaml written by an earlier run)")
    p.add_argument("--methods", type=_csv, help="comma-separated PTQ methods, e.g. rtn,qdrop,hdrq")
    p.add_argument("--bits", type=_csv, help="comma-separated bit pairs, e.g. W8A8,W4A4,W3A3")
    p.add_argument("--rounding", help="rounding policy for merging quantized experts: float (Eq. 11, default), "
                   "nearest, noise (Eq. 12 + cosine filter), noise-ties (reference code)")
    p.add_argument("--samples", type=int, help="noise samples drawn by --rounding noise/noise-ties (default 30/100)")
    p.add_argument("--step-method", choices=("mse", "lp", "absmax"), help="weight step search (default mse)")
    p.add_argument("--first-last-bits", type=int, help="bits of first/last layer (default 8; 0 = like the rest)")
    p.add_argument("--out", default="runs/digits", help="output folder (default runs/digits)")
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pmq", help="merge full-precision experts first, then quantize the merged model (E-PMQ)")
    p.add_argument("--merges", type=_csv, default=["task_arithmetic", "ties"], help="average, task_arithmetic, ties")
    p.add_argument("--methods", type=_csv, default=["rtn", "gptq", "epmq"], help="PTQ methods for the merged model")
    p.add_argument("--bits", type=_csv, default=["W4", "W3"], help="bit pairs; W4 = weight-only")
    p.add_argument("--anchor", type=float, default=1.0, help="E-PMQ merged-weight anchoring weight")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, config.yaml)")
    _add_common(p)
    p.set_defaults(func=cmd_pmq)

    p = sub.add_parser("train-source", help="train (or reuse the cached) source model and save it")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors; a .json sidecar is written too)")
    _add_common(p)
    p.set_defaults(func=cmd_train_source)

    p = sub.add_parser("adapt", help="adapt a source checkpoint to one target domain with SHOT")
    p.add_argument("--source", required=True, help="source checkpoint from train-source")
    p.add_argument("--domain", required=True, help="target domain name")
    p.add_argument("--out", required=True, help="expert checkpoint path (.safetensors)")
    _add_common(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("quantize", help="quantize one expert checkpoint on its domain's calibration split")
    p.add_argument("--model", required=True, help="expert checkpoint (.safetensors)")
    p.add_argument("--method", default="rtn", help="PTQ method (rtn, adaround, brecq, qdrop, hdrq)")
    p.add_argument("--bits", dest="bit_pair", default="W4A4", help="bit pair, e.g. W4A4")
    p.add_argument("--source", help="source checkpoint (needed by hdrq's distance term)")
    p.add_argument("--domain", help="calibration domain (default: the checkpoint's own)")
    p.add_argument("--out", required=True, help="quantized checkpoint path (.safetensors)")
    _add_common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("merge", help="merge expert checkpoints into one; writes the checkpoint and a JSON report")
    p.add_argument("experts", nargs="+", help="expert checkpoints (all full precision or all quantized)")
    p.add_argument("--method", default="average", help="average, task_arithmetic or ties")
    p.add_argument("--rounding", default="float", help="for quantized experts: float, nearest, noise, noise-ties")
    p.add_argument("--samples", type=int, help="noise samples (noise: 30, noise-ties: 100)")
    p.add_argument("--base", help="shared source checkpoint (task_arithmetic, ties)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="merged checkpoint path (.safetensors)")
    p.add_argument("--report", help="JSON report path (default: OUT with .report.json)")
    p.set_defaults(func=cmd_merge)

    for name, fn, helptext in [
        ("barrier", cmd_barrier, "loss/accuracy along the linear path between two experts, error barrier (Eq. 1-3)"),
        ("surface", cmd_surface, "2-D loss surface around an expert along filter-normalised directions (Fig. 2)"),
    ]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--methods", type=_csv, default=["rtn", "brecq", "qdrop", "hdrq"])
        p.add_argument("--bits", dest="bit_pair", default="W4A4", help="bit pair for the quantized experts")
        p.add_argument("--points", type=int, default=11, help="grid points along each axis")
        if name == "surface":
            p.add_argument("--radius", type=float, default=1.0, help="grid half-width in direction norms")
        p.add_argument("--out", required=True, help="output folder (JSON, PNG, config.yaml)")
        p.add_argument("--config", help="YAML run config to start from")
        _add_common(p)
        p.set_defaults(func=fn)

    p = sub.add_parser("export", help="export a quantized checkpoint: packed integer safetensors or QDQ ONNX")
    p.add_argument("--model", required=True, help="quantized (or merged) checkpoint from quantize/merge (.safetensors)")
    p.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                   help="safetensors: bit-packed integer weights; onnx: QDQ graph for onnxruntime")
    p.add_argument("--out", required=True, help="output file (.safetensors or .onnx)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21; INT4 weights need >= 21)")
    p.add_argument("--no-int4", action="store_true", help="ONNX: store weights of <= 4 bits as INT8")
    p.add_argument("--kernels", choices=("qdq", "int8", "fp32"), default="qdq",
                   help="ONNX: qdq (QDQ graph, onnxruntime runs it in float), int8 (integer kernels, "
                        "requantization calibrated on the checkpoint's domains) or fp32 (unquantized model)")
    p.add_argument("--calib-size", type=int, default=None,
                   help="ONNX int8: calibration images for the requantization steps (default 512)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run a resumable grid of methods x bits x target sets x seeds from YAML")
    p.add_argument("grid", help="grid YAML (methods, bits, target_sets, seeds, plus any run config field)")
    p.add_argument("--out", required=True, help="output folder: cells/*.json, bench.csv, bench.md")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=1, help="local process pool size")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tta", help="test-time adaptation of FP / PTQ / TTAQ models on a stream of corruptions")
    p.add_argument("--config", help="config.yaml of an earlier mergeq tta run (run + tta sections)")
    p.add_argument("--methods", type=_csv, help="comma-separated MODEL[+ADAPTER] (ADAPTER: none, tent, abl); "
                   "default fp,fp+tent,qdrop,qdrop+tent,ttaq (ttaq = ttaq PTQ + TENT with ABL)")
    p.add_argument("--bits", type=_csv, help="comma-separated bit pairs (default W4A4,W2A4)")
    p.add_argument("--streams", type=_csv, help="balanced, imbalanced or both (default both)")
    p.add_argument("--imbalance", choices=("dirichlet", "sorted"), help="label order of the imbalanced stream "
                   "(default dirichlet, alpha 0.1)")
    p.add_argument("--severity", type=int, help="corruption severity 1..5 (default 5)")
    p.add_argument("--corruptions", type=_csv, help="corruptions in stream order (default: the 15 of ImageNet-C)")
    p.add_argument("--n-images", type=int, help="clean test images per domain (default all 500)")
    p.add_argument("--batch-size", type=int, help="test batch size (default 64)")
    p.add_argument("--lr", type=float, help="TENT / ABL learning rate (default 1e-3, Adam)")
    p.add_argument("--out", default="runs/tta", help="output folder (default runs/tta)")
    _add_common(p)
    p.set_defaults(func=cmd_tta)

    p = sub.add_parser("data", help="save a PNG grid of samples per domain and print split sizes")
    p.add_argument("--benchmark", default="digits")
    p.add_argument("--out", default="docs/digits_samples.png")
    p.add_argument("--per-domain", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", type=_csv, default=None)
    p.set_defaults(func=cmd_data)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mergeq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
