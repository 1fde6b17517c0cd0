"""Segmentation data sets in their own layouts (Cityscapes, GTA5, IDD, image/label folders), on tiny PNG trees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergeq.data.folder import FolderDataError, FolderNotFoundError
from mergeq.data.segfolders import (CITYSCAPES_CLASSES, CITYSCAPES_LABEL_TO_TRAIN, IDD_ID_TO_TRAIN, IGNORE_INDEX,
                                    SegmentationFolder, cityscapes, gta5, idd, image_label_pair, lookup_table,
                                    map_labels)
from mergeq.data_utils import take

H, W = 16, 32
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

# cityscapesScripts helpers/labels.py: (name, id, trainId), written out independently of the module
CS_LABELS = [("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
             ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
             ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
             ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5),
             ("polegroup", 18, 255), ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8),
             ("terrain", 22, 9), ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13),
             ("truck", 27, 14), ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
             ("motorcycle", 32, 17), ("bicycle", 33, 18)]
# AutoNUE helpers/anue_labels.py: (name, id) of the ids that have a csTrainId; every other id in 0..39 -> 255
IDD_NAMED = {"road": 0, "sidewalk": 3, "non-drivable fallback": 5, "person": 6, "rider": 8, "motorcycle": 9,
             "bicycle": 10, "car": 12, "truck": 13, "bus": 14, "train": 17, "wall": 20, "fence": 21,
             "traffic sign": 24, "traffic light": 25, "pole": 26, "building": 29, "vegetation": 32, "sky": 33}
IDD_AS = {"non-drivable fallback": "terrain"}  # IDD's class that HDRQ scores as Cityscapes' terrain


def test_cityscapes_table_matches_cityscapesscripts():
    ids = np.arange(-3, 300)
    mapped = map_labels(ids, CITYSCAPES_LABEL_TO_TRAIN)
    expected = {i: t for _, i, t in CS_LABELS}
    for i, m in zip(ids.tolist(), mapped.tolist()):
        assert m == expected.get(i, 255), i
    for name, i, t in CS_LABELS:
        if t != 255:
            assert CITYSCAPES_CLASSES[t] == name


def test_idd_table_maps_the_id_column_to_the_19_classes():
    mapped = map_labels(np.arange(0, 300, dtype=np.int32), IDD_ID_TO_TRAIN)
    want = {i: CITYSCAPES_CLASSES.index(IDD_AS.get(n, n)) for n, i in IDD_NAMED.items()}
    assert mapped.tolist() == [want.get(i, 255) for i in range(300)]
    assert sorted(want.values()) == list(range(19))


def test_map_labels_handles_dtypes_and_refuses_floats():
    assert map_labels(np.array([[7, 255, 0]], np.uint8), CITYSCAPES_LABEL_TO_TRAIN).tolist() == [[0, 255, 255]]
    assert map_labels(np.array([70000, -1, 33], np.int64), lookup_table(CITYSCAPES_LABEL_TO_TRAIN)).tolist() \
        == [255, 255, 18]
    assert map_labels(np.array([300], np.uint16), {300: 4}).tolist() == [4]
    with pytest.raises(ValueError, match="integer ids"):
        map_labels(np.zeros(3), CITYSCAPES_LABEL_TO_TRAIN)
    with pytest.raises(ValueError, match=r"train ids in \[0, 255\]"):
        lookup_table({1: 256})


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _ids(seed: int, high: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, high, (h, w), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if mode == "P":  # a palette PNG (GTA5's labels: indices = label ids, a colour per id)
        im = Image.frombytes("P", im.size, array.tobytes())
        im.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tobytes())
    im.save(path)


def _denorm(x: torch.Tensor) -> np.ndarray:
    return np.rint((x.numpy().transpose(1, 2, 0) * STD + MEAN) * 255)


@pytest.fixture()
def cs_root(tmp_path):
    frames = [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"), ("bonn", "bonn_000000_000019")]
    for k, (city, frame) in enumerate(frames):
        _save(tmp_path / "leftImg8bit/val" / city / f"{frame}_leftImg8bit.png", _rgb(k))
        _save(tmp_path / "gtFine/val" / city / f"{frame}_gtFine_labelIds.png", _ids(k, 40))
        _save(tmp_path / "gtFine/val" / city / f"{frame}_gtFine_color.png", _rgb(k + 50))  # ignored
    return tmp_path


def test_cityscapes_loads_pixels_and_maps_label_ids(cs_root):
    ds = cityscapes(cs_root, "val")
    assert len(ds) == 3 and ds.num_classes == 19
    assert [p.name for p, _ in ds.samples][2] == "bonn_000000_000019_leftImg8bit.png"
    expected = {i: t for _, i, t in CS_LABELS}
    for k in range(3):
        x, y = ds[k]
        assert x.dtype == torch.float32 and x.shape == (3, H, W) and y.dtype == torch.int64 and y.shape == (H, W)
        np.testing.assert_array_equal(_denorm(x), _rgb(k))
        want = np.vectorize(lambda i: expected.get(int(i), 255))(_ids(k, 40))
        np.testing.assert_array_equal(y.numpy(), want)
    assert torch.equal(ds[-1][1], ds[2][1])
    xs, ys = take(ds, [2, 0])
    assert xs.shape == (2, 3, H, W) and torch.equal(ys[1], ds[0][1])


def test_cityscapes_prefers_converted_train_ids(cs_root):
    trainids = _ids(7, 19)
    trainids[0, :4] = [200, 19, 255, 18]  # not a class -> ignore
    _save(cs_root / "gtFine/val/bonn/bonn_000000_000019_gtFine_labelTrainIds.png", trainids)
    y = cityscapes(cs_root, "val")[2][1].numpy()
    assert y[0, :4].tolist() == [255, 255, 255, 18]
    np.testing.assert_array_equal(y[1:], trainids[1:])


def test_cityscapes_wrong_layout_names_the_expected_path(cs_root, tmp_path):
    with pytest.raises(FolderNotFoundError) as e:
        cityscapes(cs_root, "train")
    msg = str(e.value)
    assert msg == (f"Cityscapes root {cs_root}: expected leftImg8bit/train/<city>/*_leftImg8bit.png, "
                   f"found no such folder {cs_root / 'leftImg8bit/train'}")
    (tmp_path / "empty/leftImg8bit/val/x").mkdir(parents=True)
    with pytest.raises(FolderNotFoundError, match=r"expected leftImg8bit/val/<city>/\*_leftImg8bit.png, found none"):
        cityscapes(tmp_path / "empty")
    with pytest.raises(FolderNotFoundError, match="Cityscapes root .* does not exist"):
        cityscapes(tmp_path / "nowhere")
    with pytest.raises(FolderDataError, match="split '../val' must be one folder name"):
        cityscapes(cs_root, "../val")


def test_image_without_label_names_both_paths(cs_root):
    label = cs_root / "gtFine/val/aachen/aachen_000001_000019_gtFine_labelIds.png"
    label.unlink()
    image = cs_root / "leftImg8bit/val/aachen/aachen_000001_000019_leftImg8bit.png"
    with pytest.raises(FolderDataError) as e:
        cityscapes(cs_root)
    assert str(image) in str(e.value) and str(label) in str(e.value) and "\n" not in str(e.value)


def test_label_of_another_size_names_the_file_unless_resized(cs_root):
    label = cs_root / "gtFine/val/bonn/bonn_000000_000019_gtFine_labelIds.png"
    _save(label, np.full((H // 2, W // 2), 26, np.uint8))
    ds = cityscapes(cs_root)
    with pytest.raises(FolderDataError, match=f"label file {label} is 16 x 8 px but its image .* is 32 x 16"):
        ds[2]
    x, y = cityscapes(cs_root, size=(8, 12))[2]
    assert x.shape == (3, 8, 12) and (y == 13).all()


def test_resize_is_bilinear_for_images_and_nearest_for_labels(cs_root):
    ids = np.zeros((H, W), np.uint8)
    ids[:, : W // 2] = 7   # road | car
    ids[:, W // 2:] = 26
    _save(cs_root / "gtFine/val/bonn/bonn_000000_000019_gtFine_labelIds.png", ids)
    x, y = cityscapes(cs_root, size=(4, 8))[2]
    assert set(y.unique().tolist()) == {0, 13} and (y[:, :4] == 0).all() and (y[:, 4:] == 13).all()
    want = np.asarray(Image.fromarray(_rgb(2)).resize((8, 4), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(_denorm(x), want)
    x, y = cityscapes(cs_root, size=(4, 8), resize_labels=False)[2]
    assert x.shape == (3, 4, 8) and y.shape == (H, W)


def test_random_crop_is_seeded_varies_by_epoch_and_pads(cs_root):
    ds = cityscapes(cs_root, crop=(8, 8), seed=3)
    full = cityscapes(cs_root)[1][1]
    a = ds[1]
    assert a[0].shape == (3, 8, 8) and torch.equal(a[1], cityscapes(cs_root, crop=(8, 8), seed=3)[1][1])
    # the crop is a window of the full label
    windows = {(t, l) for t in range(H - 7) for l in range(W - 7) if torch.equal(full[t:t + 8, l:l + 8], a[1])}
    assert windows
    crops = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        crops.add(ds[1][1].numpy().tobytes())
    assert len(crops) > 1
    x, y = cityscapes(cs_root, crop=(20, 32))[0]
    assert x.shape == (3, 20, 32) and (y[H:] == IGNORE_INDEX).all() and (x[:, H:] == 0).all()


def test_gta5_palette_labels_converted_labels_and_split_file(tmp_path):
    for k in range(3):
        _save(tmp_path / f"images/{k + 1:05d}.png", _rgb(k))
        _save(tmp_path / f"labels/{k + 1:05d}.png", _ids(k, 35), mode="P")
    assert Image.open(tmp_path / "labels/00001.png").mode == "P"
    ds = gta5(tmp_path)
    expected = {i: t for _, i, t in CS_LABELS}
    want = np.vectorize(lambda i: expected.get(int(i), 255))(_ids(0, 35))
    np.testing.assert_array_equal(ds[0][1].numpy(), want)
    _save(tmp_path / "labels/00002_labelTrainIds.png", np.full((H, W), 5, np.uint8))
    (tmp_path / "split.txt").write_text("# val\n00002\n00003.png\n")
    ds = gta5(tmp_path, split_file=tmp_path / "split.txt")
    assert len(ds) == 2 and (ds[0][1] == 5).all() and ds.samples[1][0].name == "00003.png"
    (tmp_path / "labels/00003.png").unlink()
    with pytest.raises(FolderDataError, match=r"GTA5 image .*00003.png has no label: expected .*00003_labelTrainIds"
                                              r".png or .*labels/00003.png"):
        gta5(tmp_path)
    (tmp_path / "bad.txt").write_text("../secret\n")
    with pytest.raises(FolderDataError, match="names '../secret'"):
        gta5(tmp_path, split_file=tmp_path / "bad.txt")
    with pytest.raises(FolderNotFoundError, match=r"GTA5 root .*: expected images/<n>.png, found no such folder "
                                                  r".*images/images$"):
        gta5(tmp_path / "images")
    (tmp_path / "labels").rename(tmp_path / "gt")
    with pytest.raises(FolderNotFoundError, match=r"GTA5 root .*: expected labels/<n>.png, found no such folder"):
        gta5(tmp_path)


def test_idd_jpeg_images_id_labels_and_level3_hint(tmp_path):
    for k, seq in enumerate(["0", "1"]):
        path = tmp_path / f"leftImg8bit/val/{seq}/{k:06d}_leftImg8bit.jpg"
        path.parent.mkdir(parents=True)
        Image.fromarray(_rgb(k)).save(path, quality=95)
        _save(tmp_path / f"gtFine/val/{seq}/{k:06d}_gtFine_labelids.png", _ids(k, 42))
    ds = idd(tmp_path, "val")
    x, y = ds[1]
    assert x.shape == (3, H, W)
    want = np.vectorize(lambda i: IDD_ID_TO_TRAIN.get(int(i), 255))(_ids(1, 42))
    np.testing.assert_array_equal(y.numpy(), want)
    np.testing.assert_array_equal(_denorm(x), np.asarray(Image.open(path).convert("RGB")))  # the decoded JPEG
    _save(tmp_path / "gtFine/val/0/000000_gtFine_labelids_labelTrainIds.png", np.full((H, W), 9, np.uint8))
    assert (idd(tmp_path)[0][1] == 9).all()
    (tmp_path / "gtFine/val/1/000001_gtFine_labelids.png").rename(
        tmp_path / "gtFine/val/1/000001_gtFine_labellevel3Ids.png")
    with pytest.raises(FolderDataError, match="found 000001_gtFine_labellevel3Ids.png, level3Id labels .* "
                                              "--id-type id"):
        idd(tmp_path)


def test_image_label_pair_matches_stems_and_maps_bad_values(tmp_path):
    for stem in ("a", "b"):
        _save(tmp_path / f"img/{stem}.jpg", _rgb(1))
        _save(tmp_path / f"lab/{stem}.png", np.array([[0, 18, 19, 255] * 8] * H, np.uint8))
    ds = image_label_pair(tmp_path / "img", tmp_path / "lab")
    assert ds[0][1][0, :4].tolist() == [0, 18, 255, 255]
    assert image_label_pair(tmp_path / "img", tmp_path / "lab", classes=["x", "y"])[0][1][0, :4].tolist() \
        == [0, 255, 255, 255]
    mapped = image_label_pair(tmp_path / "img", tmp_path / "lab", table={18: 1, 19: 0}, classes=["x", "y"])
    assert mapped[1][1][0, :4].tolist() == [255, 1, 0, 255]
    with pytest.raises(ValueError, match="train ids up to 4, but there are 2 classes"):
        image_label_pair(tmp_path / "img", tmp_path / "lab", table={1: 4}, classes=["x", "y"])
    _save(tmp_path / "img/c.png", _rgb(2))
    with pytest.raises(FolderDataError, match=f"image {tmp_path / 'img/c.png'} has no label: expected "
                                              f"{tmp_path / 'lab/c.png'}"):
        image_label_pair(tmp_path / "img", tmp_path / "lab")
    (tmp_path / "img/c.png").unlink()
    _save(tmp_path / "lab/d.png", np.zeros((H, W), np.uint8))
    with pytest.raises(FolderDataError, match=f"label {tmp_path / 'lab/d.png'} has no image: expected "
                                              f"{tmp_path / 'img/d'}"):
        image_label_pair(tmp_path / "img", tmp_path / "lab")


def test_bad_label_files_and_batches_of_mixed_sizes(tmp_path):
    _save(tmp_path / "img/a.png", _rgb(0))
    _save(tmp_path / "img/b.png", _rgb(1, 8, 8))
    _save(tmp_path / "lab/a.png", _rgb(3))  # an RGB colour label
    _save(tmp_path / "lab/b.png", np.zeros((8, 8), np.uint8))
    ds = image_label_pair(tmp_path / "img", tmp_path / "lab")
    with pytest.raises(FolderDataError, match=f"label file {tmp_path / 'lab/a.png'} is a RGB image; expected one "
                                              "channel"):
        ds[0]
    _save(tmp_path / "lab/a.png", np.zeros((H, W), np.uint8))
    with pytest.raises(FolderDataError, match=r"items 0 .* and 1 .* differ in size and cannot form a batch"):
        take(ds, [0, 1])
    assert take(image_label_pair(tmp_path / "img", tmp_path / "lab", size=(8, 8)), [0, 1])[0].shape == (2, 3, 8, 8)
    (tmp_path / "lab/b.png").write_bytes(b"not a png")
    with pytest.raises(FolderDataError, match=f"cannot read label file {tmp_path / 'lab/b.png'}"):
        ds[1]
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        SegmentationFolder(ds.samples, ds.tables, size=64)


def test_mean_iou_reads_a_segmentation_folder_in_batches(cs_root):
    from mergeq.eval.segmentation import intersect_and_union, mean_iou, scores_from_areas

    class Car(torch.nn.Module):  # predicts "car" everywhere, at half resolution
        def forward(self, x):
            logits = torch.zeros(len(x), 19, x.shape[2] // 2, x.shape[3] // 2)
            logits[:, 13] = 1.0
            return logits

    ds = cityscapes(cs_root)
    labels = torch.stack([ds[i][1] for i in range(len(ds))])
    a = intersect_and_union(torch.full_like(labels, 13), labels, 19)
    got = mean_iou(Car(), ds, 19, batch_size=2)
    assert got["iou"] == scores_from_areas(a[0], a[1], a[3])["iou"]
    present = len(set(labels.unique().tolist()) - {255} | {13})  # absent classes are left out of the mean
    assert got["miou"] == pytest.approx(float((labels == 13).sum() / (labels != 255).sum()) / present)
