"""Pascal Context (459 / 59) and Pascal VOC 2012 readers on tiny official-format fixtures: LabelMap .mat files,
labels.txt and 59_labels.txt as distributed, detectron2's files in OVSeg's and CAT-Seg's id orders, VOC's
palette PNGs."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ovseg_core.archive import read_bytes
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.datasets.registry import prepare_dataset
from ovseg_core.datasets.class_names import PASCAL_CONTEXT_59, PASCAL_CONTEXT_459
from ovseg_core.errors import DataError

IMAGE_ID = "2008_000002"


def write_jpeg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8)).save(path, quality=90)


def saved_label(ds: PreparedDataset, i: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_bytes(ds.root / ds.samples[i].label))))


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


def write_labels_txt(voc: Path, names: list[str]) -> Path:
    path = voc / "labels.txt"
    path.write_text("".join(f"{i}: {n}\n" for i, n in enumerate(names, 1)))
    return path


def test_pc459_labels_txt_is_checked_against_the_built_in_list(tmp_path):
    raw = make_context(tmp_path / "pc", np.array([[3]]), split_list="pascalcontext_val.txt")
    voc = raw / "VOCdevkit" / "VOC2010"
    names = [n.replace(" ", "") for n in PASCAL_CONTEXT_459]  # the release spells them without spaces
    write_labels_txt(voc, names)
    ds = prepare_dataset("pascal-context-459", raw, tmp_path / "out", "val")
    assert ds.classes[2] == "air conditioner" and ds.num_classes == 459
    assert ds.source["class_files"] == [os.path.relpath(voc / "labels.txt", tmp_path / "out")]
    np.testing.assert_array_equal(saved_label(ds, 0), [[2]])
    names[2] = "heater"
    path = write_labels_txt(voc, names)
    with pytest.raises(DataError, match="id 3 is 'heater'.*'air conditioner'") as err:
        prepare_dataset("pascal-context-459", raw, tmp_path / "out", "val")
    assert err.value.path == path
    write_labels_txt(voc, names[:458])
    with pytest.raises(DataError, match="ids must be 1..459"):
        prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val")


def official_59_labels() -> list[str]:
    """59_labels.txt as the dataset site distributes it: the 59 classes in OVSeg's order, three of them spelled
    otherwise than in labels.txt (diningtable, clothes, bedcloth)."""
    respelled = {"table": "diningtable", "cloth": "clothes", "bedclothes": "bedcloth"}
    return [respelled.get(n, n) for n in PASCAL_CONTEXT_59]


def test_pc59_with_the_official_59_labels_txt(tmp_path):
    raw_map = np.array([[pc_id("aeroplane"), pc_id("table")], [pc_id("cloth"), pc_id("bedclothes")]])
    raw = make_context(tmp_path / "pc", raw_map)
    voc = raw / "VOCdevkit" / "VOC2010"
    (voc / "59_labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(official_59_labels(), 1)))
    write_labels_txt(voc, list(PASCAL_CONTEXT_459))
    ds = prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val")
    assert ds.classes == list(PASCAL_CONTEXT_59)
    assert len(ds.source["class_files"]) == 2
    np.testing.assert_array_equal(saved_label(ds, 0), [[0, 10], [27, 51]])  # 59_labels.txt lines 1, 11, 28, 52


@pytest.mark.parametrize("lines, problem", [
    (["wood", "aeroplane"], "lists 2 classes, not the 59"),
    (["unicorn"] + official_59_labels()[1:], "class 1 is 'unicorn', but class 1 of Pascal Context-59 is 'aeroplane'"),
    (official_59_labels()[1:] + ["aeroplane"], "class 1 is 'bicycle'"),
])
def test_pc59_59_labels_txt_that_is_not_the_official_list_is_an_error(tmp_path, lines, problem):
    raw = make_context(tmp_path / "pc", np.array([[1]]))
    path = raw / "VOCdevkit" / "VOC2010" / "59_labels.txt"
    path.write_text("".join(f"{i}: {n}\n" for i, n in enumerate(lines, 1)))
    with pytest.raises(DataError, match=problem) as err:
        prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val")
    assert err.value.path == path


@pytest.mark.parametrize("reader, name, content, problem", [
    ("pascal-context-459", "labels.txt", None, "label list file is missing"),
    ("pascal-context-459", "labels.txt", b"1: accordion\n2: a\xe9roplane\n", "unreadable"),
    ("pascal-context-459", "labels.txt", b"1 accordion\n", "line 1: expected 'id: name'"),
    ("pascal-context-59", "59_labels.txt", None, "class list file is missing"),
    ("pascal-context-59", "59_labels.txt", b"\xff\xfe1: aeroplane\n", "unreadable"),
])
def test_missing_or_corrupt_class_file_is_an_error_naming_it(tmp_path, reader, name, content, problem):
    raw = make_context(tmp_path / "pc", np.array([[1]]))
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=problem) as err:
        prepare_dataset(reader, raw, tmp_path / "out", "val", class_file=path)
    assert err.value.path == path


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
    pc59 = prepare_dataset("pascal-context-59", tmp_path / "pc", tmp_path / "59", "val",
                           options={"id_order": "ovseg"})
    np.testing.assert_array_equal(saved_label(pc59, 0), [[255, 0], [58, 3]])
    assert pc59.source["id_order"] == "ovseg" and pc59.source["id_order_check"].startswith("not checked")
    Image.fromarray(np.array([[459, 0], [0, 0]], dtype=np.uint16)).save(
        voc / "annotations_detectron2" / "pc459_val" / f"{IMAGE_ID}.tif")
    with pytest.raises(DataError, match=r"\[459\]"):
        prepare_dataset("pascal-context-459", tmp_path / "pc", tmp_path / "459", "val")


# CAT-Seg's (and mmsegmentation's) PC-59 class list: the 59 classes sorted by their labels.txt id.
CATSEG_59 = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
SCENE = ("person", "sky", "tvmonitor", "wood", "grass", "sofa", "bag", "accordion")  # one row each in the .mat


def make_pc59_d2(root: Path, convention: tuple[str, ...], with_mat: bool = True, with_voc: bool = False) -> Path:
    """A PC-59 image whose detectron2 PNG numbers the classes by `convention` (a class list), with its .mat
    and/or VOC 2010's SegmentationClass PNG beside it as references."""
    voc = root / "VOCdevkit" / "VOC2010"
    label_map = np.array([[pc_id(n)] * 4 for n in SCENE] + [[0] * 4])  # the last row unlabeled
    write_jpeg(voc / "JPEGImages" / f"{IMAGE_ID}.jpg", *label_map.shape)
    if with_mat:
        (voc / "trainval").mkdir(parents=True)
        scipy.io.savemat(voc / "trainval" / f"{IMAGE_ID}.mat", {"LabelMap": label_map.astype(np.uint16)})
    if with_voc:  # VOC values: person 15, tvmonitor 20, sofa 18; the rest background 0 or void 255
        voc_values = {"person": 15, "tvmonitor": 20, "sofa": 18, "sky": 0, "wood": 255}
        values = np.array([[voc_values.get(n, 0)] * 4 for n in SCENE] + [[0] * 4])
        im = Image.fromarray(values.astype(np.uint8), mode="P")
        im.putpalette(voc_palette())
        (voc / "SegmentationClass").mkdir(parents=True)
        im.save(voc / "SegmentationClass" / f"{IMAGE_ID}.png")
    d2 = np.array([[convention.index(n) if n in convention else 255] * 4 for n in SCENE] + [[255] * 4])
    (voc / "annotations_detectron2" / "pc59_val").mkdir(parents=True)
    Image.fromarray(d2.astype(np.uint8)).save(voc / "annotations_detectron2" / "pc59_val" / f"{IMAGE_ID}.png")
    return root


