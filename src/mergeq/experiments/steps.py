"""The pipeline step by step, one checkpoint at a time, and the analyses of ``barrier``/``surface``.

Each step takes the same config as ``mergeq run`` (its ``adapt``, ``ptq``, ``merge`` and
``runtime`` sections; the data and model of a checkpoint come from the checkpoint's metadata,
and the recorded config's ``data`` says which) and writes, beside the checkpoint ``OUT``, its
side file :func:`config_path` (``m.safetensors`` -> ``m.config.yaml``, ``m.json`` ->
``m.json.config.yaml``): the resolved config, which reran gives the same checkpoint; ``merge``
also its report (``m.report.json``). No output may overwrite an input or another checkpoint's
side file (:func:`check_outputs`). A checkpoint naming a ``builder`` is loaded onto the config's
own ``model:`` or, with ``trust_builder``, built from the file (:func:`load_checkpoint_model`).
Checkpoints: :mod:`mergeq.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from ..adapt.segmentation import dacs
from ..adapt.shot import shot
from ..checkpoint import builder_template, check_meta_types, model_from_checkpoint, save_model
from ..data import Benchmark, load_data
from ..data.spec import task_of
from ..data_utils import as_tensor, take
from ..errors import IncompatibleModelsError, MergeqError
from ..eval import evaluate, linear_path, loss_surface, score
from ..io import (atomic_write_text, check_out_dir, check_out_file, config_diff, read_checkpoint_header, utf8_name,
                  write_json)
from ..merge import MERGE_METHODS, check_rounding_options, merge
from ..merge.recalibrate import recalibrate
from ..models.spec import file_sha256
from ..ptq import quantize
from ..quant.config import parse_bits
from . import health
from .config import Config, check_average_weights, resolve, translate_legacy, with_data
from .pool import Pool, deployed_model, deployment_images, qconfig
from .store import claimed

log = logging.getLogger(__name__)
ARCH_KEYS = ("arch", "arch_kwargs", "model", "num_classes")
KEPT_KEYS = (*ARCH_KEYS, "source_sha256")  # what quantize and merge carry over from their input


SIDE_SUFFIXES = (".config.yaml", ".report.json")


def side_file(out: str | Path, suffix: str) -> Path:
    """The side file (``suffix``: one of :data:`SIDE_SUFFIXES`) of checkpoint ``out``: its name
    with ``.safetensors`` replaced by ``suffix`` (``m.safetensors`` -> ``m.config.yaml``), any
    other name kept whole (``m.json`` -> ``m.json.config.yaml``), so two checkpoints of one
    folder share a side file only as ``P`` and ``P.safetensors`` (:func:`check_outputs` refuses that)."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix == ".safetensors" else out
    return base.with_name(base.name + suffix)


def config_path(out: str | Path) -> Path:
    """Where a step writes the config of checkpoint ``out``."""
    return side_file(out, ".config.yaml")


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def _owners(side: Path) -> list[Path]:
    """The checkpoints whose side file ``side`` would be."""
    suffix = next((x for x in SIDE_SUFFIXES if side.name.endswith(x)), None)
    if suffix is None:
        return []
    stem = side.with_name(side.name[:-len(suffix)])
    return [stem.with_name(stem.name + ".safetensors"), stem]


def check_outputs(out: str | Path, inputs: list[str | Path | None] = (), report: str | Path | None = None,
                  config: bool = True) -> None:
    """Refuse, before any work, a step whose outputs (``out``, the config it writes beside it if
    ``config``, the merge ``report``) would overwrite one of its ``inputs`` or a side file of
    another checkpoint (an input's, or one that exists), or whose ``out`` is named like a side file."""
    out = utf8_name(out, "--out")
    outputs = {"--out": out, **({"the config written beside --out": config_path(out)} if config else {}),
               **({"--report": Path(report)} if report is not None else {})}
    ins = [Path(p) for p in inputs if p is not None]
    for what, path in outputs.items():
        for src in ins:
            if _same(path, src):
                raise MergeqError(f"{what} {path} is the input {src}; writing it would overwrite the input: "
                                  "choose another path")
        for owner in _owners(path) if path != out else []:
            if not _same(owner, out) and (owner.is_file() or any(_same(owner, src) for src in ins)):
                raise MergeqError(f"{what} {path} is the side file of the checkpoint {owner}; writing it would "
                                  "overwrite that checkpoint's record: choose another --out or --report")
    if out.name.endswith(SIDE_SUFFIXES):
        raise MergeqError(f"--out {out} is named like a checkpoint's side file ({', '.join(SIDE_SUFFIXES)}): "
                          "choose another name")
    if report is not None and Path(report).suffix != ".json":
        raise MergeqError(f"--report {report}: the merge report is JSON; give a path ending in .json")


