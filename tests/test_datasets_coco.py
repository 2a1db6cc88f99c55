"""COCO-Stuff (PNG and JSON) and COCO Captions readers on tiny fixtures written in the official formats."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ovseg_core.archive import read_bytes
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.datasets.registry import prepare_dataset
from ovseg_core.datasets.class_names import COCO_STUFF_182, COCO_STUFF_UNUSED
from ovseg_core.errors import DataError


def write_jpeg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


def write_png(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def saved_label(ds: PreparedDataset, i: int) -> np.ndarray:
    """The label map as stored on disk (dtype included)."""
    return np.asarray(Image.open(io.BytesIO(read_bytes(ds.root / ds.samples[i].label))))


def rle(mask: np.ndarray) -> dict:
    """A compressed RLE exactly as COCO JSON stores it (pycocotools encodes, counts as a string)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def box_mask(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((height, width), dtype=bool)
    m[rows, cols] = True
    return m


# ---------------------------------------------------------------- stuffthingmaps PNG

PNG_RAW = np.array([[0, 10, 12, 24],
                    [26, 91, 92, 181],
                    [255, 255, 43, 45]])
# Hand-computed: each value minus the number of unused ids {11,25,28,29,44,65,67,68,70,82,90} below it.
PNG_EXPECTED = np.array([[0, 10, 11, 23],
                         [24, 80, 81, 170],
                         [255, 255, 39, 40]])


def make_png_coco(root: Path) -> Path:
    write_jpeg(root / "val2017" / "000000000001.jpg", 3, 4)
    write_png(root / "stuffthingmaps_trainval2017" / "val2017" / "000000000001.png", PNG_RAW)
    write_jpeg(root / "val2017" / "000000000002.jpg", 3, 4)
    write_png(root / "stuffthingmaps_trainval2017" / "val2017" / "000000000002.png", np.full((3, 4), 255))
    return root


def test_png_labels_are_mapped_to_171_contiguous_ids(tmp_path):
    raw = make_png_coco(tmp_path / "coco")
    ds = prepare_dataset("coco-stuff-171", raw, tmp_path / "out", "val")
    assert ds.num_classes == 171 and ds.ignore_label == 255
    assert [s.id for s in ds.samples] == ["000000000001", "000000000002"]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, PNG_EXPECTED)
    np.testing.assert_array_equal(saved_label(ds, 1), np.full((3, 4), 255))
    assert (ds.classes[0], ds.classes[11], ds.classes[23], ds.classes[24]) == ("person", "stop sign", "giraffe",
                                                                               "backpack")
    assert (ds.classes[80], ds.classes[170]) == ("banner", "wood")
    assert not set(ds.classes) & {COCO_STUFF_182[v] for v in COCO_STUFF_UNUSED}
    assert all(ds.seen)  # a training set without a vocabulary: all seen
    assert ds.image_path(0).resolve() == (raw / "val2017" / "000000000001.jpg").resolve()  # referenced, not copied
    assert ds.load_image(0).shape == (3, 4, 3)


def test_png_seen_flags_normalise_coco_suffixes(tmp_path):
    raw = make_png_coco(tmp_path / "coco")
    ds = prepare_dataset("coco-stuff-171", raw, tmp_path / "out", "val",
                         train_vocabulary=["Person", "wall", "tree-merged", "SKY"])
    seen = {c for c, s in zip(ds.classes, ds.seen) if s}
    assert seen == {"person", "wall-other", "tree", "sky-other"}  # not wall-brick, wall-stone, ...


