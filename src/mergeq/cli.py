"""``mergeq`` command line: a thin layer over :mod:`mergeq.experiments`.

Every command that runs an experiment or a step reads one config (:mod:`mergeq.experiments.config`):
the defaults, then ``--config FILE``, then ``--set PATH=VALUE`` (any entry, e.g.
``--set ptq.options.hdrq.iters=100``), then its flags. Each flag is a config path (the tables
below) whose type and help text come from the config field, so no option exists only here.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .errors import MergeqError
from .gpu import memory_errors

PREFIX = "config:"  # dests of flags bound to a config path
COMMON = {"--preset": "preset", "--seed": "runtime.seed", "--device": "runtime.device",
          "--threads": "runtime.threads", "--cache-dir": "runtime.cache_dir"}
TARGETS = {"--targets": "data.targets"}
PTQ = {"--methods": "ptq.methods", "--bits": "ptq.bits", "--calib-size": "ptq.calib_size",
       "--first-last-bits": "ptq.first_last_bits", "--step-method": "ptq.step_method"}
PTQ_SETTINGS = {k: v for k, v in PTQ.items() if k not in ("--methods", "--bits")}
MERGE = {"--rounding": "merge.rounding", "--samples": "merge.rounding_options.samples", "--repeats": "merge.repeats"}
PMQ = {"--merges": "pmq.merges", "--methods": "pmq.methods", "--bits": "pmq.bits",
       "--anchor": "ptq.options.epmq.anchor"}
TTA = {"--methods": "tta.methods", "--bits": "tta.bits", "--streams": "tta.streams", "--imbalance": "tta.imbalance",
       "--severity": "tta.severity", "--corruptions": "tta.corruptions", "--n-images": "tta.n_images",
       "--cifar10c": "tta.cifar10c", "--batch-size": "tta.batch_size", "--lr": "tta.tent.lr"}
WORKERS = {"--workers": "runtime.workers"}
ONE = {"--method": "ptq.methods", "--bits": "ptq.bits"}  # one value, recorded as a one-item list
HELP = {"data.targets": "comma-separated target domains (default: every domain but the source)",
        "merge.rounding_options.samples": "noise candidates per merge for --rounding noise/noise-ties (default 100)",
        "ptq.options.epmq.anchor": "E-PMQ merged-weight anchoring weight (default 1.0)",
        "tta.tent.lr": "TENT / ABL learning rate (default 1e-3, Adam)"}


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _converter(hint: Any):
    """A string -> value parser for a flag of type ``hint`` (lists: comma-separated; none/null: None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        inner = _converter(options[0]) if len(options) == 1 else str
        return lambda s: None if s.strip().lower() in ("none", "null") else inner(s)
    if origin is list:
        item = _converter(args[0])
        return lambda s: [item(p) for p in _csv(s)]
    if hint is Any:  # an entry of an options mapping: the value as YAML reads it (3 -> int, true -> bool)
        from .io import load_yaml

        return load_yaml
    return hint if hint in (int, float) else str


def _add_flags(p: argparse.ArgumentParser, table: dict[str, str], one: bool = False) -> None:
    """Flags bound to config paths: type, choices and help from the config field."""
    from .experiments.config import help_at, hint_at

    for flag, path in table.items():
        hint = hint_at(path)
        if one:
            hint = typing.get_args(hint)[0]
        choices = list(typing.get_args(hint)) if typing.get_origin(hint) is Literal else None
        parse = _converter(hint)
        p.add_argument(flag, dest=PREFIX + path, default=argparse.SUPPRESS, choices=choices,
                       help=(HELP.get(path) or help_at(path)) + (" (one here)" if one else ""),
                       type=(lambda s, parse=parse: [parse(s)]) if one else parse,
                       metavar=flag.lstrip("-").replace("-", "_").upper() if choices is None else None)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (e.g. the config.yaml a run wrote: rerunning it reproduces the run)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="set any config entry, e.g. --set ptq.options.hdrq.iters=100 (repeatable)")