def _record(cfg: Config, out: str | Path) -> None:
    atomic_write_text(config_path(out), cfg.to_yaml())


def _one(cfg: Config, what: str) -> tuple[str, tuple[int, int | None]]:
    """The one PTQ method and bit pair a step quantizes with."""
    if len(cfg.ptq.methods) != 1 or len(cfg.ptq.bits) != 1:
        raise MergeqError(f"{what} takes one PTQ method and one bit pair; the config lists ptq.methods "
                          f"{cfg.ptq.methods} and ptq.bits {cfg.ptq.bits}: pass --method and --bits")
    return cfg.ptq.methods[0], parse_bits(cfg.ptq.bits[0])


def load_checkpoint_model(path: str | Path, config: Config, device: str = "cpu",
                          trust_builder: bool = False) -> tuple[torch.nn.Module, dict, torch.nn.Module | None]:
    """A checkpoint's model, its metadata and the template it was loaded onto (None: rebuilt from
    the allow-list). A ``builder`` the file names is never run from the file: the config's own
    ``model:`` (set by the user, not the preset's) is the template, else the file is refused
    unless ``trust_builder`` (:mod:`mergeq.checkpoint`)."""
    template = builder_template(path, config.model, trust_builder)
    model, meta = model_from_checkpoint(path, device, template, trust_builder)
    return model, meta, template


def checkpoint_data(meta: dict, cfg: Config, domains: list[str]) -> tuple[Benchmark, int]:
    """The data a checkpoint was made with (its ``data`` spec, or the earlier ``benchmark`` name;
    without either the config's), with ``domains`` as targets, and the seed of its splits."""
    if "data" in meta:
        spec = meta["data"]
    elif "benchmark" in meta:
        spec = translate_legacy({"benchmark": meta["benchmark"]})["data"]
    else:
        spec = dataclasses.asdict(cfg.data)
    seed = meta.get("seed", cfg.runtime.seed)
    bench = load_data({**spec, "targets": [d for d in domains if d != spec.get("source")] or None}, seed,
                      cfg.runtime.cache_dir)
    return bench, seed


def _domain(bench: Benchmark, name: str):
    return bench.source if name == bench.source.name else bench.targets[name]


def export_calibration(meta: dict, size: int) -> torch.Tensor:
    """Calibration images for integer-kernel export: the calibration splits of the checkpoint's
    domains (``domains`` of a merge, else its ``domain``), the same number from each."""
    from ..data.folder import FolderNotFoundError
    from ..deploy import ExportError

    domains = meta.get("domains") or ([meta["domain"]] if meta.get("domain") else [])
    if not domains or not ("data" in meta or "benchmark" in meta):
        raise ExportError("--kernels int8 calibrates on the checkpoint's domains, but its metadata names "
                          "no domains or no data")
    try:
        bench, _ = checkpoint_data(meta, Config(), domains)
    except FolderNotFoundError as e:
        raise ExportError(f"--kernels int8 calibrates on the images of domains {domains} of the checkpoint's data "
                          f"folder {meta.get('data', {}).get('root')}, which cannot be read: {e}") from None
    known = [bench.source.name, *bench.targets]
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise ExportError(f"domains {unknown} are not in the checkpoint's data; known: {known}")
    return deployment_images(bench, domains, size)


def train_source(config: Config, out: str | Path, progress: bool = False) -> dict[str, float]:
    """Train (or reuse the cached) source model, save it to ``out``; its accuracy on every domain."""
    check_outputs(out)
    check_out_file(out)
    pool = Pool(config, progress)
    model, accs = pool.source, pool.check_source()
    save_model(model, out, pool.checkpoint_meta(domain=pool.bench.source.name, role="source", accuracy=accs,
                                                config=dataclasses.asdict(pool.source_config)))
    _record(pool.cfg, out)
    return accs