@pytest.mark.parametrize("value", [11, 90, 200])
def test_png_unused_or_out_of_range_value_is_an_error(tmp_path, value):
    raw = make_png_coco(tmp_path / "coco")
    bad = PNG_RAW.copy()
    bad[2, 3] = value
    label = raw / "stuffthingmaps_trainval2017" / "val2017" / "000000000001.png"
    write_png(label, bad)
    with pytest.raises(DataError) as err:
        prepare_dataset("coco-stuff-171", raw, tmp_path / "out", "val")
    assert err.value.path == label and f"[{value}]" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_corrupt_image_is_skipped_and_recorded(tmp_path):
    raw = make_png_coco(tmp_path / "coco")
    image = raw / "val2017" / "000000000002.jpg"
    image.write_bytes(image.read_bytes()[:200])  # truncated JPEG
    ds = prepare_dataset("coco-stuff-171", raw, tmp_path / "out", "val")
    assert [s.id for s in ds.samples] == ["000000000001"]
    assert len(ds.skipped) == 1 and ds.skipped[0]["path"].endswith("000000000002.jpg")
    assert "decode" in ds.skipped[0]["reason"]
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["skipped"] == ds.skipped


def test_undecodable_label_map_is_an_error(tmp_path):
    raw = make_png_coco(tmp_path / "coco")
    label = raw / "stuffthingmaps_trainval2017" / "val2017" / "000000000002.png"
    label.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError) as err:
        prepare_dataset("coco-stuff-171", raw, tmp_path / "out", "val")
    assert err.value.path == label


def test_missing_label_map_is_an_error(tmp_path):
    raw = make_png_coco(tmp_path / "coco")
    label = raw / "stuffthingmaps_trainval2017" / "val2017" / "000000000002.png"
    label.unlink()
    with pytest.raises(DataError, match="missing") as err:
        prepare_dataset("coco-stuff-171", raw, tmp_path / "out", "val")
    assert err.value.path == label


def test_label_and_image_size_mismatch_is_an_error(tmp_path):
    raw = make_png_coco(tmp_path / "coco")
    write_jpeg(raw / "val2017" / "000000000002.jpg", 4, 4)
    with pytest.raises(DataError, match="4x3.*4x4"):
        prepare_dataset("coco-stuff-171", raw, tmp_path / "out", "val")


def test_missing_dataset_directory_names_it_and_the_layout(tmp_path):
    with pytest.raises(DataError) as err:
        prepare_dataset("coco-stuff-171", tmp_path / "nowhere", tmp_path / "out", "val")
    assert "nowhere" in str(err.value.path) and "stuffthingmaps_trainval2017" in str(err.value)


# ---------------------------------------------------------------- stuff + instances JSON

H, W = 6, 8


def coco_file(images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def make_json_coco(root: Path, things: list[dict] | None = None, stuff: list[dict] | None = None) -> Path:
    """Two 6x8 images; the first has sky (polygon), road (RLE), 'other' (RLE), a person (polygon) and a crowd
    of cars (RLE); the second has no annotations. Categories: only the ones used (like the embedded world).
    As in COCO-Stuff, the stuff file labels the crowd's region 'other' (a thing region)."""
    images = [{"id": 1, "file_name": "000000000001.jpg", "height": H, "width": W},
              {"id": 2, "file_name": "000000000002.jpg", "height": H, "width": W}]
    for img in images:
        write_jpeg(root / "val2017" / img["file_name"], H, W)
    crowd = box_mask(H, W, slice(4, 6), slice(5, 8))
    stuff_anns = [
        {"id": 10, "image_id": 1, "category_id": 157, "iscrowd": 0,
         "segmentation": [[0, 0, 8, 0, 8, 2, 0, 2]]},  # rows 0-1
        {"id": 11, "image_id": 1, "category_id": 149, "iscrowd": 0,
         "segmentation": rle(box_mask(H, W, slice(3, 6), slice(0, 8)) & ~crowd)},  # rows 3-5 but the crowd
        {"id": 12, "image_id": 1, "category_id": 183, "iscrowd": 0,  # 'other': the sky's corner and the crowd
         "segmentation": rle(box_mask(H, W, slice(0, 2), slice(6, 8)) | crowd)},
    ]
    thing_anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[1, 1, 4, 1, 4, 5, 1, 5]]},  # rows 1-4, cols 1-3
        {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 1, "segmentation": rle(crowd)},
    ]
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / "instances_val2017.json").write_text(json.dumps(coco_file(
        images, thing_anns, things or [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}])))
    (ann_dir / "stuff_val2017.json").write_text(json.dumps(coco_file(
        images, stuff_anns, stuff or [{"id": 149, "name": "road"}, {"id": 157, "name": "sky-other"},
                                      {"id": 183, "name": "other"}])))
    return root


