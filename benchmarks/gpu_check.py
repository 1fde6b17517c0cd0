"""One check of mergeq on a GPU (issue 30, item 4), one table: at most 5 minutes on one H100.

1. **Commands**: every command of the CLI on ``--device`` (run with each ``merge.recalibrate``
   mode and the float / noise roundings, pmq, tta, bench, compare, train-source, adapt, quantize,
   merge, export of a checkpoint written there, barrier, surface), each a subprocess on a tiny
   digits setting (ResNet-8, one epoch of source training and SHOT), plus ``run`` on the streets
   segmentation benchmark (``deeplab_mini``, DACS experts, mIoU), and the same on the CPU with
   the same seed, side by side: exit status, seconds, the number the command printed (or wrote:
   a merged hmean, a mean stream error, an accuracy, a loss barrier) on each device and their
   difference (float rounding differs between devices; the table measures by how much).
2. **Probe**: the reconstruction step of every method against a plain FP forward+backward of the
   same unit, summed over the units of a ResNet-50 (torchvision's if importable, random init, else
   ``bottleneck_resnet.ResNet``, the same layers: 25,557,032 parameters), 224 px, batch 32, 256
   calibration images, W4A4; the step time is the difference of two ``reconstruct_unit`` runs,
   ``--warmup`` (20) and ``--warmup + --steps`` (30) steps long, so set-up, hardening and the
   CUDA-graph captures cancel (20 steps: each phase of every method gets its 3 eager steps and its
   capture in both runs), wall clock with ``torch.cuda.synchronize``. On a GPU each method is
   measured with its steps as CUDA graphs (``cuda_graphs``, the default: the headline ratio) and
   eagerly, and the two reconstructions (same seed) are compared: the largest relative difference
   of a finished unit's outputs on one batch. Peak GPU memory (``torch.cuda.max_memory_allocated``)
   per method.
3. **Estimates** of GPU-hours for the paper preset (20,000 iterations per unit): per expert and
   bit pair, Σ_units step × 20,000; an Office-Home source block of Table 2 (BRECQ, QDrop, HDRQ x
   W8A8, W8A4, W4A8, W4A4, W3A3 x 3 experts) and all of Table 2 (4 sources). Segmentation
   (Table 1: ResNetV1c-101 at output stride 8, 1024 x 1024 crops, batch 1, as the HDRQ reference
   code; 3 methods x W6A6, W4A4 x 2 experts): the probe's step time scaled by the ratio of
   forward multiply-accumulates (counted with hooks on the ``meta`` device) of one segmentation
   step to one probe step. On an H100 the probe is launch-bound (issue 30: many small kernels),
   1024-pixel crops far less: the scaled figure is an upper estimate.

    python benchmarks/gpu_check.py --out runs/gpu_check                  # needs a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gc    # the CPU-runnable parts

Writes ``gpu_check.md`` (the table) and ``gpu_check.json`` into ``--out``; exits 2 with one line
when ``--device`` is cuda and torch sees no GPU, 1 when a command failed.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bottleneck_resnet import ResNet, SegNet, forward_macs  # noqa: E402
from recon_cost import plain_loss, run_unit  # noqa: E402

PAPER_ITERS = 20_000
OFFICE = {"methods": ["brecq", "qdrop", "hdrq"], "bits": 5, "experts": 3, "sources": 4}
SEG = {"methods": ["brecq", "qdrop", "hdrq"], "bits": 2, "experts": 2, "crop": 1024, "batch": 1}
METHODS = ("adaround", "brecq", "qdrop", "hdrq", "ttaq")


def probe_model() -> tuple[nn.Module, str]:
    """torchvision's ResNet-50 (random init) if importable, else the built-in one."""
    try:
        import torchvision

        return torchvision.models.resnet50(weights=None), f"torchvision {torchvision.__version__} resnet50"
    except Exception:  # noqa: BLE001  (absent, or built for another torch)
        return ResNet(), "built-in ResNet-50 (torchvision's layers)"


# --- 1. commands -------------------------------------------------------------------------------

@dataclass
class Command:
    name: str
    argv: Callable[[Path, str], list[str]]  # (work folder, device tag) -> mergeq arguments
    number: Callable[[Path, str, str], float]  # (work folder, device tag, stdout) -> the number
    what: str = ""
    results: dict = field(default_factory=dict)