def adapt(config: Config, source: str | Path, domain: str, out: str | Path, progress: bool = False,
          trust_builder: bool = False) -> tuple[float, float]:
    """Adapt the source checkpoint to ``domain`` (SHOT; DACS with the source's labelled data for
    segmentation), save the expert; (source, expert) score there."""
    check_outputs(out, [source])
    check_out_file(out)
    cfg = _apply(config)
    model, meta, template = load_checkpoint_model(source, config, cfg.runtime.device, trust_builder)
    bench, seed = checkpoint_data(meta, cfg, [domain])
    if task_of(bench.spec) != task_of(cfg.data):  # the checkpoint's data decide the adaptation's preset
        cfg = _apply(with_data(config, {k: v for k, v in bench.spec.items() if k != "targets"}))
    dom = bench.targets[domain]
    if task_of(bench.spec) == "segmentation":
        how = cfg.adapt.dacs
        expert = dacs(model, bench.source.train, dom.train, how, seed=seed, device=cfg.runtime.device,
                      progress=progress)
    else:
        how = cfg.adapt.shot
        expert = shot(model, dom.train, how, seed=seed, device=cfg.runtime.device, progress=progress)
    before, after = (score(m, dom.test, device=cfg.runtime.device) for m in (model, expert))
    health.check_expert(domain, before, after, "dacs" if task_of(bench.spec) == "segmentation" else "shot")
    save_model(expert, out, {**{k: meta[k] for k in ARCH_KEYS if k in meta}, "data": bench.spec, "seed": seed,
                             "source_sha256": file_sha256(source), "domain": domain, "role": "expert",
                             "config": dataclasses.asdict(how), "accuracy": {"source": before, "expert": after}}, template)
    _record(with_data(cfg, bench.spec), out)
    return before, after


def quantize_checkpoint(config: Config, model_path: str | Path, out: str | Path, source: str | Path | None = None,
                        domain: str | None = None, progress: bool = False,
                        trust_builder: bool = False) -> tuple[str, float]:
    """Quantize a checkpoint (the config's one method and bit pair) on ``domain``'s calibration
    split (default: the checkpoint's own), save it; (domain, accuracy there)."""
    cfg = _apply(config)
    method, bits = _one(cfg, "quantize")
    check_outputs(out, [model_path, source])
    check_out_file(out)
    device = cfg.runtime.device
    model, meta, template = load_checkpoint_model(model_path, config, device, trust_builder)
    src = load_checkpoint_model(source, config, device, trust_builder)[0] if source else None
    domain = domain or meta.get("domain")
    if not domain:
        raise MergeqError(f"{model_path} names no domain to calibrate on: pass --domain")
    bench, seed = checkpoint_data(meta, cfg, [domain])
    dom = _domain(bench, domain)
    qcfg = qconfig(cfg, bits)
    q = quantize(model, method, calib=dom.train, config=qcfg, source=src, calib_size=cfg.ptq.calib_size,
                 device=device, seed=cfg.runtime.seed, progress=progress, **cfg.ptq.options.get(method, {}))
    acc = score(deployed_model(q, bench, [domain]), dom.test, device=device)
    save_model(q, out, {**{k: meta[k] for k in KEPT_KEYS if k in meta}, "data": bench.spec, "seed": seed,
                        "domain": domain, "role": "quantized expert", "method": method, "bits": qcfg.tag,
                        "accuracy": acc}, template)
    _record(with_data(cfg, bench.spec), out)
    return domain, acc


