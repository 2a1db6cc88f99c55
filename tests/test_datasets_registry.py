"""The dataset registry, class lists and seen flags, and the built-in official class-name data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.datasets.registry import DATASETS, prepare_dataset
from ovseg_core.datasets import class_names as cn
from ovseg_core.datasets.classes import ClassList, read_name_list, read_numbered_labels
from ovseg_core.datasets.concepts import normalise_name
from ovseg_core.errors import DataError


def test_registry_names_every_required_dataset():
    assert {"coco-stuff-171", "coco-stuff-171-json", "coco-captions", "ade20k-150", "ade20k-847",
            "pascal-context-59", "pascal-context-459", "voc-20"} <= set(DATASETS)
    assert all(spec.name == name and spec.description for name, spec in DATASETS.items())


def test_unknown_dataset_option_or_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'coco'.*coco-stuff-171"):
        prepare_dataset("coco", tmp_path, tmp_path / "out", "val")
    with pytest.raises(ValueError, match=r"unknown options \['captions'\]"):
        prepare_dataset("voc-20", tmp_path, tmp_path / "out", "val", options={"captions": True})
    with pytest.raises(ValueError, match="layout must be one of"):
        prepare_dataset("ade20k-847", tmp_path, tmp_path / "out", "val", options={"layout": "zip"})
    with pytest.raises(ValueError, match="labels must be one of"):
        prepare_dataset("coco-captions", tmp_path, tmp_path / "out", "val", options={"labels": "rle"})
    with pytest.raises(ValueError, match="no class file"):
        prepare_dataset("voc-20", tmp_path, tmp_path / "out", "val", class_file=tmp_path / "x.txt")


@pytest.mark.parametrize("name, expected", [
    ("Wall-Other-Merged", "wall"), ("desk-stuff", "desk"), ("sky-other", "sky"), (" Potted_Plant ", "potted plant"),
    ("other", "other"), ("wall-brick", "wall-brick"), ("t-shirt", "t-shirt"),
])
def test_names_are_normalised_for_matching(name, expected):
    assert normalise_name(name) == expected


def test_seen_when_any_synonym_is_in_the_vocabulary():
    classes = ClassList.from_names(["building, edifice", "tree", "wall-other", "floor"])
    assert classes.names == ["building", "tree", "wall-other", "floor"]
    assert [m.seen for m in classes.seen_split(["EDIFICE", "tree-merged", "wall"])] == [True, True, True, False]
    assert [m.seen for m in classes.seen_split([])] == [False] * 4
    assert [m.seen for m in classes.seen_split(None)] == [True] * 4  # a training set: every class is seen


def test_label_list_files(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("1: accordion\n2: aeroplane\n\n3:air conditioner\n")
    assert read_numbered_labels(path) == {1: "accordion", 2: "aeroplane", 3: "air conditioner"}
    path.write_text("1: accordion\n1: aeroplane\n")
    with pytest.raises(DataError, match="id 1 listed twice"):
        read_numbered_labels(path)
    path.write_text("accordion\n")
    with pytest.raises(DataError, match="line 1: expected 'id: name'"):
        read_numbered_labels(path)
    path.write_text("wood\n2: aeroplane\n")
    assert read_name_list(path) == ["wood", "aeroplane"]
    with pytest.raises(DataError, match="missing"):
        read_name_list(tmp_path / "nope.txt")


def test_official_class_name_data():
    assert len(cn.COCO_STUFF_182) == 182 and len(set(cn.COCO_STUFF_182)) == 182
    assert [cn.COCO_STUFF_182[v] for v in sorted(cn.COCO_STUFF_UNUSED)] == [
        "street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk", "door", "blender",
        "hair brush"]
    assert cn.COCO_STUFF_182[91] == "banner" and cn.COCO_STUFF_182[181] == "wood"
    assert len(cn.ADE20K_150) == 150 and len(set(cn.ADE20K_150)) == 150
    ids = [raw for raw, _ in cn.ADE20K_847]
    assert len(cn.ADE20K_847) == 847 and len(set(ids)) == 847 and all(0 < i < 26 * 256 for i in ids)
    assert len({name for _, name in cn.ADE20K_847}) == 847
    assert len(cn.PASCAL_CONTEXT_459) == 459 and list(cn.PASCAL_CONTEXT_459) == sorted(cn.PASCAL_CONTEXT_459)
    assert len(cn.PASCAL_CONTEXT_59) == 59 and set(cn.PASCAL_CONTEXT_59) <= set(cn.PASCAL_CONTEXT_459)
    assert len(cn.VOC_20) == 20


def make_voc(root: Path, values: list[list[int]]) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    arr = np.asarray(values, dtype=np.uint8)
    Image.fromarray(np.zeros(arr.shape + (3,), dtype=np.uint8)).save(voc / "JPEGImages" / "a.jpg")
    label = Image.fromarray(arr, mode="P")
    label.putpalette([c for i in range(256) for c in (i, i, i)])  # PIL remaps indices of a P image without one
    label.save(voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    return root


def test_output_is_replaced_whole_and_kept_when_a_rerun_fails(tmp_path):
    out = tmp_path / "out"
    prepare_dataset("voc-20", make_voc(tmp_path / "v1", [[1, 2]]), out, "val")
    ds = prepare_dataset("voc-20", make_voc(tmp_path / "v2", [[3, 4]]), out, "val")
    np.testing.assert_array_equal(ds.load_label(0), [[2, 3]])
    with pytest.raises(DataError):
        prepare_dataset("voc-20", make_voc(tmp_path / "v3", [[3, 99]]), out, "val")
    np.testing.assert_array_equal(PreparedDataset.load(out).load_label(0), [[2, 3]])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