def _seed_list(s: str) -> list[int]:
    """``3`` -> seeds 0, 1, 2; ``0,4,7`` -> those seeds (``5,`` -> seed 5 alone); at most
    ``mergeq.bounds.MAX_SEEDS``, counted before any list is built."""
    from .bounds import MAX_SEEDS

    if "," in s:
        seeds = _csv(s)
    else:
        n = int(s)
        if n < 1:
            raise argparse.ArgumentTypeError(f"expected a number of seeds (at least 1) or a comma-separated list, "
                                             f"got {s}")
        seeds = range(min(n, MAX_SEEDS + 1))
    if len(seeds) > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SEEDS:,} seeds (each runs the pipeline), got "
                                         f"{n if isinstance(seeds, range) else len(seeds):,}")
    return [int(p) for p in seeds]


def _bounded(kind: type, key: str):
    """A parser of a command's own number flag, checked against ``mergeq.bounds.BOUNDS[key]``."""
    from .bounds import BOUNDS

    def parse(s: str) -> int | float:
        v = kind(s)
        problem = BOUNDS[key].problem(v)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {v!r}")
        return v

    return parse


def load_cli_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """The config of a command: defaults, then the command's ``defaults`` (paths the file does not
    set), then ``--config``, ``--set`` and the flags; validated once, at the end."""
    from .experiments.config import Config, apply_sets, read_mapping, set_path

    data = read_mapping(args.config) if getattr(args, "config", None) else {}
    for path, value in (defaults or {}).items():
        head, node = path.split("."), data
        while head and isinstance(node, dict) and head[0] in node:
            node = node[head.pop(0)]
        if head:  # not set by the file
            set_path(data, path, value)
    apply_sets(data, getattr(args, "set", []))  # a --set data.kind decides the data.* keys of every --set
    for dest, value in vars(args).items():  # only the flags given (their default: absent)
        if dest.startswith(PREFIX):
            set_path(data, dest[len(PREFIX):], value)
    return Config.from_dict(data, "config")


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def _experiment(args: argparse.Namespace, fn, line, picture: str) -> int:
    """Run the experiment ``fn`` into ``--out``, one progress line per row (``line(row)``), then print its table."""
    def on_row(row: dict) -> None:
        if _progress(args):
            from tqdm import tqdm

            tqdm.write(f"  {line(row)} ({row['seconds']:.0f} s)", file=sys.stderr)  # not glued onto a bar

    fn(load_cli_config(args), args.out, progress=_progress(args), on_row=on_row)
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, config.yaml, {picture}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .experiments import run

    def line(row: dict) -> str:
        a = row["a_bits"] if row["a_bits"] is not None else 32
        return f"{row['method']:>9} W{row['w_bits']}A{a}: merged hmean {100 * row['merged']['hmean']:.1f}%"

    return _experiment(args, run, line, "hmean_vs_bits.png, merged_vs_experts.png")


def cmd_pmq(args: argparse.Namespace) -> int:
    from .experiments import run_pmq

    results = run_pmq(load_cli_config(args), args.out, progress=_progress(args))
    print((Path(args.out) / "results.md").read_text())
    return 0 if results["rows"] else 1


def cmd_tta(args: argparse.Namespace) -> int:
    from .experiments import run_tta

    return _experiment(args, run_tta, lambda row: f"{row['stream']:>10} {row['method']:>10} {row['bits']}: mean "
                       f"error {100 * row['mean_error']:.1f}%", "stream_error.png")


def _cell_bar(args: argparse.Namespace):
    """A progress callback of ``run_grid`` drawing a tqdm bar of cells (none with --quiet), and its closer."""
    from tqdm import tqdm

    bar = None

    def progress(i: int, n: int, text: str) -> None:
        nonlocal bar
        if args.quiet:
            return
        if not sys.stderr.isatty():  # no bar in a log file (see main): one line per event instead
            logging.getLogger("mergeq.bench").info("cells %d/%d: %s", i, n, text)
            return
        bar = bar or tqdm(total=n, desc="cells", unit="cell", disable=None)
        bar.set_postfix_str(text[:100])
        bar.update(i - bar.n)

    return progress, lambda: bar and bar.close()