def merge_checkpoints(config: Config, paths: list[str], method: str, out: str | Path, report: str | Path | None,
                      base: str | None = None, trust_builder: bool = False) -> dict[str, Any]:
    """Merge checkpoints (``average``: quantized experts stay quantized, merged with
    ``merge.rounding``; ``task_arithmetic``/``ties`` around ``base``) of one source model, seed and
    data split (:func:`check_same_origin`), recalibrate (``merge.recalibrate``, on each domain's first
    ``ptq.calib_size`` calibration images; a mode left to the preset is skipped with a warning when
    the checkpoints name no data or it cannot be read), save, evaluate when their data can be read
    (else ``not_evaluated`` says why); the JSON report (also written to ``report``, with the
    ``recalibrate`` mode applied)."""
    cfg = _apply(config)
    MERGE_METHODS.get(method)
    m = cfg.merge
    options = dict(m.options.get(method, {}))
    if method == "average":
        rounding = m.rounding
        options.update(rounding=rounding, **m.rounding_options)
        if rounding.startswith("noise"):
            options.setdefault("seed", cfg.runtime.seed)
        check_rounding_options(rounding, {k: v for k, v in options.items() if k not in ("rounding", "weights")})
        check_average_weights(cfg, len(paths))
    report_path = Path(report) if report else side_file(out, ".report.json")
    if report_path.resolve() == Path(out).resolve():
        raise MergeqError(f"the report path {report_path} is the checkpoint path: pass another --report")
    check_outputs(out, [*paths, base], report_path)
    check_out_file(out)
    check_out_file(report_path)
    headers = [(p, read_checkpoint_header(p)[1]) for p in paths]
    if base:  # the experts' source model: its own file
        headers.append((base, {"source_sha256": file_sha256(base), **read_checkpoint_header(base)[1]}))
    check_same_origin(headers)
    device = cfg.runtime.device
    loaded = [load_checkpoint_model(p, config, device, trust_builder) for p in paths]
    models, metas = [mdl for mdl, _, _ in loaded], [meta for _, meta, _ in loaded]
    if base:
        options["base"] = load_checkpoint_model(base, config, device, trust_builder)[0]
    merged = merge(models, method=method, **options)
    domains = [meta.get("domain") for meta in metas]
    meta = {k: metas[0][k] for k in (*KEPT_KEYS, "benchmark", "data", "seed") if k in metas[0]}
    result: dict[str, Any] = {"experts": [str(p) for p in paths], "domains": domains, "method": method,
                              "options": {k: v for k, v in options.items() if k != "base"}, "base": base}
    bench, unread = _merge_data(meta, cfg, domains)
    mode = cfg.merge.recalibrate
    if mode != "none" and bench is None:
        if config.merge.recalibrate is not None:  # asked for by the user, not the preset
            raise MergeqError(f"merge.recalibrate {mode} re-estimates the merge on each expert's calibration "
                              f"images, but {unread}: pass --set merge.recalibrate=none")
        log.warning("merge.recalibrate: %s; merged without recalibration (the preset's %s needs each expert's "
                    "calibration images)", unread, mode)
        mode = "none"
        cfg = cfg.updated({"merge.recalibrate": "none"})
    if mode != "none":
        calib = [as_tensor(_domain(bench, d).train, limit=cfg.ptq.calib_size) for d in domains]
        recalibrate(merged, models, calib, mode, options.get("weights"))
    result["recalibrate"] = mode
    if bench is not None:
        result["accuracy"] = evaluate(deployed_model(merged, bench, domains), {d: _domain(bench, d).test for d in domains},
                                      device)
    else:
        result["not_evaluated"] = unread
        log.warning("the merged model is not evaluated: %s", unread)
    save_model(merged, out, {**meta, "role": "merged", "domains": domains, "merge": result}, loaded[0][2])
    write_json(report_path, result)
    _record(cfg, out)
    return result


def _merge_data(meta: dict, cfg: Config, domains: list[str | None]) -> tuple[Benchmark | None, str | None]:
    """The data of the checkpoints to merge, or None and why not: they name none, or it cannot be
    read (a data-free merge, ``merge.recalibrate: none``, needs no data: it is then not evaluated)."""
    if not (("data" in meta or "benchmark" in meta) and all(domains)):
        return None, "the checkpoints do not name their data and domains"
    try:
        return checkpoint_data(meta, cfg, list(dict.fromkeys(domains)))[0], None
    except (MergeqError, OSError) as e:
        return None, f"the checkpoints' data cannot be read ({' '.join(str(e).split())})"


def _origin(meta: dict, shared: set[str]) -> dict[str, Any]:
    """What the experts of one merge must share: the source model, the split seed and the data (its
    ``splits`` restricted to the ``shared`` domains; ``targets`` differ by expert)."""
    data = meta.get("data")
    if data is not None:
        data = {k: ({d: v for d, v in data[k].items() if d in shared} if k == "splits" and isinstance(data[k], dict)
                    else data[k]) for k in data if k != "targets"}
    return {k: v for k, v in {"source_sha256": meta.get("source_sha256"), "seed": meta.get("seed"),
                              "benchmark": meta.get("benchmark"), "data": data}.items() if v is not None}


