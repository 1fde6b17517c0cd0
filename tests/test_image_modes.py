"""Issue 24: folder images decode to the expected RGB values in [0, 1] whatever their PNG mode, and
a decompression bomb is one error naming the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mergeq.data import FolderDataError, FolderImages, ImageTransform, load_folder_benchmark
from mergeq.data.folder import read_image

GREYS = [0, 128, 255]  # one row of three pixels


def _png(path, array: np.ndarray, mode: str | None = None, **save) -> str:
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    im.save(path, **save)
    return str(path)


def _palette(path) -> str:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    im.save(path, transparency=1)  # entry 1 (green) transparent: its colour is still green
    return str(path)


CASES = {  # name -> (writer, the RGB the model must see, 0..255)
    "16-bit grey (I;16)": (lambda p: _png(p, np.array([[0, 128 * 257, 65535]], dtype=np.uint16)),
                           [[g] * 3 for g in GREYS]),
    "8-bit grey (L)": (lambda p: _png(p, np.array([GREYS], dtype=np.uint8)), [[g] * 3 for g in GREYS]),
    "grey + alpha (LA)": (lambda p: _png(p, np.array([[[g, a] for g, a in zip(GREYS, (255, 0, 60))]], np.uint8)),
                          [[g] * 3 for g in GREYS]),
    "palette with transparency (P)": (_palette, [[255, 0, 0], [0, 255, 0], [0, 0, 255]]),
    "RGBA": (lambda p: _png(p, np.array([[[10, 20, 30, 255], [40, 50, 60, 0], [200, 100, 0, 128]]], np.uint8)),
             [[10, 20, 30], [40, 50, 60], [200, 100, 0]]),
}


@pytest.mark.parametrize("name", CASES)
def test_png_modes_decode_to_their_rgb_values(tmp_path, name):
    write, rgb = CASES[name]
    path = write(tmp_path / "x.png")
    assert np.asarray(read_image(path)).tolist() == [rgb]
    # what a model sees with normalize: none, 3 x 1 x 3 floats in [0, 1]
    x, _ = FolderImages([path], [0], ["c"], ImageTransform.named("none", resize=1, crop=1))[0]
    assert x.shape == (3, 1, 1) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    wide = ImageTransform(resize=1, crop=1, mean=(0.0,) * 3, std=(1.0,) * 3)
    flat = torch.stack([wide(read_image(path).crop((i, 0, i + 1, 1))) for i in range(3)]).reshape(3, 3)
    torch.testing.assert_close(flat, torch.tensor(rgb, dtype=torch.float32) / 255.0)


def test_sixteen_bit_png_is_not_blank(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    decoded = np.asarray(read_image(_png(tmp_path / "ramp.png", ramp)))[..., 0].astype(int)
    np.testing.assert_allclose(decoded, np.rint(ramp / 257.0), atol=0)
    assert len(np.unique(decoded)) == 64


def test_a_decompression_bomb_is_named(tmp_path, monkeypatch):
    path = _png(tmp_path / "bomb.png", np.zeros((40, 40), dtype=np.uint8))
    for limit in (1000, 500):  # over the limit (Pillow warns), over twice the limit (Pillow raises)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(FolderDataError, match=rf"^cannot read image {tmp_path}/bomb\.png: .*decompression bomb"):
            read_image(path)


def test_a_long_thin_image_is_refused_before_it_is_resized(tmp_path, monkeypatch):
    path = _png(tmp_path / "thin.png", np.zeros((1, 300), dtype=np.uint8))  # 300 pixels, 2,400 x 8 resized
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(FolderDataError, match=rf"^image {path}: a 300 x 1 image resized to a shorter side of 8 "
                                              r"would hold 19,200 pixels, over Pillow's limit of 10,000$"):
        FolderImages([path], [0], ["c"], ImageTransform(resize=8, crop=8))[0]


def test_data_verify_refuses_a_bomb_at_load_time(tmp_path, monkeypatch):
    for domain in ("A", "B"):
        for cls in ("c0", "c1"):
            (tmp_path / domain / cls).mkdir(parents=True)
            for i in range(2):
                _png(tmp_path / domain / cls / f"{i}.png", np.full((8, 8), 40 * i, dtype=np.uint8))
    bomb = _png(tmp_path / "B" / "c1" / "1.png", np.zeros((12, 12), dtype=np.uint8))
    load_folder_benchmark(tmp_path, source="A", resize=8, crop=8, verify=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 8 x 8 images pass, the 12 x 12 one warns
    with pytest.raises(FolderDataError, match=rf"^cannot read image {bomb}: .*decompression bomb"):
        load_folder_benchmark(tmp_path, source="A", resize=8, crop=8, verify=True)