def cmd_bench(args: argparse.Namespace) -> int:
    from .experiments import run_grid

    if args.grid and args.config:
        raise MergeqError("give the grid once: as the positional GRID or as --config")
    args.config = args.config or args.grid
    progress, close = _cell_bar(args)
    run_grid(load_cli_config(args), args.out, args.executor, address=args.address, progress=progress)
    close()
    print((Path(args.out) / "results.md").read_text())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.compare import compare

    progress, close = _cell_bar(args)
    compare(load_cli_config(args), args.out, args.executor, address=args.address, progress=progress)
    close()
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, config.yaml, compare.png (cells: "
          f"{Path(args.out) / 'grid'})", file=sys.stderr)
    return 0


def cmd_train_source(args: argparse.Namespace) -> int:
    from .experiments import steps

    accs = steps.train_source(load_cli_config(args), args.out, _progress(args))
    print(" ".join(f"{k}={100 * v:.1f}%" for k, v in accs.items() if k != "iou"))  # iou: per class (segmentation)
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from .experiments import steps

    before, after = steps.adapt(load_cli_config(args), args.source, args.domain, args.out, _progress(args),
                                args.trust_builder)
    print(f"{args.domain}: source {100 * before:.1f}% -> SHOT expert {100 * after:.1f}%")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .experiments import steps

    cfg = load_cli_config(args, {"ptq.methods": ["rtn"], "ptq.bits": ["W4A4"]})
    domain, acc = steps.quantize_checkpoint(cfg, args.model, args.out, args.source, args.domain, _progress(args),
                                            args.trust_builder)
    print(f"{domain}: {cfg.ptq.methods[0]} {cfg.ptq.bits[0]} accuracy {100 * acc:.1f}% -> {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .experiments import steps

    if args.method != "average" and any(hasattr(args, PREFIX + p)
                                        for p in ("merge.rounding", "merge.rounding_options.samples")):
        raise MergeqError(f"--rounding and --samples apply to --method average (quantized experts), not {args.method}")
    report = steps.merge_checkpoints(load_cli_config(args), args.experts, args.method, args.out, args.report,
                                     args.base, args.trust_builder)
    acc = report.get("accuracy")
    print(f"merged {len(args.experts)} models -> {args.out}; accuracy: "
          + (", ".join(f"{d} {100 * a:.1f}%" for d, a in acc.items() if d != "iou") if acc else
             f"not evaluated ({report.get('not_evaluated')})"))
    return 0


ANALYSIS_DEFAULTS = {"ptq.methods": ["rtn", "brecq", "qdrop", "hdrq"], "ptq.bits": ["W4A4"]}


def cmd_barrier(args: argparse.Namespace) -> int:
    from .experiments import steps

    paths = steps.barrier(load_cli_config(args, ANALYSIS_DEFAULTS), args.out, args.points, _progress(args))
    for name, p in paths.items():
        print(f"{name:>8}: loss barrier {p['loss_barrier']:.4f}, "
              f"accuracy barrier {100 * p['accuracy_barrier']:.1f} pts")
    return 0


def cmd_surface(args: argparse.Namespace) -> int:
    from .experiments import steps

    surfaces = steps.surface(load_cli_config(args, ANALYSIS_DEFAULTS), args.out, args.points, args.radius,
                             _progress(args))
    for name, s in surfaces.items():
        mid = len(s["loss"]) // 2
        print(f"{name:>8}: centre loss {s['loss'][mid][mid]:.4f}, max on grid {max(map(max, s['loss'])):.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .deploy import ExportError, export_onnx, plan_integer, save_packed
    from .deploy.integer import DEPLOY_CALIB_SIZE, is_integer_layer
    from .deploy.onnx_export import check_opset
    from .deploy.trace import trace
    from .experiments.steps import check_outputs, export_calibration, load_checkpoint_model
    from .io import check_out_file

    if args.format != "onnx" and (args.kernels != "qdq" or args.target_cpu is not None):
        raise ValueError("--kernels and --target-cpu choose the ONNX graph: they need --format onnx")
    if args.target_cpu is not None and args.kernels not in ("int8", "auto"):
        raise ValueError("--target-cpu chooses the int8 graph's weight types: it needs --kernels int8 or auto")
    if args.format == "onnx":
        require_deploy_extra()
        check_opset(args.opset)
    integer = args.kernels in ("int8", "auto")
    if args.calib_size is not None and (args.format != "onnx" or args.calib_size < 1):
        raise ValueError("--calib-size is a positive number of images, and only --format onnx calibrates")
    check_outputs(args.out, [args.model], config=False)
    check_out_file(args.out)
    model, meta, _ = load_checkpoint_model(args.model, load_cli_config(args), trust_builder=args.trust_builder)
    if args.format == "onnx":
        trace(model)  # a model torch.fx cannot trace is refused with the reason before data is loaded
    calib = plan = None
    if args.format == "onnx" and any(is_integer_layer(m) for m in model.modules()):
        try:  # the integer graph's requantizations, which the evaluated model has too (deploy.requant)
            calib = export_calibration(meta, args.calib_size or DEPLOY_CALIB_SIZE)
        except ExportError as e:
            if integer:
                raise
            print(f"warning: {e}; the QDQ file is the fake-quant model without the requantizations of "
                  "the integer graph, which mergeq's evaluation models", file=sys.stderr)
        else:
            plan = plan_integer(model, calib)
    onnx_kw = dict(opset=args.opset, int4=not args.no_int4, meta=meta)
    if args.format == "onnx":
        path = export_onnx(model, args.out, kernels="int8" if integer else args.kernels, plan=plan,
                           target_cpu=args.target_cpu or "any", **onnx_kw)
    else:
        path = save_packed(model, args.out, meta)
    if plan is not None and integer:
        from .deploy.check import check_int8_export

        check = check_int8_export(model, path, plan, calib, opset=args.opset)
        lines, warnings = check.report()
        print("\n".join(lines))
        kernels, why = check.choice()
        if args.kernels == "auto":
            print(f"--kernels auto: {kernels}, {why}")
            if kernels == "qdq":  # the warnings were about the integer file, which is not kept
                warnings, path = [], export_onnx(model, args.out, plan=plan, **onnx_kw)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    kib = Path(path).stat().st_size / 1024, Path(args.model).stat().st_size / 1024
    print(f"wrote {path} ({args.format}, {kib[0]:.1f} KiB; input checkpoint {kib[1]:.1f} KiB)")
    return 0


def require_deploy_extra() -> None:
    """One clear line instead of a ModuleNotFoundError when the ``deploy`` extra is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise MergeqError(f"ONNX export needs {' and '.join(missing)}: pip install 'mergeq[deploy]'")


def cmd_env(args: argparse.Namespace) -> int:
    import json

    from .sysinfo import FLAGS, environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=1))
        return 0
    c = env["cpu"]
    print("\n".join([
        *(f"{k}: {v or 'not installed'}" for k, v in env["versions"].items()),
        f"cpu: {c['model']} ({c['arch']}; name from {c['source']['model']})",
        f"cpu flags: {', '.join(c['flags']) or 'none of ' + ', '.join(FLAGS)} (from {c['source']['flags']})",
        f"torch cpu capability: {env['torch_cpu_capability']}; torch threads: {env['torch_threads']}",
        f"cuda devices: {', '.join(env['cuda_devices']) or 'none'}",
        f"int8 export here: --target-cpu native means {env['int8_export_target_cpu']} ("
        + ("VNNI: uint8 x int8 kernels are exact" if c["vnni"] else
           "no VNNI: uint8 x int8 kernels saturate, 8-bit layers get uint8 weights") + ")"]))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import dataclasses

    from .data import load_data, save_sample_grid
    from .experiments.config import resolve
    from .io import check_out_file

    check_out_file(args.out)
    cfg = resolve(load_cli_config(args))  # the model decides an unset image size and normalisation
    bench = load_data(dataclasses.asdict(cfg.data), cfg.runtime.seed, cfg.runtime.cache_dir)
    path = save_sample_grid(bench, args.out, per_domain=args.per_domain)
    for d in [bench.source, *bench.targets.values()]:
        print(f"{d.name}: train {len(d.train)}, test {len(d.test)}")
    print(f"wrote {path}")
    return 0


def _log_above_bars():
    """Route the console log handler through tqdm (``logging_redirect_tqdm``): each log line is
    printed on its own line above the progress bars, never glued onto one. Without a console
    handler (logging set up by the caller, e.g. a test runner) nothing changes."""
    import contextlib

    from tqdm.contrib.logging import logging_redirect_tqdm

    console = any(type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout)
                  for h in logging.getLogger().handlers)
    return logging_redirect_tqdm() if console else contextlib.nullcontext()


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-builder", action="store_true",
                   help="run the model builder a checkpoint's metadata names (code from the file: only for files "
                        "you trust; without it, mergeq runs no code named in a file: pass model: in --config instead)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mergeq", description=__doc__)
    ap.add_argument("--debug", action="store_true",
                    help="show the full traceback of an error (also: environment variable MERGEQ_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, fn, helptext: str, *tables: dict, one: dict | None = None, config: bool = True):
        p = sub.add_parser(name, help=helptext)
        if config:
            _add_config(p)
        for table in tables:
            _add_flags(p, table)
        if one:
            _add_flags(p, one, one=True)
        p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
        p.set_defaults(func=fn)
        return p

    p = command("run", cmd_run, "train source, adapt experts, quantize each, merge, evaluate",
                COMMON, TARGETS, PTQ, MERGE, WORKERS)
    p.add_argument("--out", default="runs/digits", help="output folder (default runs/digits)")

    p = command("pmq", cmd_pmq, "merge full-precision experts first, then quantize the merged model (E-PMQ)",
                COMMON, TARGETS, PTQ_SETTINGS, PMQ)
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, config.yaml, PNG)")

    p = command("tta", cmd_tta, "test-time adaptation of FP / PTQ / TTAQ models on a stream of corruptions",
                COMMON, PTQ_SETTINGS, TTA)
    p.add_argument("--out", default="runs/tta", help="output folder (default runs/tta)")

    p = command("bench", cmd_bench, "run a resumable grid of methods x bits x target sets x seeds",
                COMMON, {"--methods": "ptq.methods", "--bits": "ptq.bits"}, WORKERS)
    p.add_argument("grid", nargs="?", help="grid config (the same as --config): ptq.methods x ptq.bits x "
                   "grid.target_sets x grid.seeds")
    p.add_argument("--out", required=True, help="output folder: cells/*.json, results.json/.md, bench.csv, PNG")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")

    p = command("compare", cmd_compare, "methods against each other over seeds: merged hmean and paired "
                "differences with 95%% intervals, one sentence per pair", COMMON, TARGETS, PTQ, MERGE, WORKERS)
    for flag, path, what in [("--seeds", "grid.seeds", "seeds, each its own source model and experts"),
                             ("--ptq-seeds", "grid.ptq_seeds", "PTQ seeds (of PTQ and the calibration subset) "
                                                               "on the experts of --seed, cheaper than --seeds")]:
        p.add_argument(flag, dest=PREFIX + path, type=_seed_list, default=argparse.SUPPRESS, metavar="N_OR_LIST",
                       help=f"{what}: N (0..N-1) or a comma-separated list")
    p.add_argument("--out", required=True, help="output folder: results.json/.md, config.yaml, compare.png, "
                   "grid/ (the cells)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: cells in a process pool (--workers); ray: cells as Ray tasks")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")

    p = command("train-source", cmd_train_source, "train (or reuse the cached) source model and save it",
                COMMON, TARGETS)
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors: weights and metadata in one file)")

    p = command("adapt", cmd_adapt, "adapt a source checkpoint to one target domain with SHOT", COMMON)
    p.add_argument("--source", required=True, help="source checkpoint from train-source")
    p.add_argument("--domain", required=True, help="target domain name")
    p.add_argument("--out", required=True, help="expert checkpoint path (.safetensors)")
    _add_trust(p)

    p = command("quantize", cmd_quantize, "quantize one expert checkpoint on its domain's calibration split",
                COMMON, PTQ_SETTINGS, one=ONE)
    p.add_argument("--model", required=True, help="expert checkpoint (.safetensors)")
    p.add_argument("--source", help="source checkpoint (needed by hdrq's distance term)")
    p.add_argument("--domain", help="calibration domain (default: the checkpoint's own)")
    p.add_argument("--out", required=True, help="quantized checkpoint path (.safetensors)")
    _add_trust(p)

    p = command("merge", cmd_merge, "merge expert checkpoints into one; writes the checkpoint and a JSON report",
                {"--seed": "runtime.seed", "--device": "runtime.device", "--rounding": "merge.rounding",
                 "--samples": "merge.rounding_options.samples"})
    p.add_argument("experts", nargs="+", help="expert checkpoints (all full precision or all quantized)")
    p.add_argument("--method", default="average", help="average, task_arithmetic or ties (options: merge.options)")
    p.add_argument("--base", help="shared source checkpoint (task_arithmetic, ties)")
    p.add_argument("--out", required=True, help="merged checkpoint path (.safetensors)")
    p.add_argument("--report", help="JSON report path (default: OUT with .safetensors replaced by .report.json)")
    _add_trust(p)

    for name, fn, helptext in [
        ("barrier", cmd_barrier, "loss/accuracy along the linear path between two experts, error barrier (Eq. 1-3)"),
        ("surface", cmd_surface, "2-D loss surface around an expert along filter-normalised directions (Fig. 2)"),
    ]:
        p = command(name, fn, helptext, COMMON, TARGETS, {"--methods": "ptq.methods"}, PTQ_SETTINGS,
                    one={"--bits": "ptq.bits"})
        p.add_argument("--points", type=_bounded(int, "points"), default=11,
                       help="grid points along each axis (2 to 101)")
        if name == "surface":
            p.add_argument("--radius", type=_bounded(float, "radius"), default=1.0,
                           help="grid half-width in direction norms (positive)")
        p.add_argument("--out", required=True, help="output folder (JSON, PNG, config.yaml)")

    p = command("export", cmd_export, "export a quantized checkpoint: packed integer safetensors or ONNX")
    p.add_argument("--model", required=True, help="quantized (or merged) checkpoint from quantize/merge (.safetensors)")
    p.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                   help="safetensors: bit-packed integer weights; onnx: QDQ graph for onnxruntime")
    p.add_argument("--out", required=True, help="output file (.safetensors or .onnx)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21; INT4 weights need >= 21; at most "
                   "the newest opset the installed onnx and onnxruntime both run)")
    p.add_argument("--no-int4", action="store_true", help="ONNX: store weights of <= 4 bits as INT8")
    p.add_argument("--kernels", choices=("qdq", "int8", "auto", "fp32"), default="qdq",
                   help="ONNX: qdq (QDQ graph, onnxruntime runs it in float), int8 (integer kernels, "
                        "requantization calibrated on the checkpoint's domains), auto (int8 where it is exact "
                        "on this CPU and faster than qdq, else qdq; measured at export) or fp32 (unquantized model)")
    p.add_argument("--calib-size", type=int, default=None,
                   help="ONNX: calibration images for the integer graph's requantization steps (int8, and "
                        "the same rounding in the QDQ form) and the check (default 512)")
    p.add_argument("--target-cpu", choices=("any", "vnni", "native"), default=None,
                   help="ONNX int8: CPUs the integer graph must be exact on. any (default): every x86 kind "
                        "(8-bit weights against 8-bit inputs as uint8, U8U8 kernels); vnni: int8 weights "
                        "everywhere, exact and faster with VNNI (AVX512-VNNI, AVX-VNNI) or on ARM, wrong "
                        "without it; native: vnni if this CPU has VNNI, else any")

    _add_trust(p)

    p = command("env", cmd_env, "versions, CPU model and flags (AVX2, AVX-512, VNNI), threads, CUDA devices",
                config=False)
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = command("data", cmd_data, "save a PNG grid of samples per domain and print split sizes",
                {"--seed": "runtime.seed"}, TARGETS)
    p.add_argument("--out", default="docs/digits_samples.png")
    p.add_argument("--per-domain", type=_bounded(int, "per_domain"), default=16,
                   help="images per domain in the grid (1 to 100)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _log_above_bars(), memory_errors():  # CUDA out of memory: one line, what was asked and is free
            return args.func(args)
    except (MergeqError, ValueError, KeyError, OSError, TypeError) as e:
        # bad input, a missing or unwritable file: one line; --debug shows where a real bug is
        if args.debug or os.environ.get("MERGEQ_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mergeq {args.command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
