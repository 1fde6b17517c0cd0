"""Rendering of the ``streets`` scenes (:mod:`mergeq.data.streets`): layout, labels, things, camera.

A scene is drawn in three steps, on a batch of images at once where it can:

1. **Layout** (:func:`layout`, :func:`stuff_labels`): a horizon of random height and slope,
   a skyline of building blocks (flat tops) and tree lines (wavy tops), each at least 0.12 W
   wide, standing on the horizon with sky above, and below it a road that widens toward the
   bottom from a vanishing point, a sidewalk strip on each side and, beyond it, terrain or more
   sidewalk. The geometry is evaluated on a ``SUPERSAMPLE`` x finer grid; a pixel's coverage of
   class c is the share of its sub-samples in c. Its label is the majority class if that share
   is at least ``CERTAIN`` (0.75), else 255.
2. **Texture** (:class:`Style`): each stuff class has a texture per domain; a pixel's colour is
   the coverage-weighted blend of the class textures (so a boundary pixel is a blend, labelled
   255 when no class covers 3/4 of it).
3. **Things** (:func:`add_things`): digits stand on the ground, farther ones first, their height
   proportional to their foot's distance below the horizon (perspective). A digit's alpha is its
   stroke intensity (resized to the thing's box, scaled to a maximum of 1), composited as
   ``x = (1 - a) x + a fill``. Label: the thing's class where ``a >= CERTAIN``, 255 where
   ``UNCERTAIN < a < CERTAIN`` (the pixel mixes the thing with what lies behind it), unchanged
   where ``a <= UNCERTAIN``. Class: digits 0-4 are ``person``, 5-9 ``car``; as real persons and
   cars differ in shape, a person is drawn narrow (0.75 x the digit's width, full height) and a
   car low and wide (0.75 x height, 1.5 x width): ``THING_SHAPE``. Shape and identity agree in
   every domain, so a model may use either.

Then the domain's camera (blur, gamma, noise, vignetting) acts on the finished image; labels
stay those of the composition (as an annotator labels a blurred photo).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

CLASSES = ("road", "sidewalk", "building", "vegetation", "terrain", "sky", "person", "car")
ROAD, SIDEWALK, BUILDING, VEGETATION, TERRAIN, SKY, PERSON, CAR = range(len(CLASSES))
NUM_STUFF = 6  # ids 0..5 are stuff, 6 and 7 things
IGNORE_INDEX = 255
SUPERSAMPLE = 4
CERTAIN, UNCERTAIN = 0.75, 0.25
SKYLINE_SEGMENTS = 6
THING_SHAPE = {PERSON: (1.0, 0.75), CAR: (0.75, 1.5)}  # (height, width) factors of a thing's digit

Texture = Callable[[int, torch.Generator, tuple[int, int]], torch.Tensor]  # (n, g, (H, W)) -> n x 3 x H x W


def _u(shape, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _package_file(package: str, pip_name: str, *parts: str) -> Path:
    """A file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent.joinpath(*parts)
    if path is None or not path.is_file():
        raise ImportError(f"the streets benchmark reads {'/'.join(parts)} from the package {package!r}: "
                          f"pip install {pip_name}")
    return path


PACKAGES = {"skimage": "scikit-image", "sklearn": "scikit-learn"}


