"""Data from a spec: the mapping a config's ``data:`` section holds, checked, loaded and resolved.

``load_data(spec, seed)`` returns the :class:`~mergeq.data.digits.Benchmark` that
``load_benchmark`` returns (source and targets, each with a ``train`` split, for targets the
unlabeled adaptation / calibration data, and a labelled ``test`` split), with ``bench.spec`` set
to the *resolved* spec: every default filled in, paths absolute, and the outcome of the seed
(class list, split sizes, fingerprints of their files). Loading the resolved spec again with the same
seed gives the same splits, and refuses a folder whose files changed since (the fingerprints
differ). Kinds::

    {kind: digits, source: mnist, targets: [uci, mnistm, noisy]}          # the embedded benchmark
    {kind: folder, root: PATH, source: Real_World, targets: [Art, Clipart, Product],
     image_size: 224, normalize: imagenet}                                # <root>/<Domain>/<Class>/<image>
                                                                          # (size, normalize: null = the model's)
    {kind: office_home, root: PATH, source: R}                            # folder + Office-Home's names
    {kind: streets, source: synthetic, targets: [city, india]}            # embedded segmentation benchmark
    {kind: segmentation, source: gta5, size: [512, 1024], domains: {gta5: {dataset: gta5, root: PATH},
     cityscapes: {dataset: cityscapes, root: PATH}, idd: {dataset: idd, root: PATH}}}   # real data sets by path

``load_stream(spec, seed)`` does the same for a test-time-adaptation stream::

    {kind: cifar10c, root: PATH, severity: 5, corruptions: [gaussian_noise, ...], n: 10000}

Image size, normalisation and splits of the folder kinds: :mod:`mergeq.data.folder`; of the
stream: :func:`mergeq.data.corruptions.load_cifar10c`. Keys are checked by
:func:`mergeq.typed.from_mapping` (unknown key or wrong type: a one-line error naming it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from ..errors import ConfigError
from ..typed import check_value
from .corruptions import Stream, load_cifar10c
from .digits import DOMAINS, Benchmark, load_digits_benchmark
from .folder import FolderDataError, load_folder_benchmark, load_office_home, materialize


@dataclass
class DigitsData:
    """The embedded digits benchmark (:mod:`mergeq.data.digits`)."""

    kind: Literal["digits"] = "digits"
    source: str = "mnist"
    targets: list[str] | None = None  # None: the other three domains


@dataclass
class StreetsData:
    """The embedded segmentation benchmark (:mod:`mergeq.data.streets`): street scenes, per-pixel labels."""

    kind: Literal["streets"] = "streets"
    source: str = "synthetic"
    targets: list[str] | None = None  # None: the other domains


@dataclass
class SegDomainData:
    """One segmentation domain read from its own folder layout (:mod:`mergeq.data.segfolders`)."""

    dataset: Literal["cityscapes", "gta5", "idd", "pair"]
    root: str | None = None  # cityscapes, gta5, idd: the data set's root folder
    train_split: str = "train"  # cityscapes, idd: the split adapted / calibrated on (source: trained on)
    test_split: str = "val"  # cityscapes, idd: the split evaluated on
    split_file: str | None = None  # gta5: image names of the training split (None: every image)
    test_split_file: str | None = None  # gta5: image names of the test split (None: every 20th image held out)
    images: str | None = None  # pair: the image folder (train)
    labels: str | None = None  # pair: the label folder, train ids (train)
    test_images: str | None = None  # pair: the test image folder (None: images)
    test_labels: str | None = None  # pair: the test label folder (None: labels)


@dataclass
class SegmentationData:
    """Semantic segmentation from real data sets by path, e.g. GTA5 -> Cityscapes + IDD (19
    Cityscapes classes, ignore 255): one :class:`SegDomainData` per domain name."""

    domains: dict[str, SegDomainData]
    source: str
    kind: Literal["segmentation"] = "segmentation"
    targets: list[str] | None = None  # None: every other domain
    size: list[int] | None = None  # [H, W] every image and label is resized to (None: their own)
    crop: list[int] | None = None  # [H, W] random crop of the training splits (None: whole images)
    normalize: Literal["imagenet", "none"] = "imagenet"
    window: list[int] | None = None  # [H, W] sliding-window evaluation (mergeq.nn.sliding; None: whole images)
    stride: list[int] | None = None  # [H, W] of the window's steps (None: half the window)


@dataclass
class FolderData:
    """One folder per domain, one subfolder per class (Office-Home / DomainNet / PACS layout)."""

    root: str
    kind: Literal["folder", "office_home"] = "folder"
    source: str | None = None  # required for folder; office_home: Real_World
    targets: list[str] | None = None  # None: every other domain
    image_size: int | None = None  # side of the square centre crop the model sees; None: the model's
    resize: int | None = None  # shorter side before the crop; None: the model's, or round(image_size * 8 / 7)
    normalize: Literal["imagenet", "inception", "standardize", "none"] | None = None  # None: the model's
    test_fraction: float = 0.2
    transductive: bool = False  # targets: adapt and test on all their images (SHOT's protocol)
    augment: bool = False  # random-resized crop + flip on the source's training split
    verify: bool = False  # open every image once at load time
    in_memory: bool = False  # without a cache_dir: decode every split once into tensors (no augmentation then)
    classes: list[str] | None = None  # resolved: the class list (checked when given)
    splits: dict[str, dict[str, Any]] | None = None  # resolved: per domain {train, test, fingerprint}


@dataclass
class Cifar10CData:
    """CIFAR-10-C arrays (``<root>/<corruption>.npy`` and ``labels.npy``) as a stream of domains."""

    root: str
    kind: Literal["cifar10c"] = "cifar10c"
    corruptions: list[str] | None = None  # None: the 15 standard ones, in order
    severity: int = 5
    n: int | None = None  # images per corruption (None: all 10,000)
    imbalance: Literal["sorted", "dirichlet"] | None = None
    alpha: float = 0.1  # Dirichlet concentration of the dirichlet stream
    slots: int = 10
    normalize: Literal["standardize", "none"] = "standardize"


DataSpec = DigitsData | FolderData | StreetsData | SegmentationData  # tagged by ``kind``: the ``data:`` section
SEGMENTATION_KINDS = ("streets", "segmentation")


def task_of(spec) -> str:
    """``segmentation`` for the kinds with per-pixel labels, else ``classification``."""
    kind = spec.get("kind") if isinstance(spec, Mapping) else getattr(spec, "kind", None)
    return "segmentation" if kind in SEGMENTATION_KINDS else "classification"


def parse_spec(spec: Mapping[str, Any], hint: Any = DataSpec, where: str = "data"):
    """The dataclass ``spec['kind']`` names (missing kind: the first of the union), built from ``spec``."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'kind' key, got {type(spec).__name__} {spec!r}")
    return check_value(hint, spec, where)


