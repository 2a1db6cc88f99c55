"""ADE20K-150 (and ADE-layout sets with their own class file) and ADE20K-847 readers on tiny fixtures written
in the official formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.datasets.registry import prepare_dataset
from ovseg_core.datasets.class_names import ADE20K_847
from ovseg_core.errors import DataError


def write_jpeg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path, quality=90)


def write_label(path: Path, values: np.ndarray, dtype=np.uint8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=dtype)).save(path)


def saved_label(ds: PreparedDataset, i: int) -> np.ndarray:
    return np.asarray(Image.open(ds.root / ds.samples[i].label))


# ---------------------------------------------------------------- ADE20K-150 layout with objectInfo{K}.csv

OBJECT_INFO_CSV = """Idx,Ratio,Train,Val,Name
1,0.3,10,2,sky-other;heaven
2,0.2,8,2,cat;kitty
3,0.1,5,1,Red Ball;sphere
4,0.05,4,1,grass
"""
ADE_RAW = np.array([[0, 1, 2], [3, 4, 0]])
ADE_EXPECTED = np.array([[255, 0, 1], [2, 3, 255]])  # value - 1, 0 → ignore


def make_ade(root: Path, class_file_dir: str | None = ".") -> Path:
    base = root / "ADEChallengeData2016"
    for stem in ("ADE_val_00000001", "ADE_val_00000002"):
        write_jpeg(base / "images" / "validation" / f"{stem}.jpg", 2, 3)
    write_label(base / "annotations" / "validation" / "ADE_val_00000001.png", ADE_RAW)
    write_label(base / "annotations" / "validation" / "ADE_val_00000002.png", np.full((2, 3), 4))
    if class_file_dir is not None:
        (root / class_file_dir / "objectInfo4.csv").write_text(OBJECT_INFO_CSV)
    return root


@pytest.mark.parametrize("class_file_dir", [".", "ADEChallengeData2016"])
def test_ade_layout_with_its_class_file(tmp_path, class_file_dir):
    raw = make_ade(tmp_path / "world", class_file_dir)
    ds = prepare_dataset("ade20k-150", raw, tmp_path / "out", "val", train_vocabulary=["Sky", "kitty", "tree"])
    assert ds.classes == ["sky-other", "cat", "Red Ball", "grass"]
    assert ds.seen == [True, True, False, False]
    assert ds.source["synonyms"][2] == ["Red Ball", "sphere"]
    assert ds.ignore_label == 255 and [s.id for s in ds.samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, ADE_EXPECTED)
    np.testing.assert_array_equal(saved_label(ds, 1), np.full((2, 3), 3))


def test_ade150_official_txt_class_file_and_built_in_list(tmp_path):
    raw = make_ade(tmp_path / "ade", class_file_dir=None)
    builtin = prepare_dataset("ade20k-150", raw, tmp_path / "builtin", "validation", train_vocabulary=["edifice"])
    assert builtin.num_classes == 150 and builtin.classes[:3] == ["wall", "building", "sky"]
    assert builtin.seen[:3] == [False, True, False] and sum(builtin.seen) == 1
    assert builtin.classes[-1] == "flag"
    # the challenge's objectInfo150.txt: tab-separated, ', ' synonyms, stray spaces
    txt = raw / "ADEChallengeData2016" / "objectInfo150.txt"
    txt.write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.15\t11\t1\twall\n2 \t0.1\t6\t6\tbuilding, edifice\n"
                   "3\t0.08\t8\t7\tbed \n4\t0.01\t1\t1\tperson, individual\n")
    ds = prepare_dataset("ade20k-150", raw, tmp_path / "out", "val", train_vocabulary=["individual"])
    assert ds.classes == ["wall", "building", "bed", "person"] and ds.seen == [False, False, False, True]
    np.testing.assert_array_equal(saved_label(ds, 0), ADE_EXPECTED)


def test_ade_explicit_class_file_wins_and_several_found_is_an_error(tmp_path):
    raw = make_ade(tmp_path / "world")
    (raw / "ADEChallengeData2016" / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t1\t1\t1\twall\n")
    with pytest.raises(DataError, match="several ADE class files"):
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    ds = prepare_dataset("ade20k-150", raw, tmp_path / "out", "val", class_file=raw / "objectInfo4.csv")
    assert ds.num_classes == 4


@pytest.mark.parametrize("content, problem", [
    ("Idx,Ratio,Name\n1,0.1,wall\n3,0.1,floor\n", "Idx '3', expected 2"),
    ("Index,Ratio,Label\n1,0.1,wall\n", "needs columns Idx and Name"),
    ("Idx,Ratio,Train,Val,Name\n", "lists no classes"),
    ("Idx,Ratio,Train,Val,Name\n1,0.1,1,1, ; \n", "empty class name"),
])
def test_malformed_class_file_is_an_error_naming_it(tmp_path, content, problem):
    raw = make_ade(tmp_path / "world")
    (raw / "objectInfo4.csv").write_text(content)
    with pytest.raises(DataError, match=problem) as err:
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    assert err.value.path == raw / "objectInfo4.csv"


def test_ade_label_beyond_the_class_list_is_an_error(tmp_path):
    raw = make_ade(tmp_path / "world")
    label = raw / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png"
    write_label(label, np.array([[1, 5, 9], [0, 0, 0]]))
    with pytest.raises(DataError, match=r"\[5, 9\]") as err:
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    assert err.value.path == label


def test_ade_size_mismatch_and_rgb_label_are_errors(tmp_path):
    raw = make_ade(tmp_path / "world")
    label = raw / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png"
    write_label(label, np.ones((3, 3)))
    with pytest.raises(DataError, match="3x3.*3x2") as err:
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    assert err.value.path == label
    Image.fromarray(np.ones((2, 3, 3), dtype=np.uint8)).save(label)
    with pytest.raises(DataError, match="mode RGB"):
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")


def test_ade_undecodable_image_is_skipped(tmp_path):
    raw = make_ade(tmp_path / "world")
    (raw / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg").write_bytes(b"garbage")
    ds = prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    assert [s.id for s in ds.samples] == ["ADE_val_00000002"] and len(ds.skipped) == 1


def test_ade_missing_directory(tmp_path):
    with pytest.raises(DataError, match="ADEChallengeData2016/annotations") as err:
        prepare_dataset("ade20k-150", tmp_path / "none", tmp_path / "out", "val")
    assert err.value.path == tmp_path / "none" / "ADEChallengeData2016" / "images" / "validation"


# ---------------------------------------------------------------- ADE20K-847

def make_ade847_d2(root: Path, values: np.ndarray) -> Path:
    base = root / "ADE20K_2021_17_01"
    write_jpeg(base / "images_detectron2" / "validation" / "ADE_val_00000001.jpg", *values.shape)
    write_label(base / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif", values, np.uint16)
    return root


def test_ade847_detectron2_tiff(tmp_path):
    values = np.array([[0, 846, 65535], [5, 65535, 100]])
    raw = make_ade847_d2(tmp_path / "ade", values)
    ds = prepare_dataset("ade20k-847", raw, tmp_path / "out", "val", train_vocabulary=["wall", "totaliser"])
    assert ds.num_classes == 847 and ds.ignore_label == 65535
    assert ds.classes[0] == "wall" and ds.classes[846] == "adding machine" and ds.classes[1] == "building"
    assert [i for i, s in enumerate(ds.seen) if s] == [0, 846]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint16
    np.testing.assert_array_equal(label, values)
    assert ds.source["layout"].startswith("<root>/ADE20K_2021_17_01/images_detectron2")


def test_ade847_tiff_value_beyond_847_is_an_error(tmp_path):
    raw = make_ade847_d2(tmp_path / "ade", np.array([[847, 0], [1000, 65535]]))
    with pytest.raises(DataError, match=r"\[847, 1000\]") as err:
        prepare_dataset("ade20k-847", raw, tmp_path / "out", "val")
    assert err.value.path.suffix == ".tif"


def seg_png(raw_ids: np.ndarray) -> np.ndarray:
    """ADE20K's *_seg.png encoding: R/10 = index // 256, G = index % 256 (B holds instances, ignored)."""
    rgb = np.zeros(raw_ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = raw_ids // 256 * 10 + 3
    rgb[..., 1] = raw_ids % 256
    rgb[..., 2] = 77
    return rgb


def make_ade847_raw(root: Path, raw_ids: np.ndarray) -> Path:
    folder = root / "ADE20K_2021_17_01" / "images" / "ADE" / "validation" / "cultural" / "abbey"
    write_jpeg(folder / "ADE_val_00000001.jpg", *raw_ids.shape)
    Image.fromarray(seg_png(raw_ids)).save(folder / "ADE_val_00000001_seg.png")
    return root


def test_ade847_raw_seg_png_maps_object_indices_to_the_subset(tmp_path):
    assert 5 not in {raw for raw, _ in ADE20K_847}
    raw = make_ade847_raw(tmp_path / "ade", np.array([[2978, 312, 3148], [0, 5, 2978]]))
    ds = prepare_dataset("ade20k-847", raw, tmp_path / "out", "val")
    assert [s.id for s in ds.samples] == ["ADE_val_00000001"]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint16
    # wall (2978) → 0, building (312) → 1, adding machine (3148) → 846; unlabeled and off-subset → ignore
    np.testing.assert_array_equal(label, [[0, 1, 846], [65535, 65535, 0]])


def test_ade847_raw_with_a_class_mapping_file(tmp_path):
    raw = make_ade847_raw(tmp_path / "ade", np.array([[2978, 312], [2420, 0]]))
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps([{"name": "wall", "id": 2978, "trainId": 1},
                                   {"name": "sky, heavens", "id": 2420, "trainId": 0}]))
    ds = prepare_dataset("ade20k-847", raw, tmp_path / "out", "val", class_file=mapping,
                         options={"layout": "raw"}, train_vocabulary=["heavens"])
    assert ds.classes == ["sky", "wall"] and ds.seen == [True, False] and ds.ignore_label == 255
    label = saved_label(ds, 0)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, [[1, 255], [0, 255]])
    mapping.write_text(json.dumps([{"name": "wall", "id": 2978, "trainId": 2}]))
    with pytest.raises(DataError, match="trainIds must be 0..K-1") as err:
        prepare_dataset("ade20k-847", raw, tmp_path / "out", "val", class_file=mapping)
    assert err.value.path == mapping


def test_ade847_raw_seg_png_must_be_rgb(tmp_path):
    raw = make_ade847_raw(tmp_path / "ade", np.array([[2978, 312]]))
    seg = next((raw / "ADE20K_2021_17_01").rglob("*_seg.png"))
    Image.fromarray(np.zeros((1, 2), dtype=np.uint8)).save(seg)
    with pytest.raises(DataError, match="expected RGB") as err:
        prepare_dataset("ade20k-847", raw, tmp_path / "out", "val")
    assert err.value.path == seg


def test_ade847_missing_directory_names_both_layouts(tmp_path):
    with pytest.raises(DataError) as err:
        prepare_dataset("ade20k-847", tmp_path / "none", tmp_path / "out", "val")
    assert "images_detectron2" in str(err.value) and "_seg.png" in str(err.value)