def check_same_origin(checkpoints: list[tuple[str | Path, dict]]) -> None:
    """Refuse, before any work, checkpoints to merge (experts and base) made from other source
    models, seeds or data splits (their ``source_sha256``, ``seed``, ``data`` or ``benchmark``
    metadata; a base is its own source): their merge mixes unrelated models, and evaluating it on
    one file's split would test on the other's training images. The error names the two files
    and what differs; metadata one file lacks is not compared, metadata of the wrong type is refused."""
    for path, meta in checkpoints:
        check_meta_types(meta, path)
    first, meta0 = checkpoints[0]
    for path, meta in checkpoints[1:]:
        splits = [set(m.get("data", {}).get("splits") or {}) for m in (meta0, meta)]
        a, b = _origin(meta0, splits[0] & splits[1]), _origin(meta, splits[0] & splits[1])
        keys = a.keys() & b.keys()
        diff = config_diff({k: a[k] for k in keys}, {k: b[k] for k in keys})
        if diff:
            shown = []
            for name in diff:
                va, vb = (_at(x, name) for x in (a, b))
                plain = all(v is None or isinstance(v, (str, int, float, bool)) for v in (va, vb))
                shown.append(f"{name} ({va!r} vs {vb!r})" if plain else name)
            raise IncompatibleModelsError(
                f"{first} and {path} come from different runs ({', '.join(shown)} differ): merge experts of one "
                "source model, seed and data split")


def _at(d: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _apply(config: Config) -> Config:
    """The config as a step records it: resolved (presets filled in) and its threads applied."""
    cfg = resolve(config)
    if cfg.runtime.threads is not None:
        torch.set_num_threads(cfg.runtime.threads)
    return cfg


def analysis_models(config: Config, out: str | Path, n_targets: int, progress: bool = False):
    """The pool and, per family (``fp`` + each PTQ method), its experts: BN-folded full precision,
    or quantized at the config's one bit pair."""
    pool = Pool(config, progress)
    if len(pool.targets) < n_targets:
        raise MergeqError(f"this analysis needs {n_targets} target domains, got {pool.targets}")
    if len(pool.cfg.ptq.bits) != 1:
        raise MergeqError(f"this analysis quantizes at one bit pair; ptq.bits lists {pool.cfg.ptq.bits}: pass --bits")
    qcfg = pool.qconfig(parse_bits(pool.cfg.ptq.bits[0]))
    families = {"fp": {d: pool.fold(m) for d, m in pool.experts.items()}}
    for method in pool.cfg.ptq.methods:
        families[method] = pool.quantize_experts(method, qcfg)
    atomic_write_text(Path(out) / "config.yaml", pool.cfg.to_yaml())
    return pool, families


def barrier(config: Config, out: str | Path, points: int, progress: bool = False) -> dict[str, dict]:
    """Loss and accuracy along the linear path between the first two targets' experts, per family."""
    from ..eval.plots import plot_paths

    with claimed(check_out_dir(out), "barrier"):
        pool, families = analysis_models(config, out, 2, progress)
        d1, d2 = pool.targets[:2]
        domains = {d: pool.tests[d] for d in (d1, d2)}
        bits = pool.cfg.ptq.bits[0]
        paths = {name: linear_path(ms[d1], ms[d2], domains, points, pool.device) for name, ms in families.items()}
        write_json(Path(out) / "barrier.json", {"targets": [d1, d2], "bits": bits, "seed": pool.seed, "paths": paths})
        plot_paths(paths, Path(out) / "barrier.png", f"{d1} -> {d2} experts, {bits} (fp: full precision)")
    return paths


def surface(config: Config, out: str | Path, points: int, radius: float, progress: bool = False) -> dict[str, dict]:
    """The 2-D loss surface around the first target's expert, per family."""
    from ..eval.plots import plot_surfaces

    with claimed(check_out_dir(out), "surface"):
        pool, families = analysis_models(config, out, 1, progress)
        d = pool.targets[0]
        bits = pool.cfg.ptq.bits[0]
        surfaces = {name: loss_surface(ms[d], {d: pool.tests[d]}, points, radius, pool.seed, pool.device)
                    for name, ms in families.items()}
        write_json(Path(out) / "surface.json", {"domain": d, "bits": bits, "seed": pool.seed, "surfaces": surfaces})
        plot_surfaces(surfaces, Path(out) / "surface.png", f"loss around the {d} expert, {bits}")
    return surfaces