def _printed(pattern: str):
    return lambda w, dev, out: float(re.findall(pattern, out)[-1])


def _written(rel: str, pick: Callable[[dict], float]):
    return lambda w, dev, out: pick(json.loads((w / rel.format(dev=dev)).read_text()))


def _hmean(res: dict) -> float:
    return 100 * res["rows"][-1]["merged"]["hmean"]


def commands(quick: bool) -> list[Command]:
    """Every command on the tiny digits setting, and ``run`` on the embedded ``streets`` segmentation
    benchmark; ``{dev}`` names each device's own outputs."""
    width, calib, iters, images = (4, 32, 5, 32) if quick else (8, 128, 50, 256)
    seg_steps = (4, 2) if quick else (100, 50)  # streets: source training, DACS per expert
    base = ["--preset", "quick", "--seed", "0", "--quiet", "--set", "model.name=resnet8",
            "--set", f"model.kwargs.width={width}",
            "--set", "adapt.source.epochs=1", "--set", "adapt.shot.epochs=1", "--set", f"ptq.calib_size={calib}",
            "--set", f"ptq.options.hdrq.iters={iters}", "--set", f"ptq.options.ttaq.iters={iters}"]
    cfg = lambda w, dev: ["--config", str(w / f"run-{dev}" / "config.yaml"), "--quiet"]  # noqa: E731
    f = lambda w, dev, name: str(w / f"{name}-{dev}.safetensors")  # noqa: E731

    def streets(tag: str) -> Command:  # segmentation: DeepLab-style model, DACS experts, mIoU (H of city, india)
        seg = ["--preset", "quick", "--seed", "0", "--quiet", "--set", "data={kind: streets}",
               "--set", "model.name=deeplab_mini", "--set", f"model.kwargs.width={width}",
               "--set", f"adapt.seg_source.steps={seg_steps[0]}", "--set", f"adapt.dacs.steps={seg_steps[1]}",
               "--set", f"ptq.calib_size={calib}", "--set", f"ptq.options.hdrq.iters={iters}",
               "--set", "merge.data_free_row=true"]
        return Command(tag, lambda w, dev: ["run", *seg, "--methods", "rtn,hdrq", "--bits", "W4A4",
                                            "--cache-dir", str(w / f"cache-{dev}"), "--out", str(w / f"{tag}-{dev}")],
                       _written(f"{tag}-{{dev}}/results.json", _hmean), "merged H (mIoU) %, hdrq W4A4")

    def run(tag: str, *extra: str) -> Command:
        return Command(tag, lambda w, dev: ["run", *base, "--targets", "uci,noisy", "--methods", "rtn,hdrq",
                                            "--bits", "W4A4", *extra, "--cache-dir", str(w / f"cache-{dev}"),
                                            "--out", str(w / f"{tag}-{dev}")],
                       _written(f"{tag}-{{dev}}/results.json", _hmean), "merged hmean %, hdrq W4A4")

    return [
        run("run"),
        run("run-noise-bn", "--rounding", "noise", "--samples", "8", "--set", "merge.recalibrate=bn"),
        run("run-float-act", "--rounding", "float", "--set", "merge.recalibrate=act"),
        run("run-none", "--set", "merge.recalibrate=none"),
        Command("pmq", lambda w, dev: ["pmq", *cfg(w, dev), "--merges", "task_arithmetic", "--methods",
                                       "rtn,gptq,epmq", "--bits", "W4", "--out", str(w / f"pmq-{dev}")],
                _written("pmq-{dev}/results.json", _hmean), "merged hmean %, epmq W4"),
        Command("tta", lambda w, dev: ["tta", *cfg(w, dev), "--methods", "fp+tent,ttaq", "--bits", "W4A4",
                                       "--streams", "balanced", "--corruptions", "gaussian_noise,fog",
                                       "--n-images", str(images), "--out", str(w / f"tta-{dev}")],
                _written("tta-{dev}/results.json", lambda r: 100 * r["rows"][-1]["mean_error"]), "mean error %, ttaq"),
        Command("bench", lambda w, dev: ["bench", *cfg(w, dev), "--methods", "rtn", "--bits", "W4A4",
                                         "--out", str(w / f"bench-{dev}")],
                _written("bench-{dev}/results.json", lambda r: 100 * r["rows"][0]["merged"]["hmean"]),
                "merged hmean %, rtn W4A4"),
        Command("compare", lambda w, dev: ["compare", *cfg(w, dev), "--methods", "rtn,hdrq", "--bits", "W4A4",
                                           "--ptq-seeds", "2", "--out", str(w / f"compare-{dev}")],
                _written("compare-{dev}/results.json", lambda r: r["bits"]["W4A4"]["methods"]["hdrq"]["mean"]),
                "mean merged hmean %, hdrq"),
        Command("train-source", lambda w, dev: ["train-source", *cfg(w, dev), "--out", f(w, dev, "source")],
                _printed(r"=([0-9.]+)%"), "source accuracy % (last domain)"),
        *[Command(f"adapt-{d}", lambda w, dev, d=d: ["adapt", *cfg(w, dev), "--source", f(w, dev, "source"),
                                                     "--domain", d, "--out", f(w, dev, d)],
                  _printed(r"SHOT expert ([0-9.]+)%"), f"{d} expert accuracy %") for d in ("uci", "noisy")],
        *[Command(f"quantize-{d}", lambda w, dev, d=d: ["quantize", *cfg(w, dev), "--model", f(w, dev, d),
                                                        "--source", f(w, dev, "source"), "--method", "hdrq",
                                                        "--bits", "W4A4", "--out", f(w, dev, f"{d}-w4a4")],
                  _printed(r"accuracy ([0-9.]+)%"), f"{d} hdrq W4A4 accuracy %") for d in ("uci", "noisy")],
        Command("merge", lambda w, dev: ["merge", f(w, dev, "uci-w4a4"), f(w, dev, "noisy-w4a4"), "--rounding",
                                         "noise", "--samples", "8", "--out", f(w, dev, "merged")],
                _printed(r"hmean ([0-9.]+)%"), "merged hmean %"),
        Command("export", lambda w, dev: ["export", "--model", f(w, dev, "merged"), "--out",
                                          str(w / f"packed-{dev}.safetensors"), "--quiet"],
                _printed(r", ([0-9.]+) KiB;"), "packed file KiB"),
        *[Command(name, lambda w, dev, name=name: [name, *cfg(w, dev), "--methods", "rtn", "--bits", "W4A4",
                                                   "--points", "3", "--out", str(w / f"{name}-{dev}")],
                  _printed(pattern), what)
          for name, pattern, what in (("barrier", r"loss barrier ([-0-9.]+)", "rtn loss barrier"),
                                      ("surface", r"centre loss ([-0-9.]+)", "rtn centre loss"))],
        streets("run-streets"),  # last: its data take ~15 s of CPU to render (once per cache), the others go first
    ]