def _folder(spec: FolderData, seed: int, cache_dir: str | Path | None) -> Benchmark:
    from ..models.inputs import IMAGENET_INPUT, default_resize

    size = spec.image_size or IMAGENET_INPUT.size  # no model to ask here (mergeq.experiments.config.resolve does)
    resize = spec.resize if spec.resize is not None else default_resize(size)
    normalize = spec.normalize or IMAGENET_INPUT.normalize
    if spec.in_memory and spec.augment:
        raise ConfigError("data.in_memory: decoding once would freeze one random augmentation; "
                          "set augment: false or in_memory: false")
    kw = dict(root=spec.root, targets=spec.targets, seed=seed, test_fraction=spec.test_fraction,
              transductive=spec.transductive, resize=resize, crop=size, augment=spec.augment,
              verify=spec.verify, normalize=normalize, cache_dir=cache_dir)
    if spec.kind == "office_home":
        bench = load_office_home(source=spec.source or "Real_World", **kw)
    else:
        bench = load_folder_benchmark(source=spec.source, **kw)
    found = bench.spec
    if spec.classes is not None and spec.classes != found["classes"]:
        raise FolderDataError(f"data.classes: the config lists {spec.classes}, {spec.root} holds {found['classes']}")
    for d, want in (spec.splits or {}).items():
        got = found["splits"].get(d)
        if got is not None and want.get("fingerprint") not in (None, got["fingerprint"]):
            raise FolderDataError(f"data.splits.{d}: the files of domain {d!r} under {spec.root} changed since the "
                                  f"config was written (files fingerprint {got['fingerprint']}, config "
                                  f"{want['fingerprint']}); remove data.splits to accept the new split")
    if spec.in_memory and cache_dir is None:  # with a cache the splits are decoded already
        for dom in (bench.source, *bench.targets.values()):
            dom.train, dom.test = materialize(dom.train), materialize(dom.test)
    bench.spec = {**dataclasses.asdict(spec), "root": str(Path(spec.root).expanduser().resolve()),
                  "source": bench.source.name, "targets": list(bench.targets), "image_size": size, "resize": resize,
                  "normalize": normalize, **found}
    return bench


