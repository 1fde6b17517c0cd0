"""The model pool of every experiment: the data, the source model, one SHOT expert per target,
what is derived from them (BN-folded experts, their full-precision merge), calibration batches,
quantized experts and their merge.

``Pool(config)`` resolves the config (:func:`~mergeq.experiments.config.resolve`), loads the
data (:func:`mergeq.data.load_data`; ``pool.cfg`` then records its resolved spec) and builds the
model with :func:`mergeq.models.resolve_model`, checking on two source test images that it
yields ``N x num_classes`` logits. Models are trained on first use and cached under
``runtime.cache_dir`` as single-file checkpoints (:mod:`mergeq.checkpoint`), keyed by a hash of
everything that determines them: the data (the digits benchmark's name; a folder's resolved
spec and the fingerprint of the domain's files, contents included), the model (registered name
and kwargs, or its resolved spec, weights' sha256 included, and a builder's source digest or
torchvision's / timm's version: :func:`~mergeq.models.spec.code_digest`), the seed (and the
per-source seeds of ``runtime.seeds`` that differ from it: split and source for the source model,
shot too for an expert), the training config, the device kind and the number of torch threads
(CPU training repeats bit for bit only per thread count). An entry is verified on read: one that
is truncated, fails its digest or holds another model than its key names (a swapped file) is
rebuilt, with a warning in the log; an entry of a builder model loads onto the config's own
model, never the builder its file names. A lock file per entry lets concurrent runs (``mergeq
bench`` workers) train each model once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..adapt.segmentation import dacs, train_seg_source
from ..adapt.shot import shot
from ..adapt.source import train_source, train_steps
from ..checkpoint import builder_template, model_from_checkpoint, save_model
from ..data import load_data
from ..data.spec import DigitsData, task_of
from ..data_utils import as_tensor, take
from ..deploy.integer import DEPLOY_CALIB_SIZE, is_integer_layer, plan_integer
from ..deploy.requant import deployed
from ..errors import CheckpointError
from ..gpu import pin_worker
from ..eval import evaluate, score
from ..eval.strips import preview, preview_inputs
from ..io import file_lock
from ..merge import merge
from ..merge.recalibrate import recalibrate
from ..models.spec import code_digest, resolve_model
from ..nn import fold_bn
from ..nn.sliding import SlidingWindow
from ..ptq import quantize
from ..quant.config import QuantConfig
from . import health
from .config import Config, resolve, with_data

log = logging.getLogger(__name__)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(spec) -> dict[str, Any]:
    """How checkpoints name the model: ``arch``/``arch_kwargs`` for a plain registered one, else the spec."""
    if spec.builder is None and ":" not in spec.name and spec.weights is None and spec.output is None:
        return {"arch": spec.name, "arch_kwargs": dict(spec.kwargs)}
    return {"model": dataclasses.asdict(spec)}


class Pool:
    """Data, source, experts and their derivatives for one config (see the module docstring)."""

    def __init__(self, config: Config, progress: bool = False) -> None:
        cfg = resolve(config)
        if cfg.runtime.threads is not None:
            torch.set_num_threads(cfg.runtime.threads)
        self.progress, self.device, self.seed = progress, cfg.runtime.device, cfg.runtime.seed
        self.seeds = {w: cfg.runtime.seed_of(w) for w in ("split", "source", "shot", "ptq")}
        self.task = task_of(cfg.data)
        torch.manual_seed(self.seed)
        self.bench = load_data(dataclasses.asdict(cfg.data), self.seeds["split"], cfg.runtime.cache_dir)
        self.cfg = with_data(cfg, self.bench.spec)
        self.targets = list(self.bench.targets)
        self.tests = {d: self.bench.targets[d].test for d in self.targets}
        self.example = take(self.bench.source.test, [0, 1])[0]
        self.cache_dir = Path(cfg.runtime.cache_dir)
        data = self.cfg.data
        ident = {"benchmark": self.bench.name} if isinstance(data, DigitsData) else {"data": {
            k: v for k, v in dataclasses.asdict(data).items() if k not in ("targets", "splits", "verify", "in_memory")}}
        self._meta = {**ident, **model_identity(self.cfg.model), "num_classes": self.bench.num_classes,
                      "seed": self.seed}
        # training repeats bit for bit only on the same device kind and (CPU) number of torch threads
        compute = {"device": torch.device(self.device).type, "threads": torch.get_num_threads()}
        code = code_digest(self.cfg.model)  # None for registered models: their keys stay as they were
        self._source_key = _key({**self._meta, **({"code": code} if code else {}), "compute": compute,
                                 **self._split(self.bench.source.name),
                                 "source": dataclasses.asdict(self.source_config),
                                 **self._own_seeds("split", "source")})
        self._source: nn.Module | None = None
        self._experts: dict[str, nn.Module] = {}
        self._accuracy: dict[str, Any] = {}
        steps = self.steps()
        log.info("optimizer steps: source %d, %s %s", steps["source"], "DACS" if self.task == "segmentation" else "SHOT",
                 ", ".join(f"{d} {n}" for d, n in steps["shot"].items()))

    @property
    def source_config(self):
        """How the source model trains: ``adapt.source`` (classification) or ``adapt.seg_source``."""
        return self.cfg.adapt.seg_source if self.task == "segmentation" else self.cfg.adapt.source

    @property
    def expert_config(self):
        """How each expert adapts: ``adapt.shot`` (classification) or ``adapt.dacs`` (segmentation)."""
        return self.cfg.adapt.dacs if self.task == "segmentation" else self.cfg.adapt.shot

    def steps(self) -> dict[str, Any]:
        """Optimizer steps of source training and of each target's adaptation (SHOT, or DACS for
        segmentation; ``train_steps`` on the splits), under the key ``shot``."""
        return {"source": train_steps(self.source_config, len(self.bench.source.train)),
                "shot": {d: train_steps(self.expert_config, len(self.bench.targets[d].train)) for d in self.targets}}

    def _own_seeds(self, *sources: str) -> dict[str, Any]:
        """The seeds of ``sources`` that differ from ``runtime.seed``, for a cache key (none: the key
        of a run without ``runtime.seeds``, so earlier cache entries stay valid)."""
        own = {w: self.seeds[w] for w in sources if self.seeds[w] != self.seed}
        return {"seeds": own} if own else {}

    def _split(self, domain: str) -> dict[str, Any]:
        splits = getattr(self.cfg.data, "splits", None)
        return {"split": splits[domain]} if splits else {}

    def checkpoint_meta(self, **extra: Any) -> dict[str, Any]:
        """Metadata of a checkpoint of this pool's model: architecture, data spec, seed, plus ``extra``."""
        return {**self._meta, "data": dataclasses.asdict(self.cfg.data), **extra}

    def new_model(self) -> nn.Module:
        """A freshly initialised model of the config (its starting weights, if any, loaded)."""
        return resolve_model(self.cfg.model, self.bench.num_classes, self.example)

    def _cached(self, path: Path, make: Callable[[], nn.Module], meta: dict, key: str) -> nn.Module:
        with file_lock(self.cache_dir / ".locks" / f"{path.stem}.lock"):
            if path.exists():
                try:
                    # a builder model loads onto the config's own spec, never the file's
                    template = builder_template(path, self.cfg.model)
                    model, stored = model_from_checkpoint(path, self.device, template)
                    _check_entry(path, stored, meta, key)
                    log.info("reusing cached %s", path)
                    return model
                except CheckpointError as e:
                    log.warning("rebuilding cache entry: %s", e)
            model = make()
            save_model(model, path, {**meta, "cache_key": key})
            return model.to(self.device).eval()

    @property
    def source(self) -> nn.Module:
        """The source model, trained on the source domain's labelled training split."""
        if self._source is None:
            path = self.cache_dir / f"source-{self._source_key}.safetensors"

            def make() -> nn.Module:
                torch.manual_seed(self.seeds["source"])
                train = train_seg_source if self.task == "segmentation" else train_source
                return train(self.new_model(), self.bench.source.train, self.source_config, seed=self.seeds["source"],
                             device=self.device, progress=self.progress)

            meta = self.checkpoint_meta(domain=self.bench.source.name, role="source",
                                        config=dataclasses.asdict(self.source_config))
            self._source = self._cached(path, make, meta, self._source_key)
        return self._source

    def expert(self, domain: str) -> nn.Module:
        """The expert of target ``domain``, adapted from the source on its unlabeled split: SHOT, or
        DACS self-training with the labelled source data for segmentation."""
        if domain not in self._experts:
            shot_cfg = self.expert_config
            key = _key({"source": self._source_key, "domain": domain, "shot": dataclasses.asdict(shot_cfg),
                        **self._split(domain), **self._own_seeds("shot")})
            path = self.cache_dir / f"expert-{domain}-{key}.safetensors"

            def make() -> nn.Module:
                target = self.bench.targets[domain].train
                if self.task == "segmentation":
                    return dacs(self.source, self.bench.source.train, target, shot_cfg, seed=self.seeds["shot"],
                                device=self.device, progress=self.progress)
                return shot(self.source, target, shot_cfg, seed=self.seeds["shot"], device=self.device,
                            progress=self.progress)

            meta = self.checkpoint_meta(domain=domain, role="expert", config=dataclasses.asdict(shot_cfg))
            self._experts[domain] = self._cached(path, make, meta, key)
        return self._experts[domain]

    @property
    def experts(self) -> dict[str, nn.Module]:
        return {d: self.expert(d) for d in self.targets}

    def fold(self, model: nn.Module) -> nn.Module:
        """``model`` with every BatchNorm folded into the layer before it (a copy)."""
        return fold_bn(model, self.example.to(self.device))

    def fp_merged(self) -> dict[str, float]:
        """Accuracy of the BN-folded full-precision experts, averaged and recalibrated like the quantized
        ones (``merge.recalibrate``; activation steps aside): the reference of every row."""
        experts = [self.fold(self.expert(d)) for d in self.targets]
        return self.evaluate(self.recalibrate(merge(experts), experts))

    def scored(self, model: nn.Module) -> nn.Module:
        """``model`` as it is evaluated: in ``data.window``'s sliding windows where the data set one
        (:class:`mergeq.nn.sliding.SlidingWindow`), else as it is."""
        window = getattr(self.cfg.data, "window", None)
        if window is None:
            return model
        stride = self.cfg.data.stride or [max(1, v // 2) for v in window]
        return SlidingWindow(model, window, stride)

    def score(self, model: nn.Module, domain: str) -> float:
        """The :meth:`deployed` ``model``'s score on ``domain``'s test split (accuracy, or mIoU:
        :func:`mergeq.eval.score`), its integer plan calibrated on ``domain``'s images."""
        return score(self.scored(self.deployed(model, [domain])), self.tests[domain], device=self.device)

    def deployed(self, model: nn.Module, domains: list[str] | None = None) -> nn.Module:
        """``model`` as its integer export computes it (:func:`mergeq.deploy.requant.deployed`), its
        integer plan calibrated on :func:`deployment_images` of ``domains`` (default: the targets),
        as ``mergeq export`` calibrates a checkpoint of those domains; ``model`` itself where it has
        no integer layer (full precision, weight-only)."""
        return deployed_model(model, self.bench, domains or self.targets)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """:func:`mergeq.eval.evaluate` of the :meth:`deployed` model on every target; for
        segmentation also ``preview``: the model's prediction on the first test images of each
        target (:mod:`mergeq.eval.strips`)."""
        model = self.scored(self.deployed(model))
        result = evaluate(model, self.tests, self.device)
        if self.task == "segmentation":
            result["preview"] = {d: preview(model, self.tests[d], self.device) for d in self.targets}
        return result

    def preview_inputs(self) -> dict[str, Any]:
        """The images and labels the previews of :meth:`evaluate` predict, per target."""
        return {d: preview_inputs(self.tests[d]) for d in self.targets}

    def recalibrate(self, merged: nn.Module, models: list[nn.Module], mode: str | None = None) -> nn.Module:
        """``merged`` re-estimated with ``mode`` (default ``merge.recalibrate``) on each target's
        calibration images (:meth:`calib`; ``models`` are the experts in target order), in place."""
        mode = mode or self.cfg.merge.recalibrate
        if mode == "none":
            return merged
        if len(models) != len(self.targets):
            raise ValueError(f"merge.recalibrate: {len(models)} models for the targets {self.targets}; "
                             "one expert per target, in target order, expected")
        weights = self.cfg.merge.options.get("average", {}).get("weights")
        return recalibrate(merged, models, [self.calib(d) for d in self.targets], mode, weights)

    def check_source(self) -> dict[str, float]:
        """The source model's accuracy on every domain's test split (its own: held out), logged and
        checked (:func:`health.check_source`)."""
        if "source" not in self._accuracy:
            name = self.bench.source.name
            acc = evaluate(self.scored(self.source), {name: self.bench.source.test, **self.tests}, self.device)
            health.check_source(acc[name], name, self.bench.num_classes)
            self._accuracy["source"] = acc
        return self._accuracy["source"]

    def check_experts(self) -> dict[str, float]:
        """Each expert's accuracy on its own target, logged and checked against the source's
        (:func:`health.check_expert`)."""
        if "experts" not in self._accuracy:
            source = self.check_source()
            experts = {d: self.score(self.expert(d), d) for d in self.targets}
            for d in self.targets:
                health.check_expert(d, source[d], experts[d], "dacs" if self.task == "segmentation" else "shot")
            self._accuracy["experts"] = experts
        return self._accuracy["experts"]

    def fp_results(self) -> dict[str, Any]:
        """The full-precision references of a run: source, experts, their merges (checked, logged)."""
        experts, merged = self.check_experts(), self.fp_merged()
        health.check_merged("full precision", experts, merged)
        out = {"source": self.check_source(), "steps": self.steps(), "fp": {"experts": experts, "merged": merged},
               "fp_bn_mixture": evaluate(self.scored(merge(list(self.experts.values()))), self.tests, self.device)}
        if self.task == "segmentation":  # Table 1's rows name every class; the strips show the images
            out["fp"]["experts_iou"] = {
                d: evaluate(self.scored(self.expert(d)), {d: self.tests[d]}, self.device)["iou"][d]
                for d in self.targets}
            out.update(task="segmentation", classes=self.bench.classes, preview=self.preview_inputs())
        return out

    def calib(self, domain: str, n: int | None = None) -> torch.Tensor:
        """``n`` (default ``ptq.calib_size``) inputs of ``domain``'s unlabeled training split: its first
        ``n``, or ``n`` drawn without replacement by ``runtime.seeds.calib`` when that is set."""
        split = self.bench.source.train if domain == self.bench.source.name else self.bench.targets[domain].train
        n, seed = n or self.cfg.ptq.calib_size, self.cfg.runtime.seeds.calib
        if seed is None:
            return as_tensor(split, limit=n)
        return take(split, torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n])[0]

    def options(self, method: str, **overrides: Any) -> dict[str, Any]:
        """PTQ ``method``'s options: the resolved config's, then ``overrides``."""
        return {**self.cfg.ptq.options.get(method, {}), **overrides}

    def qconfig(self, bits: tuple[int, int | None], fold_bn: bool = True) -> QuantConfig:
        return qconfig(self.cfg, bits, fold_bn)

    def quantize_experts(self, method: str, qcfg: QuantConfig, **overrides: Any) -> dict[str, nn.Module]:
        """Each expert quantized with ``method`` on its own target's calibration inputs (:meth:`calib`)."""
        options = self.options(method, **overrides)
        return {d: quantize(m, method, calib=self.calib(d), config=qcfg, source=self.source,
                            calib_size=self.cfg.ptq.calib_size, device=self.device, seed=self.seeds["ptq"],
                            progress=self.progress, **options)
                for d, m in self.experts.items()}

    def merged(self, models: list[nn.Module], rounding: str | None = None, recalibrate: str | None = None,
               **options: Any) -> nn.Module:
        """``models`` averaged (quantized experts stay on a grid, merged with ``rounding``, default
        ``merge.rounding`` with ``merge.rounding_options``; a sampling rounding draws with ``seed``,
        default ``runtime.seed``), then recalibrated (:meth:`recalibrate` with ``recalibrate``)."""
        m = self.cfg.merge
        rounding = rounding or m.rounding
        opts = {**m.options.get("average", {}), **(m.rounding_options if rounding == m.rounding else {}), **options}
        if rounding.startswith("noise"):
            opts.setdefault("seed", self.seed)
        return self.recalibrate(merge(models, rounding=rounding, **opts), models, recalibrate)

    def merge_and_evaluate(self, models: list[nn.Module], rounding: str | None = None,
                           recalibrate: str | None = None, **options: Any) -> dict[str, Any]:
        """Merge ``models`` (:meth:`merged`) and evaluate on every target.

        A sampling rounding (``noise``, ``noise-ties``) merges ``merge.repeats`` times with seeds
        ``seed .. seed + repeats - 1``: the accuracies are the means over the merges, and (for more
        than one merge) ``repeats`` holds the seeds, the hmean of each merge and their standard
        deviation (the HDRQ paper reports the mean of 30 sampled merges)."""
        rounding = rounding or self.cfg.merge.rounding
        if not rounding.startswith("noise"):
            return self.evaluate(self.merged(models, rounding, recalibrate, **options))
        base = options.pop("seed", self.cfg.merge.rounding_options.get("seed", self.seed))
        seeds = [base + k for k in range(self.cfg.merge.repeats)]
        runs = [self.evaluate(self.merged(models, rounding, recalibrate, **options, seed=s)) for s in seeds]
        if len(runs) == 1:
            return runs[0]
        hmeans = [r["hmean"] for r in runs]
        mean = {d: statistics.mean(r[d] for r in runs) for d in self.targets}
        extra = {}
        if "iou" in runs[0]:  # per class: the mean over the merges (None where the class is absent)
            extra["iou"] = {d: [None if runs[0]["iou"][d][c] is None else statistics.mean(r["iou"][d][c] for r in runs)
                                for c in range(len(runs[0]["iou"][d]))] for d in self.targets}
            extra["preview"] = runs[0]["preview"]
        return {**mean, "hmean": statistics.mean(hmeans), **extra,
                "repeats": {"seeds": seeds, "hmeans": hmeans, "std": statistics.stdev(hmeans)}}

def deployment_images(bench: Any, domains: list[str], size: int = DEPLOY_CALIB_SIZE) -> torch.Tensor:
    """The images a model of ``domains`` is planned for integer deployment on (``export``'s
    calibration): the first ``ceil(size / len(domains))`` of each domain's training split, in order."""
    per = -(-size // len(domains))
    splits = [bench.source.train if d == bench.source.name else bench.targets[d].train for d in domains]
    return torch.cat([take(split, range(min(per, len(split))))[0] for split in splits])[:size]


def deployed_model(model: nn.Module, bench: Any, domains: list[str]) -> nn.Module:
    """:func:`mergeq.deploy.requant.deployed` with the plan of ``export``: calibrated on
    :func:`deployment_images` of ``domains``; ``model`` itself where it has no integer layer."""
    if not any(is_integer_layer(m) for m in model.modules()):
        return model
    images = deployment_images(bench, domains)
    return deployed(model, plan_integer(model, images.to(next(model.parameters()).device)))


def qconfig(cfg: Config, bits: tuple[int, int | None], fold_bn: bool = True) -> QuantConfig:
    """The quantization of ``bits`` (w, a) with the config's first/last-layer bits and step search."""
    return QuantConfig(bits[0], bits[1], cfg.ptq.first_last_bits, cfg.ptq.step_method, fold_bn=fold_bn)


def ptq_report(qmodel: nn.Module) -> dict[str, Any]:
    """What quantization used and measured (``calib_size``: the calibration inputs, at most
    ``ptq.calib_size``; ``changed_codes``, ``recon_loss`` per unit), when it did."""
    meta = getattr(qmodel, "mergeq_meta", {}) or {}
    return {k: meta[k] for k in ("calib_size", "changed_codes", "recon_loss") if k in meta}


def _check_entry(path: Path, stored: dict, meta: dict, key: str) -> None:
    """A cache entry must hold the model its key names (entries of the earlier two-file form,
    written without ``cache_key``, are matched on the metadata they were saved with)."""
    if "cache_key" in stored:
        same = stored["cache_key"] == key
    else:
        same = all(stored.get(k) == v for k, v in json.loads(json.dumps(meta)).items() if k != "data")
    if not same:
        raise CheckpointError(f"cache entry {path} holds another model (role {stored.get('role')!r}, domain "
                              f"{stored.get('domain')!r}, key {stored.get('cache_key')!r}) than its name says")



def exit_with_parent(parent: int) -> None:
    """Process-pool initializer: exit as soon as the parent process is gone (killed or crashed)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def start_worker(parent: int, devices=None) -> None:
    """Process-pool initializer: :func:`exit_with_parent`, then pin the process to the GPU it takes
    from the queue ``devices`` (:func:`mergeq.gpu.pin_worker`; one entry per process)."""
    exit_with_parent(parent)
    if devices is not None:
        pin_worker(devices)