def run_commands(cmds: list[Command], work: Path, dev: str, device: str, threads: int, timeout: float,
                 deadline: float) -> None:
    """Each command as ``python -m mergeq.cli ... --device DEVICE --threads T`` (where it takes
    them) in order, into ``cmd.results[dev]``: exit status, seconds, the number (None if none)."""
    for cmd in cmds:
        args = cmd.argv(work, dev)
        args += [] if args[0] == "export" else ["--device", device] + ([] if args[0] == "merge" else
                                                                       ["--threads", str(threads)])
        if time.monotonic() > deadline:
            cmd.results[dev] = {"exit": None, "seconds": 0.0, "number": None, "error": "skipped: out of time"}
            continue
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "mergeq.cli", *args], capture_output=True, text=True,
                               timeout=max(1.0, min(timeout, deadline - time.monotonic())))
            code, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired:
            code, out, err = 124, "", "timed out"
        res = {"exit": code, "seconds": time.perf_counter() - t, "number": None}
        try:
            res["number"] = cmd.number(work, dev, out) if code == 0 else None
        except (OSError, ValueError, KeyError, IndexError) as e:
            res["error"] = f"no number: {e}"
        if code != 0:
            res["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
        cmd.results[dev] = res


# --- 2. the probe ------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def fp_seconds(fp_unit: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int, steps: int, warmup: int,
               device: torch.device) -> float:
    """Seconds per plain FP forward + backward (squared error) of ``fp_unit`` on batches of ``bs``."""
    unit = copy.deepcopy(fp_unit).requires_grad_(True)
    nb = max(1, min(4, len(x) // bs))
    x, y = x[:nb * bs].to(device), y[:nb * bs].to(device)

    def run(n: int) -> None:
        for i in range(n):
            j = (i % nb) * bs
            unit.zero_grad(set_to_none=True)
            plain_loss(unit(x[j:j + bs]), y[j:j + bs]).backward()

    run(warmup)
    return _timed(lambda: run(steps), device) / steps


def probe(device: str, methods=METHODS, size: int = 224, batch: int = 32, n_calib: int = 256, steps: int = 50,
          warmup: int = 20, model: nn.Module | None = None) -> dict:
    """Per method: Σ_units step and FP forward+backward seconds, their ratio, peak GPU memory; on a
    CUDA device for the steps as CUDA graphs (the default) and eager, and how far the graphed
    reconstruction's unit outputs are from the eager one's with the same seed."""
    from mergeq.nn import calibrate_activations, fold_bn, prepare
    from mergeq.nn.blocks import partition
    from mergeq.ptq.recon import capture
    from mergeq.quant.config import QuantConfig

    dev = torch.device(device)
    torch.manual_seed(0)
    name = f"{type(model).__name__} (given)"
    if model is None:
        model, name = probe_model()
    calib = torch.randn(n_calib, 3, size, size)
    fp = fold_bn(model.eval(), calib[:2]).to(dev).requires_grad_(False)
    q = prepare(model, QuantConfig(w_bits=4, a_bits=4), calib[:2]).to(dev)
    calibrate_activations(q, calib)
    out = {"model": name, "size": size, "batch": batch, "calib": n_calib, "steps": steps, "warmup": warmup,
           "macs": forward_macs(model, (batch, 3, size, size)), "methods": {}}
    modes = (True, False) if dev.type == "cuda" else (False,)
    fallbacks = _Warnings("mergeq.ptq.graphs")  # units whose step could not be captured (they ran eagerly)
    for method in methods:
        res = out["methods"][method] = {}
        fallbacks.messages.clear()
        rows: dict[bool, list] = {g: [] for g in modes}
        diffs = []
        for unit_name, unit in partition(q, calib[:2].to(dev), layerwise=method == "adaround"):
            x_q, _ = capture(q, unit_name, calib, 64, dev, output=False)
            x_fp, y_fp = capture(fp, unit_name, calib, 64, dev, output=True)
            data = (x_q, x_fp, y_fp)
            fp_s = fp_seconds(fp.get_submodule(unit_name), x_fp, y_fp, batch, steps, 5, dev)
            done = {}
            for graphs in modes:
                if dev.type == "cuda" and graphs:
                    torch.cuda.reset_peak_memory_stats(dev)

                def run(n: int, graphs=graphs) -> nn.Module:
                    torch.manual_seed(1)
                    return run_unit(method, unit_name, copy.deepcopy(unit), data, n, batch, fp, dev, graphs)

                _sync(dev)
                t = time.perf_counter()
                done[graphs] = run(warmup + steps)  # first: it also warms up cuDNN / oneDNN and the allocator
                _sync(dev)
                long = time.perf_counter() - t
                short = _timed(lambda: run(warmup), dev)
                rows[graphs].append((unit_name, max(long - short, 0.0) / steps, fp_s))
                if dev.type == "cuda" and graphs:
                    res["peak_gib"] = max(res.get("peak_gib", 0.0), torch.cuda.max_memory_allocated(dev) / 2**30)
            if len(done) == 2:  # the same seed, graphed against eager: the finished units' outputs
                with torch.no_grad():
                    x = x_q[:batch].to(dev)
                    a, b = done[True].eval()(x), done[False].eval()(x)
                    diffs.append(float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12)))
        for graphs, r in rows.items():
            step_s, fp_s = sum(x[1] for x in r), sum(x[2] for x in r)
            res["graphed" if graphs else "eager"] = {"units": len(r), "step_ms": 1e3 * step_s, "fp_ms": 1e3 * fp_s,
                                                     "ratio": step_s / fp_s,
                                                     "per_unit": [[n, 1e3 * a, 1e3 * b] for n, a, b in r]}
        res.update(res["graphed" if modes[0] else "eager"])  # the headline: what runs by default
        res.setdefault("peak_gib", None)
        res["graphed_vs_eager_max_rel_output_diff"] = max(diffs) if diffs else None
        res["graph_fallbacks"] = list(fallbacks.messages)
    fallbacks.close()
    return out