# person 0, car 1, road 2, sky-other 3 (categories sorted by id); things painted over stuff; 'other' → 255.
# The crowd of cars is not painted (cocostuffapi's label maps leave crowds out: includeCrowd=False), so its
# 'other' region stays ignore.
JSON_EXPECTED = np.array([
    [3, 3, 3, 3, 3, 3, 255, 255],
    [3, 0, 0, 0, 3, 3, 255, 255],
    [255, 0, 0, 0, 255, 255, 255, 255],
    [2, 0, 0, 0, 2, 2, 2, 2],
    [2, 0, 0, 0, 2, 255, 255, 255],
    [2, 2, 2, 2, 2, 255, 255, 255],
])


def test_json_paints_stuff_then_things_with_categories_from_the_file(tmp_path):
    raw = make_json_coco(tmp_path / "coco")
    ds = prepare_dataset("coco-stuff-171-json", raw, tmp_path / "out", "val", train_vocabulary=["PERSON", "sky"])
    assert ds.classes == ["person", "car", "road", "sky-other"]
    assert ds.seen == [True, False, False, True]
    assert ds.source["category_ids"] == [1, 3, 149, 157]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, JSON_EXPECTED)
    np.testing.assert_array_equal(saved_label(ds, 1), np.full((H, W), 255))


def test_json_and_png_readers_agree_on_the_full_category_list(tmp_path):
    things = [{"id": v + 1, "name": n} for v, n in enumerate(COCO_STUFF_182[:91]) if v not in COCO_STUFF_UNUSED]
    stuff = [{"id": v + 92, "name": n} for v, n in enumerate(COCO_STUFF_182[91:])] + [{"id": 183, "name": "other"}]
    raw = make_json_coco(tmp_path / "coco", things, stuff)
    for stem, expected in (("000000000001", JSON_EXPECTED), ("000000000002", np.full((H, W), 255))):
        # the same scene as a stuffthingmaps PNG: JSON category id = PNG value + 1
        png = np.vectorize({0: 0, 1: 2, 2: 148, 3: 156, 255: 255}.__getitem__)(expected)
        write_png(raw / "stuffthingmaps_trainval2017" / "val2017" / f"{stem}.png", png)
    from_json = prepare_dataset("coco-stuff-171-json", raw, tmp_path / "json", "val")
    from_png = prepare_dataset("coco-stuff-171", raw, tmp_path / "png", "val")
    assert from_json.classes == from_png.classes and len(from_json.classes) == 171
    for i in range(2):
        np.testing.assert_array_equal(saved_label(from_json, i), saved_label(from_png, i))
    assert saved_label(from_json, 0)[1, 1] == from_json.classes.index("person")


def test_json_not_valid_is_an_error_naming_the_file(tmp_path):
    raw = make_json_coco(tmp_path / "coco")
    path = raw / "annotations" / "instances_val2017.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON") as err:
        prepare_dataset("coco-stuff-171-json", raw, tmp_path / "out", "val")
    assert err.value.path == path


