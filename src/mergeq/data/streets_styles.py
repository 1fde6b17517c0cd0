"""The three domains of the ``streets`` benchmark: how each renders the classes.

* ``synthetic`` (source, the GTA5 analogue): every stuff texture is procedural (colour
  gradients with weather from clear blue to overcast, value noise, window grids, tile lines;
  no image file); things are MNIST digits binarised into crisp "rendered" glyphs filled with
  one flat, bright, saturated colour; no camera effects.
* ``city`` (target, the Cityscapes analogue): real photo textures: sky, building (the pagoda)
  and vegetation (trees) are crops of scikit-learn's ``china.jpg``; road is scikit-image's
  ``moon.png`` (grey cratered surface, like worn asphalt), sidewalk the left half of
  ``brick.png`` (laid pavers), terrain ``grass.png``; things are real handwritten MNIST digits
  (their own stroke intensity as alpha) filled with crops of ``astronaut.png``. Camera:
  Gaussian blur (sigma 0.8) and a hazy gamma 0.8.
* ``india`` (target, the IDD analogue): sky is the dusk sky of ``rocket.jpg``, building the
  garage shelves and wall of ``motorcycle_left.png``, vegetation the foliage of ``flower.jpg``,
  terrain the grass field of ``camera.png`` (tinted dry), road ``gravel.png`` (unpaved),
  sidewalk the right half of ``brick.png`` (terracotta tint, larger scale); things are UCI 8x8
  digits upsampled 4x and contrast-stretched (blocky), filled with crops of ``coffee.png``.
  Camera: warm colour cast, gamma 1.3, vignetting, sensor noise (std 0.04).

Per-image, per-channel standardisation (what the model sees) removes a global colour cast or
contrast change, so the shifts that remain are the textures, the digits' style, blur, noise,
gamma and vignetting. Grey texture files are tinted with the class's colour.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .streets_scene import Style, _u, photo

# --------------------------------------------------------------------------- procedural pieces


def _colour(n: int, g: torch.Generator, rgb: tuple[float, float, float], jitter: float) -> torch.Tensor:
    return (torch.tensor(rgb) + _u((n, 3), -jitter, jitter, g)).clamp(0, 1).view(n, 3, 1, 1)


def _noise(n: int, g: torch.Generator, size: tuple[int, int], cells: int) -> torch.Tensor:
    """Value noise in about [0, 1]: a ``cells x cells`` random grid, bicubically upsampled."""
    grid = torch.rand((n, 1, cells + 1, cells + 1), generator=g)
    return F.interpolate(grid, size=size, mode="bicubic", align_corners=True).clamp(0, 1)


def _coords(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices, shaped to broadcast over ``n x 3 x H x W``."""
    rows, cols = (torch.arange(k, dtype=torch.float32) for k in size)
    return rows.view(1, 1, -1, 1), cols.view(1, 1, 1, -1)


def _periodic(n: int, g: torch.Generator, coord: torch.Tensor, lo: int, hi: int, duty: float) -> torch.Tensor:
    """1 where ``(coord + offset) mod period < duty * period``, per image random period and offset."""
    period = torch.randint(lo, hi + 1, (n, 1, 1, 1), generator=g).float()
    offset = _u((n, 1, 1, 1), 0, 1, g) * period
    return (torch.remainder(coord + offset, period) < duty * period).float()


def synth_sky(n, g, size):
    """A vertical gradient, from clear blue to overcast white-grey (weather drawn per image)."""
    v, _ = _coords(size)
    t = (v / (0.6 * size[0])).clamp(0, 1)
    overcast = _u((n, 1, 1, 1), 0.0, 1.0, g) ** 2
    top = _colour(n, g, (0.15, 0.35, 0.85), 0.08) * (1 - overcast) + 0.75 * overcast
    low = _colour(n, g, (0.65, 0.8, 1.0), 0.06) * (1 - overcast) + 0.9 * overcast
    clouds = 0.12 * (_noise(n, g, size, 4) - 0.5)
    return top * (1 - t) + low * t + clouds


