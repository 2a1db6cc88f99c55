"""Pascal Context (459 / 59) and Pascal VOC 2012 readers on tiny official-format fixtures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.datasets.registry import prepare_dataset
from ovseg_core.datasets.class_names import PASCAL_CONTEXT_459
from ovseg_core.errors import DataError

IMAGE_ID = "2008_000002"


def write_jpeg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8)).save(path, quality=90)


def saved_label(ds: PreparedDataset, i: int) -> np.ndarray:
    return np.asarray(Image.open(ds.root / ds.samples[i].label))


def pc_id(name: str) -> int:
    """labels.txt id (= LabelMap value) of a Pascal Context class."""
    return PASCAL_CONTEXT_459.index(name) + 1


def make_context(root: Path, label_map: np.ndarray, split_list: str = "ImageSets/Main/val.txt") -> Path:
    voc = root / "VOCdevkit" / "VOC2010"
    write_jpeg(voc / "JPEGImages" / f"{IMAGE_ID}.jpg", *label_map.shape)
    write_jpeg(voc / "JPEGImages" / "2008_000003.jpg", *label_map.shape)  # an image of another split
    (voc / "trainval").mkdir(parents=True)
    scipy.io.savemat(voc / "trainval" / f"{IMAGE_ID}.mat", {"LabelMap": label_map.astype(np.uint16)})
    (voc / split_list).parent.mkdir(parents=True, exist_ok=True)
    (voc / split_list).write_text(f"{IMAGE_ID}\n")
    return root


def test_pc459_from_mat_is_labelmap_minus_one(tmp_path):
    raw = make_context(tmp_path / "pc", np.array([[0, 1, 459], [2, 3, 0]]))
    ds = prepare_dataset("pascal-context-459", raw, tmp_path / "out", "val", train_vocabulary=["Aeroplane"])
    assert ds.num_classes == 459 and ds.ignore_label == 65535
    assert ds.classes[:3] == ["accordion", "aeroplane", "air conditioner"] and ds.classes[-1] == "wool"
    assert [i for i, s in enumerate(ds.seen) if s] == [1]
    assert [s.id for s in ds.samples] == [IMAGE_ID]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint16
    np.testing.assert_array_equal(label, [[65535, 0, 458], [1, 2, 65535]])


def test_pc459_names_come_from_the_datasets_labels_txt(tmp_path):
    raw = make_context(tmp_path / "pc", np.array([[3]]), split_list="pascalcontext_val.txt")
    names = [n.replace(" ", "") for n in PASCAL_CONTEXT_459]  # the release spells them without spaces
    (raw / "VOCdevkit" / "VOC2010" / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(names, 1)))
    ds = prepare_dataset("pascal-context-459", raw, tmp_path / "out", "val")
    assert ds.classes[2] == "airconditioner" and ds.num_classes == 459
    np.testing.assert_array_equal(saved_label(ds, 0), [[2]])


def test_pc59_maps_the_59_names_and_ignores_the_rest(tmp_path):
    raw_map = np.array([[pc_id("aeroplane"), pc_id("table")],
                        [pc_id("wood"), pc_id("accordion")],
                        [0, pc_id("pottedplant")]])
    raw = make_context(tmp_path / "pc", raw_map)
    ds = prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val", train_vocabulary=["table", "wood"])
    assert ds.num_classes == 59 and ds.ignore_label == 255
    assert ds.classes[:3] == ["aeroplane", "bicycle", "bird"] and ds.classes[10] == "table"
    assert [i for i, s in enumerate(ds.seen) if s] == [10, 58]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint8
    # 59_labels.txt order: aeroplane 0, table 10, pottedplant 15, wood 58; accordion and unlabeled → 255
    np.testing.assert_array_equal(label, [[0, 10], [58, 255], [255, 15]])


def test_pc59_class_order_from_59_labels_txt(tmp_path):
    raw = make_context(tmp_path / "pc", np.array([[pc_id("aeroplane"), pc_id("wood")], [pc_id("cat"), 0]]))
    (raw / "VOCdevkit" / "VOC2010" / "59_labels.txt").write_text("1: wood\n2: aeroplane\n\n")
    ds = prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val")
    assert ds.classes == ["wood", "aeroplane"]
    np.testing.assert_array_equal(saved_label(ds, 0), [[1, 0], [255, 255]])
    (raw / "VOCdevkit" / "VOC2010" / "59_labels.txt").write_text("1: wood\n2: unicorn\n")
    with pytest.raises(DataError, match="unicorn"):
        prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val")


def test_pascal_context_detectron2_layout(tmp_path):
    voc = tmp_path / "pc" / "VOCdevkit" / "VOC2010"
    write_jpeg(voc / "JPEGImages" / f"{IMAGE_ID}.jpg", 2, 2)
    (voc / "annotations_detectron2" / "pc459_val").mkdir(parents=True)
    (voc / "annotations_detectron2" / "pc59_val").mkdir(parents=True)
    Image.fromarray(np.array([[65535, 0], [458, 3]], dtype=np.uint16)).save(
        voc / "annotations_detectron2" / "pc459_val" / f"{IMAGE_ID}.tif")
    Image.fromarray(np.array([[255, 0], [58, 3]], dtype=np.uint8)).save(
        voc / "annotations_detectron2" / "pc59_val" / f"{IMAGE_ID}.png")
    pc459 = prepare_dataset("pascal-context-459", tmp_path / "pc", tmp_path / "459", "val")
    np.testing.assert_array_equal(saved_label(pc459, 0), [[65535, 0], [458, 3]])
    assert saved_label(pc459, 0).dtype == np.uint16
    pc59 = prepare_dataset("pascal-context-59", tmp_path / "pc", tmp_path / "59", "val")
    np.testing.assert_array_equal(saved_label(pc59, 0), [[255, 0], [58, 3]])
    Image.fromarray(np.array([[459, 0], [0, 0]], dtype=np.uint16)).save(
        voc / "annotations_detectron2" / "pc459_val" / f"{IMAGE_ID}.tif")
    with pytest.raises(DataError, match=r"\[459\]"):
        prepare_dataset("pascal-context-459", tmp_path / "pc", tmp_path / "459", "val")


def test_labelmap_value_beyond_459_is_an_error(tmp_path):
    raw = make_context(tmp_path / "pc", np.array([[460, 1]]))
    mat = raw / "VOCdevkit" / "VOC2010" / "trainval" / f"{IMAGE_ID}.mat"
    with pytest.raises(DataError, match=r"\[460\]") as err:
        prepare_dataset("pascal-context-459", raw, tmp_path / "out", "val")
    assert err.value.path == mat


def test_unreadable_or_incomplete_mat_is_an_error_naming_it(tmp_path):
    raw = make_context(tmp_path / "pc", np.array([[1, 1]]))
    mat = raw / "VOCdevkit" / "VOC2010" / "trainval" / f"{IMAGE_ID}.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file, broken")
    with pytest.raises(DataError, match="not a readable .mat") as err:
        prepare_dataset("pascal-context-459", raw, tmp_path / "out", "val")
    assert err.value.path == mat
    scipy.io.savemat(mat, {"Labels": np.ones((1, 2), dtype=np.uint16)})
    with pytest.raises(DataError, match="lacks the variable LabelMap"):
        prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val")
    mat.unlink()
    with pytest.raises(DataError, match="missing"):
        prepare_dataset("pascal-context-459", raw, tmp_path / "out", "val")


def test_pascal_context_size_mismatch_and_missing_split_list(tmp_path):
    raw = make_context(tmp_path / "pc", np.array([[1, 1]]))
    write_jpeg(raw / "VOCdevkit" / "VOC2010" / "JPEGImages" / f"{IMAGE_ID}.jpg", 2, 2)
    with pytest.raises(DataError, match="2x1.*2x2"):
        prepare_dataset("pascal-context-459", raw, tmp_path / "out", "val")
    with pytest.raises(DataError, match="no split list for 'train'"):
        prepare_dataset("pascal-context-459", raw, tmp_path / "out", "train")
    with pytest.raises(DataError, match="VOCdevkit/VOC2010"):
        prepare_dataset("pascal-context-59", tmp_path / "elsewhere", tmp_path / "out", "val")


# ---------------------------------------------------------------- VOC 2012

def voc_palette() -> list[int]:
    """The VOC colour map (bit-interleaved label index), as the SegmentationClass PNGs carry it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def make_voc(root: Path, values: np.ndarray) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    write_jpeg(voc / "JPEGImages" / "2007_000033.jpg", *values.shape)
    (voc / "SegmentationClass").mkdir(parents=True)
    im = Image.fromarray(values.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(voc / "SegmentationClass" / "2007_000033.png")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    return root


def test_voc_palette_png_background_and_void_become_ignore(tmp_path):
    raw = make_voc(tmp_path / "voc", np.array([[0, 1, 20], [255, 15, 0]]))
    assert Image.open(raw / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png").mode == "P"
    ds = prepare_dataset("voc-20", raw, tmp_path / "out", "val", train_vocabulary=["person", "Dog"])
    assert ds.classes[0] == "aeroplane" and ds.classes[19] == "tvmonitor" and ds.num_classes == 20
    assert [i for i, s in enumerate(ds.seen) if s] == [11, 14]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, [[255, 0, 19], [255, 14, 255]])


def test_voc_value_21_and_rgb_labels_are_errors(tmp_path):
    raw = make_voc(tmp_path / "voc", np.array([[0, 21], [22, 0]]))
    label = raw / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    with pytest.raises(DataError, match=r"\[21, 22\]") as err:
        prepare_dataset("voc-20", raw, tmp_path / "out", "val")
    assert err.value.path == label
    Image.open(label).convert("RGB").save(label)
    with pytest.raises(DataError, match="mode RGB"):
        prepare_dataset("voc-20", raw, tmp_path / "out", "val")


def test_voc_missing_split_list_and_directory(tmp_path):
    raw = make_voc(tmp_path / "voc", np.array([[0, 1]]))
    with pytest.raises(DataError, match="split list is missing") as err:
        prepare_dataset("voc-20", raw, tmp_path / "out", "train")
    assert err.value.path.name == "train.txt"
    with pytest.raises(DataError, match="SegmentationClass"):
        prepare_dataset("voc-20", tmp_path / "nothing", tmp_path / "out", "val")