def test_json_missing_keys_are_errors_naming_the_file(tmp_path):
    raw = make_json_coco(tmp_path / "coco")
    path = raw / "annotations" / "stuff_val2017.json"
    data = json.loads(path.read_text())
    del data["annotations"][1]["segmentation"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[1\] lacks \['segmentation'\]") as err:
        prepare_dataset("coco-stuff-171-json", raw, tmp_path / "out", "val")
    assert err.value.path == path
    data = json.loads((raw / "annotations" / "instances_val2017.json").read_text())
    del data["categories"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="lacks the list 'categories'"):
        prepare_dataset("coco-stuff-171-json", raw, tmp_path / "out", "val")


def test_json_missing_annotation_file_is_an_error(tmp_path):
    raw = make_json_coco(tmp_path / "coco")
    path = raw / "annotations" / "stuff_val2017.json"
    path.unlink()
    with pytest.raises(DataError, match="missing") as err:
        prepare_dataset("coco-stuff-171-json", raw, tmp_path / "out", "val")
    assert err.value.path == path


def test_json_unknown_category_is_an_error(tmp_path):
    raw = make_json_coco(tmp_path / "coco", things=[{"id": 1, "name": "person"}])
    with pytest.raises(DataError, match="unknown category id 3") as err:
        prepare_dataset("coco-stuff-171-json", raw, tmp_path / "out", "val")
    assert err.value.path.name == "instances_val2017.json"


def test_json_size_disagreeing_with_the_image_is_an_error(tmp_path):
    raw = make_json_coco(tmp_path / "coco")
    write_jpeg(raw / "val2017" / "000000000002.jpg", H + 1, W)
    with pytest.raises(DataError, match=f"{W}x{H}.*{W}x{H + 1}"):
        prepare_dataset("coco-stuff-171-json", raw, tmp_path / "out", "val")


# ---------------------------------------------------------------- captions

CAPTIONS = {1: [" A person stands on a road. ", "someone near a car"], 2: ["an empty street"], 3: ["a dog"]}


def write_captions(root: Path) -> None:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W} for i in CAPTIONS]
    anns = [{"id": 100 * i + k, "image_id": i, "caption": c}
            for i, caps in CAPTIONS.items() for k, c in enumerate(caps)]
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    write_jpeg(root / "val2017" / "000000000003.jpg", H, W)  # captioned, but not in the segmentation files


def test_captions_attach_to_the_json_reader(tmp_path):
    raw = make_json_coco(tmp_path / "coco")
    write_captions(raw)
    ds = prepare_dataset("coco-captions", raw, tmp_path / "out", "val", options={"labels": "json"})
    assert ds.captions() == {"000000000001": ["A person stands on a road.", "someone near a car"],
                             "000000000002": ["an empty street"]}
    np.testing.assert_array_equal(saved_label(ds, 0), JSON_EXPECTED)


def test_captions_attach_to_the_png_reader_and_stand_alone(tmp_path):
    raw = make_json_coco(tmp_path / "coco")
    write_captions(raw)
    for stem in ("000000000001", "000000000002", "000000000003"):
        write_png(raw / "stuffthingmaps_trainval2017" / "val2017" / f"{stem}.png", np.zeros((H, W)))
    with_png = prepare_dataset("coco-captions", raw, tmp_path / "png", "val", options={"labels": "png"})
    assert with_png.num_classes == 171 and with_png.captions()["000000000003"] == ["a dog"]
    only = prepare_dataset("coco-captions", raw, tmp_path / "only", "val")  # caption-only by default
    assert [s.id for s in only.samples] == ["000000000001", "000000000002", "000000000003"]
    assert all(s.label is None for s in only.samples) and only.classes == []
    assert only.captions()["000000000003"] == ["a dog"]
    also = prepare_dataset("coco-stuff-171", raw, tmp_path / "also", "val", options={"captions": True})
    assert also.captions() == with_png.captions()


def test_caption_referring_to_unknown_image_is_an_error(tmp_path):
    raw = make_json_coco(tmp_path / "coco")
    write_captions(raw)
    path = raw / "annotations" / "captions_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["image_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown image id 99") as err:
        prepare_dataset("coco-captions", raw, tmp_path / "out", "val")
    assert err.value.path == path