def synth_building(n, g, size):
    v, u = _coords(size)
    palette = torch.tensor([(0.78, 0.72, 0.6), (0.6, 0.6, 0.66), (0.72, 0.45, 0.35), (0.85, 0.82, 0.7)])
    base = palette[torch.randint(len(palette), (n,), generator=g)].view(n, 3, 1, 1)
    base = (base + _u((n, 3, 1, 1), -0.06, 0.06, g)).clamp(0, 1)
    window = _periodic(n, g, u, 5, 9, 0.55) * _periodic(n, g, v, 5, 9, 0.5)
    glass = _colour(n, g, (0.15, 0.2, 0.3), 0.05)
    return base * (1 - window) + glass * window + 0.03 * (_noise(n, g, size, 16) - 0.5)


def synth_vegetation(n, g, size):
    blobs = 0.6 * _noise(n, g, size, 8) + 0.4 * _noise(n, g, size, 16)
    return _colour(n, g, (0.22, 0.55, 0.15), 0.1) * (0.45 + 0.9 * blobs)


def synth_terrain(n, g, size):
    return _colour(n, g, (0.55, 0.58, 0.3), 0.1) * (0.75 + 0.5 * _noise(n, g, size, 32))


def synth_road(n, g, size):
    grey = _u((n, 1, 1, 1), 0.2, 0.5, g)
    return grey.expand(n, 3, 1, 1) + 0.08 * (_noise(n, g, size, 32) - 0.5)


def synth_sidewalk(n, g, size):
    v, u = _coords(size)
    grey = _u((n, 1, 1, 1), 0.6, 0.75, g).expand(n, 3, 1, 1)
    joints = 1 - (1 - _periodic(n, g, u, 5, 8, 0.2)) * (1 - _periodic(n, g, v, 4, 7, 0.2))
    return grey * (1 - 0.3 * joints) + 0.04 * (_noise(n, g, size, 32) - 0.5)