@lru_cache(maxsize=None)
def photo(package: str, relpath: str, box: tuple[int, int, int, int] | None = None,
          shrink: float = 1.0) -> torch.Tensor:
    """3 x h x w float image in [0, 1] of a package's image file, cropped to ``box`` (PIL's
    left, upper, right, lower) and made ``shrink`` times smaller (Lanczos); grey images are
    replicated to 3 channels."""
    from PIL import Image

    with Image.open(_package_file(package, PACKAGES[package], *relpath.split("/"))) as im:
        rgb = im.convert("RGB")
        if box is not None:
            rgb = rgb.crop(box)
        if shrink != 1.0:
            rgb = rgb.resize((round(rgb.width / shrink), round(rgb.height / shrink)), Image.Resampling.LANCZOS)
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------- layout
def layout(n: int, g: torch.Generator, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Random scene geometry for ``n`` images (the module docstring); lengths in pixels."""
    h, w = size
    k = SKYLINE_SEGMENTS
    return {
        "horizon": _u(n, 0.36 * h, 0.56 * h, g),  # at the image's centre column
        "slope": _u(n, -0.1, 0.1, g),  # of the horizon (hilly ground), about +-6 degrees
        "vanish": _u(n, 0.3 * w, 0.7 * w, g),
        "road": _u((n, 2), 0.45, 1.1, g),  # left / right half-width per pixel below the horizon
        "walk": _u((n, 2), 0.2, 0.6, g),  # sidewalk width per pixel below the horizon
        "outer_terrain": torch.rand((n, 2), generator=g) < 0.6,  # beyond the sidewalk: terrain, else sidewalk
        "breaks": -0.1 * w + torch.cumsum(_u((n, k - 1), 0.12 * w, 0.45 * w, g), dim=1),  # segments >= 0.12 W wide
        "building": torch.rand((n, k), generator=g) < 0.6,  # else a tree line
        "height": _u((n, k), 0.1 * h, 0.42 * h, g),
        "phase": _u((n, 2), 0.0, 2 * math.pi, g),
    }


def stuff_labels(p: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Class of every sub-sample: ``n x (H * SUPERSAMPLE) x (W * SUPERSAMPLE)`` uint8."""
    h, w = size
    s = SUPERSAMPLE
    v = ((torch.arange(h * s) + 0.5) / s).view(1, -1, 1)
    u = ((torch.arange(w * s) + 0.5) / s).view(1, 1, -1)

    def col(t: torch.Tensor) -> torch.Tensor:  # per-image values, broadcast over the grid
        return t.view(-1, 1, 1)

    d = v - (col(p["horizon"]) + col(p["slope"]) * (u - w / 2))  # > 0: below the horizon
    x = u - col(p["vanish"])  # n x 1 x W: what depends on the column alone stays a row
    right = x >= 0

    def side(t: torch.Tensor) -> torch.Tensor:  # the left or right value of an n x 2 parameter
        return torch.where(right, col(t[:, 1]), col(t[:, 0]))

    road, walk = side(p["road"]), side(p["walk"])
    outer = torch.where(side(p["outer_terrain"]), TERRAIN, SIDEWALK)
    ground = torch.where(x.abs() < road * d, ROAD, torch.where(x.abs() < (road + walk) * d, SIDEWALK, outer))
    height, is_building = col(p["height"][:, 0]).expand_as(x), col(p["building"][:, 0]).expand_as(x)
    for k in range(1, SKYLINE_SEGMENTS):  # segment k starts at breaks[k - 1]
        past = u >= col(p["breaks"][:, k - 1])
        height = torch.where(past, col(p["height"][:, k]), height)
        is_building = torch.where(past, col(p["building"][:, k]), is_building)
    ph = p["phase"]
    bumps = 2.5 * torch.sin(0.6 * u + col(ph[:, 0])) + 1.5 * torch.sin(1.7 * u + col(ph[:, 1])) - 3.0
    top = torch.where(is_building, height, height + bumps)  # tree lines wavy, a little lower
    above = torch.where(-d < top, torch.where(is_building, BUILDING, VEGETATION), SKY)
    return torch.where(d >= 0, ground, above).to(torch.uint8)


def coverage(sub: torch.Tensor) -> torch.Tensor:
    """Share of each pixel's sub-samples in each stuff class: ``n x NUM_STUFF x H x W``."""
    return torch.cat([F.avg_pool2d((sub == c).float()[:, None], SUPERSAMPLE) for c in range(NUM_STUFF)], 1)


def labels_from_coverage(cov: torch.Tensor) -> torch.Tensor:
    """The majority class where it covers at least ``CERTAIN`` of the pixel, else 255 (uint8)."""
    share, cls = cov.max(dim=1)
    return torch.where(share >= CERTAIN, cls, IGNORE_INDEX).to(torch.uint8)


# ----------------------------------------------------------------------------------- things
def glyph_box(img: np.ndarray, threshold: float = 0.1) -> torch.Tensor:
    """A grey digit cropped to the rows and columns where its intensity exceeds ``threshold``."""
    rows, cols = np.flatnonzero((img > threshold).any(1)), np.flatnonzero((img > threshold).any(0))
    return torch.from_numpy(np.ascontiguousarray(img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))


def thing_class(digit: int) -> int:
    return PERSON if digit <= 4 else CAR


Fill = Callable[[torch.Generator, int, int], torch.Tensor]  # (g, h, w) -> 3 x h x w


def add_things(x: torch.Tensor, y: torch.Tensor, horizon: torch.Tensor, counts: Sequence[int],
               glyphs: Sequence[torch.Tensor], digits: Sequence[int], fill: Fill,
               g: torch.Generator) -> None:
    """Composite ``counts[i]`` digits onto image ``i`` in place (``glyphs`` and ``digits`` are
    consumed in order); label rule in the module docstring."""
    h, w = x.shape[-2:]
    j = 0
    for i, k in enumerate(counts):
        hz = float(horizon[i])
        feet = sorted(float(f) for f in _u(k, hz + 3, h + 2, g))  # far ones drawn first
        for foot in feet:
            glyph, cls = glyphs[j], thing_class(int(digits[j]))
            j += 1
            sh, sw = THING_SHAPE[cls]
            th = max(9, round(sh * float(_u(1, 0.75, 1.05, g)) * (foot - hz)))
            tw = max(3, round(sw / sh * th * glyph.shape[1] / glyph.shape[0]))
            a = F.interpolate(glyph[None, None], size=(th, tw), mode="bilinear", antialias=True,
                              align_corners=False)[0, 0].clamp(0, 1)
            a = a / a.max().clamp_min(1e-6)
            left = int(torch.randint(-tw // 3, w - 2 * tw // 3 + 1, (1,), generator=g))
            top = round(foot) - th
            r0, c0 = max(top, 0), max(left, 0)
            r1, c1 = min(top + th, h), min(left + tw, w)
            if r1 <= r0 or c1 <= c0:
                continue
            a = a[r0 - top:r1 - top, c0 - left:c1 - left]
            f = fill(g, th, tw)[:, r0 - top:r1 - top, c0 - left:c1 - left]
            x[i, :, r0:r1, c0:c1] = (1 - a) * x[i, :, r0:r1, c0:c1] + a * f
            lab = y[i, r0:r1, c0:c1]
            lab[a >= CERTAIN] = cls
            lab[(a > UNCERTAIN) & (a < CERTAIN)] = IGNORE_INDEX


# ----------------------------------------------------------------------------------- style
@dataclass(frozen=True)
class Style:
    """How one domain renders the classes: a texture per stuff class (in class-id order), the
    digits' alpha (``glyph``: raw grey digit -> alpha before resizing), their ``fill`` and the
    ``camera`` applied to the finished [0, 1] images."""

    textures: tuple[Texture, ...]
    glyph: Callable[[torch.Tensor], torch.Tensor]
    fill: Fill
    camera: Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def render(style: Style, n: int, g: torch.Generator, size: tuple[int, int], counts: Sequence[int],
           raw_digits: Sequence[np.ndarray], digits: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes of ``style``: uint8 images ``n x 3 x H x W`` and uint8 labels ``n x H x W``."""
    p = layout(n, g, size)
    cov = coverage(stuff_labels(p, size))
    y = labels_from_coverage(cov)
    tex = torch.stack([t(n, g, size) for t in style.textures], 1)  # n x 6 x 3 x H x W
    x = (cov[:, :, None] * tex).sum(1)
    glyphs = [style.glyph(glyph_box(d)) for d in raw_digits]
    add_things(x, y, p["horizon"], counts, glyphs, digits, style.fill, g)
    x = style.camera(x.clamp(0, 1), g).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), y