@pytest.mark.parametrize("order, convention", [("ovseg", PASCAL_CONTEXT_59), ("catseg", CATSEG_59)])
def test_pc59_detectron2_files_in_either_id_order(tmp_path, order, convention):
    raw = make_pc59_d2(tmp_path / "pc", convention)
    ds = prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val", options={"id_order": order})
    assert ds.classes == list(PASCAL_CONTEXT_59)  # one class order downstream, whichever the files use
    expected = [PASCAL_CONTEXT_59.index(n) if n in PASCAL_CONTEXT_59 else 255 for n in SCENE] + [255]
    np.testing.assert_array_equal(saved_label(ds, 0)[:, 0], expected)
    assert ds.source["id_order"] == order and "100%" in ds.source["id_order_check"]


@pytest.mark.parametrize("with_mat, with_voc", [(True, False), (False, True)])
def test_pc59_detectron2_files_in_the_other_id_order_are_an_error(tmp_path, with_mat, with_voc):
    raw = make_pc59_d2(tmp_path / "pc", CATSEG_59, with_mat, with_voc)
    d2_dir = raw / "VOCdevkit" / "VOC2010" / "annotations_detectron2" / "pc59_val"
    with pytest.raises(DataError, match="id_order is 'ovseg', but these labels follow the 'catseg' order") as err:
        prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val", options={"id_order": "ovseg"})
    assert err.value.path == d2_dir
    with pytest.raises(DataError, match="id_order: 'ovseg'.*or 'catseg'"):
        prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val")
    with pytest.raises(ValueError, match="id_order must be one of"):
        prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val", options={"id_order": "sorted"})
    assert prepare_dataset("pascal-context-59", raw, tmp_path / "out", "val",
                           options={"id_order": "catseg"}).source["id_order"] == "catseg"


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