def _hsv(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV (each in [0, 1]) to RGB, shape ``[..., 3]``."""
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0]) + 6 * h[..., None], 6)
    return v[..., None] - v[..., None] * s[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def flat_fill(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    rgb = _hsv(torch.rand(1, generator=g), _u(1, 0.7, 1.0, g), _u(1, 0.8, 1.0, g))[0]
    return rgb.view(3, 1, 1).expand(3, h, w)


def rendered_glyph(digit: torch.Tensor) -> torch.Tensor:
    """A crisp glyph: the handwritten stroke thresholded with a narrow ramp (0.35-0.65)."""
    return ((digit - 0.35) / 0.3).clamp(0, 1)


# --------------------------------------------------------------------------- photo pieces


def photo_texture(sources: tuple[tuple[str, str, tuple[int, int, int, int] | None], ...], crop: tuple[int, int],
                  tint: tuple[float, float, float] | None = None):
    """A texture made of random square crops (side in ``crop`` pixels of the file, clipped to the
    region) of one of the package images ``sources`` (package, path, box), resized to the image
    size; ``tint`` multiplies grey images; brightness jitters by +-15%. The regions are shrunk
    once (Lanczos) so that the middle of the crop range maps onto the image size, then each crop
    is resized (bilinear, antialiased) by the remaining factor."""
    def texture(n, g, size):
        shrink = round((crop[0] + crop[1]) / 2 / max(size), 2)
        lo, hi = round(crop[0] / shrink), round(crop[1] / shrink)
        out = torch.empty(n, 3, *size)
        for i in range(n):
            src = photo(*sources[int(torch.randint(len(sources), (1,), generator=g))], shrink)
            side = min(int(torch.randint(lo, hi + 1, (1,), generator=g)), src.shape[1], src.shape[2])
            r = int(torch.randint(src.shape[1] - side + 1, (1,), generator=g))
            c = int(torch.randint(src.shape[2] - side + 1, (1,), generator=g))
            patch = src[None, :, r:r + side, c:c + side]
            out[i] = F.interpolate(patch, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        if tint is not None:
            out = out * torch.tensor(tint).view(1, 3, 1, 1)
        return out * _u((n, 1, 1, 1), 0.85, 1.15, g)
    return texture


def photo_fill(package: str, path: str):
    """Things filled with a random crop (side 16-48 px) of a package photo."""
    def fill(g: torch.Generator, h: int, w: int) -> torch.Tensor:
        src = photo(package, path, None)
        side = int(torch.randint(16, 49, (1,), generator=g))
        r = int(torch.randint(src.shape[1] - side + 1, (1,), generator=g))
        c = int(torch.randint(src.shape[2] - side + 1, (1,), generator=g))
        patch = src[None, :, r:r + side, c:c + side]
        return F.interpolate(patch, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    return fill


def identity_glyph(digit: torch.Tensor) -> torch.Tensor:
    return digit


def upsampled_glyph(digit: torch.Tensor) -> torch.Tensor:
    """A UCI 8x8 digit (0-16 ink levels, mid-grey over whole strokes) upsampled 4x (bilinear)
    and contrast-stretched (0.3-0.7 -> 0-1) into a blocky, blurry stroke with a solid core."""
    up = F.interpolate(digit[None, None], scale_factor=4, mode="bilinear", align_corners=False)[0, 0]
    return ((up - 0.3) / 0.4).clamp(0, 1)


# --------------------------------------------------------------------------- cameras


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = math.ceil(2.5 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(3, 1, -1, 1), groups=3)


def no_camera(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x


def city_camera(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _blur(x, 0.8).clamp(0, 1) ** 0.8


def india_camera(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    v = torch.linspace(-1, 1, h).view(1, 1, -1, 1)
    u = torch.linspace(-1, 1, w).view(1, 1, 1, -1)
    vignette = 1 - 0.35 * (u ** 2 + v ** 2) / 2
    warm = torch.tensor([1.1, 1.0, 0.75]).view(1, 3, 1, 1)
    x = (x * warm).clamp(0, 1) ** 1.3 * vignette
    return x + 0.04 * torch.randn(x.shape, generator=g)


# --------------------------------------------------------------------------- the domains

_CHINA = ("sklearn", "datasets/images/china.jpg")


def _SKI(name: str, box: tuple[int, int, int, int] | None = None) -> tuple:
    return ("skimage", f"data/{name}", box)


STYLES = {
    "synthetic": Style((synth_road, synth_sidewalk, synth_building, synth_vegetation, synth_terrain, synth_sky),
                       rendered_glyph, flat_fill, no_camera),
    "city": Style((photo_texture((_SKI("moon.png"),), (96, 256), (0.95, 0.95, 1.0)),
                   photo_texture((_SKI("brick.png", (0, 0, 256, 512)),), (96, 200), (1.0, 0.97, 0.92)),
                   photo_texture(((*_CHINA, (110, 130, 300, 310)),), (64, 128)),
                   photo_texture(((*_CHINA, (545, 150, 640, 420)), (*_CHINA, (360, 310, 545, 427))), (48, 96)),
                   photo_texture((_SKI("grass.png"),), (96, 192), (0.75, 1.0, 0.55)),
                   photo_texture(((*_CHINA, (330, 0, 540, 100)),), (60, 100))),
                  identity_glyph, photo_fill("skimage", "data/astronaut.png"), city_camera),
    "india": Style((photo_texture((_SKI("gravel.png"),), (64, 192), (1.0, 0.95, 0.85)),
                    photo_texture((_SKI("brick.png", (256, 0, 512, 512)),), (160, 256), (1.0, 0.7, 0.55)),
                    photo_texture((_SKI("motorcycle_left.png", (350, 0, 720, 200)),
                                   _SKI("motorcycle_left.png", (0, 0, 330, 240))), (96, 200)),
                    photo_texture((("sklearn", "datasets/images/flower.jpg", (0, 0, 200, 427)),
                                   ("sklearn", "datasets/images/flower.jpg", (480, 0, 640, 200))), (64, 160)),
                    photo_texture((_SKI("camera.png", (410, 310, 512, 512)),), (64, 100), (0.9, 0.8, 0.55)),
                    photo_texture((_SKI("rocket.jpg", (100, 0, 550, 115)),), (64, 115))),
                   upsampled_glyph, photo_fill("skimage", "data/coffee.png"), india_camera),
}