class _Warnings(logging.Handler):
    """Collects the warnings of one logger (from now until :meth:`close`)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def close(self) -> None:
        self.logger.removeHandler(self)
        super().close()


# --- 3. estimates ------------------------------------------------------------------------------

def gpu_hours(step_ms: float, iters: int = PAPER_ITERS) -> float:
    """Hours for ``iters`` steps of every unit when one step of all units takes ``step_ms``."""
    return iters * step_ms / 1e3 / 3600


def estimates(probe_res: dict, seg_macs: int, office: dict = OFFICE, seg: dict = SEG,
              iters: int = PAPER_ITERS) -> dict:
    """GPU-hours of the paper preset from the probe (module docstring, part 3)."""
    per = probe_res["methods"]
    scale = seg_macs / probe_res["macs"]
    res = {"iters": iters, "seg_macs_ratio": scale, "office_home": {}, "segmentation": {}}
    for m in per:
        res["office_home"][m] = gpu_hours(per[m]["step_ms"], iters)
        res["segmentation"][m] = gpu_hours(per[m]["step_ms"] * scale, iters)
    known = lambda table, spec: [m for m in spec["methods"] if m in res[table]]  # noqa: E731
    block = sum(res["office_home"][m] for m in known("office_home", office)) * office["bits"] * office["experts"]
    res["office_home_block"], res["office_home_table"] = block, block * office["sources"]
    res["segmentation_table"] = sum(res["segmentation"][m] for m in known("segmentation", seg)) * seg["bits"] \
        * seg["experts"]
    return res


# --- the table ---------------------------------------------------------------------------------

def _num(x) -> str:
    return "—" if x is None else f"{x:.4g}"


def table(result: dict) -> str:
    """The markdown table of a result (commands, probe, memory, estimates)."""
    dev = result["device"]
    both = dev != "cpu" and any("cpu" in c for c in result["commands"])
    pair = f"{dev} / cpu" if both else dev
    lines = [f"| part | item | exit ({pair}) | seconds ({pair}) | {dev} | cpu | difference |",
             "|---|---|---|---|---:|---:|---:|"]
    for c in result["commands"]:
        a, b = c.get(dev, {}), (c.get("cpu", {}) if both else {})
        diff = None if a.get("number") is None or b.get("number") is None else a["number"] - b["number"]
        exits, secs = f"{a.get('exit', '—')}", f"{a.get('seconds', 0):.1f}"
        if both:
            exits += f" / {b.get('exit', '—')}"
            secs += f" / {b['seconds']:.1f}" if "seconds" in b else " / —"
        note = f" ({a['error']})" if a.get("error") else ""
        lines.append(f"| command | {c['name']}: {c['what']}{note} | {exits} | {secs} | {_num(a.get('number'))} | "
                     f"{_num(b.get('number'))} | {_num(diff)} |")
    p = result.get("probe")
    if p:
        for m, r in p["methods"].items():
            peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.2f} GiB"
            mode = "CUDA graphs" if "graphed" in r else "eager"
            eager = f"; eager {r['eager']['step_ms']:.2f} ms = {r['eager']['ratio']:.2f}" if "graphed" in r else ""
            diff = r.get("graphed_vs_eager_max_rel_output_diff")
            diff = "" if diff is None else f"; graphed vs eager, same seed: unit outputs within {diff:.1e} (relative)"
            fell = r.get("graph_fallbacks") or []
            diff += f"; {len(fell)} unit run(s) not captured, e.g. {fell[0][:160]}" if fell else ""
            lines.append(f"| probe | {m}: step ({mode}) / FP f+b over {r['units']} units ({p['model']}, {p['size']} px, "
                         f"batch {p['batch']}{peak}{eager}{diff}) | | | {r['step_ms']:.2f} / {r['fp_ms']:.2f} ms = "
                         f"**{r['ratio']:.2f}** | | |")
    e = result.get("estimates")
    if e:
        for m in e["office_home"]:
            lines.append(f"| estimate | {m}: GPU-hours per expert and bit pair, {e['iters']:,} iterations/unit "
                         f"(Office-Home R50 / segmentation R101-OS8 1024 px) | | | "
                         f"{e['office_home'][m]:.2f} / {e['segmentation'][m]:.1f} | | |")
        lines.append(f"| estimate | GPU-hours: Office-Home source block (3 methods x 5 bit pairs x 3 experts) / "
                     f"Table 2 (x 4 sources) / segmentation Table 1 (3 methods x 2 x 2 experts; upper: MACs x "
                     f"{e['seg_macs_ratio']:.1f}) | | | {e['office_home_block']:.1f} / {e['office_home_table']:.1f} / "
                     f"{e['segmentation_table']:.0f} | | |")
    return "\n".join(lines)


def write(out: Path, result: dict) -> tuple[Path, Path]:
    """``gpu_check.md`` (header line and table) and ``gpu_check.json`` in ``out``."""
    from mergeq.io import atomic_write_text, write_json

    out.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(out / "gpu_check.md", f"{result['title']}\n\n{table(result)}\n")
    return md, write_json(out / "gpu_check.json", result)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="the device to check (default cuda; cpu: a smoke run)")
    ap.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.md / .json and the runs")
    ap.add_argument("--quick", action="store_true", help="tiny commands and probe (a smoke run of the script)")
    ap.add_argument("--skip-cpu", action="store_true", help="do not run the commands on the CPU as well")
    ap.add_argument("--methods", default=",".join(METHODS), help="probe methods (comma-separated)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per unit (default 30; --quick 2)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole check (commands stop "
                                                                   "early enough to leave the probe its time)")
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds per command")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    return args


def no_cuda(device: str) -> str | None:
    """The one line to refuse with when ``device`` is CUDA and torch sees no GPU (else None)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return (f"gpu_check: no CUDA device: torch {torch.__version__} sees none (install a CUDA build of torch on "
                "a GPU machine; --device cpu --quick runs the CPU parts)")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refusal = no_cuda(args.device)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    t0, out = time.monotonic(), Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    dev = args.device.replace(":", "")
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    cmds = commands(args.quick)
    cores = os.cpu_count() or 2
    deadline = t0 + args.budget - (20 if args.quick else 150)  # the probe's share of the budget
    chains = [threading.Thread(target=run_commands, args=(cmds, work, dev, args.device, max(1, cores // 4),
                                                          args.timeout, deadline))]
    if not args.skip_cpu and dev != "cpu":
        chains.append(threading.Thread(target=run_commands, args=(cmds, work, "cpu", "cpu", max(1, cores // 2),
                                                                  args.timeout, deadline)))
    for c in chains:
        c.start()
    for c in chains:
        c.join()
    steps = args.steps or (2 if args.quick else 30)
    small = dict(size=32, batch=4, n_calib=8, warmup=1, model=ResNet((1, 1, 1, 1))) if args.quick else {}
    p = probe(args.device, args.methods, steps=steps, **small)
    with torch.device("meta"):
        seg = forward_macs(SegNet(), (SEG["batch"], 3, SEG["crop"], SEG["crop"]))
    title = f"mergeq GPU check: {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    result = {"title": title + (" (--quick: a smoke run of the script, not a measurement)" if args.quick else ""),
              "device": dev, "device_name": name, "torch": torch.__version__, "quick": args.quick,
              "commands": [{"name": c.name, "what": c.what, **c.results} for c in cmds], "probe": p,
              "estimates": estimates(p, seg), "seconds": time.monotonic() - t0}
    md, js = write(out, result)
    print(md.read_text())
    print(f"wrote {md} and {js} ({result['seconds']:.0f} s)", file=sys.stderr)
    return 0 if all(c.results.get(d, {}).get("exit") == 0 for c in cmds for d in c.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