def _seg_domain(name: str, d: SegDomainData, spec: SegmentationData, seed: int):
    """(train, test) of one real segmentation domain."""
    from torch.utils.data import Subset

    from . import segfolders

    size, crop = (tuple(v) if v else None for v in (spec.size, spec.crop))
    kw = dict(size=size, seed=seed, normalize=spec.normalize)
    where = f"data.domains.{name}"
    if d.dataset in ("cityscapes", "idd"):
        if d.root is None:
            raise ConfigError(f"{where}.root: {d.dataset} needs its root folder")
        load = getattr(segfolders, d.dataset)
        return load(d.root, d.train_split, crop=crop, **kw), load(d.root, d.test_split, **kw)
    if d.dataset == "gta5":
        if d.root is None:
            raise ConfigError(f"{where}.root: gta5 needs its root folder")
        if d.test_split_file is not None:
            return (segfolders.gta5(d.root, crop=crop, split_file=d.split_file, **kw),
                    segfolders.gta5(d.root, split_file=d.test_split_file, **kw))
        train, test = segfolders.gta5(d.root, crop=crop, split_file=d.split_file, **kw), \
            segfolders.gta5(d.root, split_file=d.split_file, **kw)
        held = set(range(0, len(test), 20))
        return Subset(train, [i for i in range(len(train)) if i not in held]), Subset(test, sorted(held))
    if d.images is None or d.labels is None:
        raise ConfigError(f"{where}: a pair domain needs images and labels folders")
    return (segfolders.image_label_pair(d.images, d.labels, crop=crop, **kw),
            segfolders.image_label_pair(d.test_images or d.images, d.test_labels or d.labels, **kw))


def _segmentation(spec: SegmentationData, seed: int) -> Benchmark:
    from .digits import Domain
    from .segfolders import CITYSCAPES_CLASSES

    if spec.source not in spec.domains:
        raise ConfigError(f"data.source: {spec.source!r} is not one of data.domains ({', '.join(spec.domains)})")
    targets = spec.targets or [d for d in spec.domains if d != spec.source]
    unknown = [d for d in targets if d not in spec.domains or d == spec.source]
    if unknown:
        raise ConfigError(f"data.targets: {unknown} are not domains of data.domains other than the source")
    doms = {n: Domain(n, *_seg_domain(n, spec.domains[n], spec, seed)) for n in [spec.source, *targets]}
    bench = Benchmark("segmentation", doms[spec.source], {t: doms[t] for t in targets}, len(CITYSCAPES_CLASSES),
                      classes=list(CITYSCAPES_CLASSES))
    domains = {n: {**dataclasses.asdict(d), **{k: str(Path(v).expanduser().resolve()) for k, v in
                                                dataclasses.asdict(d).items()
                                                if k in ("root", "images", "labels", "test_images", "test_labels",
                                                         "split_file", "test_split_file") and v}}
               for n, d in spec.domains.items()}
    bench.spec = {**dataclasses.asdict(spec), "domains": domains, "targets": targets}
    return bench


def load_data(spec: Mapping[str, Any], seed: int = 0, cache_dir: str | Path | None = None) -> Benchmark:
    """The benchmark a ``data:`` spec describes (see the module docstring), ``bench.spec`` resolved;
    folder images decoded once and cached under ``cache_dir`` when given (:mod:`mergeq.data.decoded`)."""
    parsed = parse_spec(spec)
    if isinstance(parsed, FolderData):
        return _folder(parsed, seed, cache_dir)
    if isinstance(parsed, SegmentationData):
        return _segmentation(parsed, seed)
    if isinstance(parsed, StreetsData):
        from .streets import CLASSES, DOMAINS as STREETS, load_streets_benchmark

        if parsed.source not in STREETS:
            raise ConfigError(f"data.source: expected one of {', '.join(STREETS)}, got {parsed.source!r}")
        bench = load_streets_benchmark(seed=seed, source=parsed.source, targets=parsed.targets, cache_dir=cache_dir)
        bench.spec = {**dataclasses.asdict(parsed), "targets": list(bench.targets)}
        bench.classes = list(CLASSES)
        return bench
    if parsed.source not in DOMAINS:
        raise ConfigError(f"data.source: expected one of {', '.join(DOMAINS)}, got {parsed.source!r}")
    bench = load_digits_benchmark(seed=seed, targets=parsed.targets, source=parsed.source)
    bench.spec = {**dataclasses.asdict(parsed), "targets": list(bench.targets)}
    return bench


def load_stream(spec: Mapping[str, Any], seed: int = 0) -> tuple[Stream, dict[str, Any]]:
    """The stream of domains a ``cifar10c`` spec describes, and its resolved spec."""
    s = parse_spec(spec, Cifar10CData, "stream")
    stream = load_cifar10c(s.root, s.corruptions, s.severity, s.n, s.imbalance, seed, s.normalize, s.alpha, s.slots)
    resolved = {**dataclasses.asdict(s), "root": str(Path(s.root).expanduser().resolve()),
                "corruptions": [name for name, _ in stream], "n": len(stream[0][1])}
    return stream, resolved
