"""ADE20K-150 (and ADE-layout sets with their own class files) and ADE20K-847 readers on tiny fixtures written
in the official formats: the challenge's objectInfo150.txt, the sceneparsing repository's objectInfo150.csv
(also with semantic-segmentation-pytorch's extra Stuff column), detectron2's TIFFs and the raw *_seg.png."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_core.archive import read_bytes
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.datasets.registry import prepare_dataset
from ovseg_core.datasets.class_names import ADE20K_150, ADE20K_847, COCO_STUFF_182, COCO_STUFF_UNUSED
from ovseg_core.errors import DataError


def write_jpeg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path, quality=90)


def write_label(path: Path, values: np.ndarray, dtype=np.uint8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=dtype)).save(path)


def saved_label(ds: PreparedDataset, i: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_bytes(ds.root / ds.samples[i].label))))


# ---------------------------------------------------------------- ADE20K-150 layout and ADE's class files

# An ADE-layout set of 4 classes in ADE's two class-file formats. objectInfo{K}.txt (the challenge release):
# tab-separated, synonyms split by ', ', stray spaces. objectInfo{K}.csv (the sceneparsing repository): ';'
# between synonyms and between the words of a name alike.
OBJECT_INFO_TXT = ("Idx\tRatio\tTrain\tVal\tName\n1\t0.3000\t10\t2\twall\n"
                   "2 \t0.2000\t8\t2\tchest of drawers, chest, bureau, dresser\n"
                   "3\t0.1000\t5\t1\tpool table, billiard table, snooker table \n4\t0.0500\t4\t1\tgrass\n")
OBJECT_INFO_CSV = ("Idx,Ratio,Train,Val,Name\n1,0.3000,10,2,wall\n2,0.2000,8,2,chest;of;drawers;chest;bureau;dresser\n"
                   "3,0.1000,5,1,pool;table;billiard;table;snooker;table\n4,0.0500,4,1,grass\n")
ADE_RAW = np.array([[0, 1, 2], [3, 4, 0]])
ADE_EXPECTED = np.array([[255, 0, 1], [2, 3, 255]])  # value - 1, 0 → ignore


def make_ade(root: Path, class_files: tuple[str, ...] = ("txt", "csv"), where: str = "ADEChallengeData2016") -> Path:
    base = root / "ADEChallengeData2016"
    for stem in ("ADE_val_00000001", "ADE_val_00000002"):
        write_jpeg(base / "images" / "validation" / f"{stem}.jpg", 2, 3)
    write_label(base / "annotations" / "validation" / "ADE_val_00000001.png", ADE_RAW)
    write_label(base / "annotations" / "validation" / "ADE_val_00000002.png", np.full((2, 3), 4))
    for kind in class_files:
        (root / where / f"objectInfo4.{kind}").write_text(OBJECT_INFO_TXT if kind == "txt" else OBJECT_INFO_CSV)
    return root


@pytest.mark.parametrize("class_files, where", [(("txt", "csv"), "ADEChallengeData2016"), (("txt",), "."),
                                                (("txt", "csv"), ".")])
def test_ade_layout_with_its_class_files(tmp_path, class_files, where):
    raw = make_ade(tmp_path / "world", class_files, where)
    ds = prepare_dataset("ade20k-150", raw, tmp_path / "out", "val", train_vocabulary=["Wall-Other", "table"])
    assert ds.classes == ["wall", "chest of drawers", "pool table", "grass"]
    assert ds.source["synonyms"][1] == ["chest of drawers", "chest", "bureau", "dresser"]
    assert ds.source["synonyms"][2] == ["pool table", "billiard table", "snooker table"]
    assert ds.seen == [True, False, False, False]  # a pool table is no table: "table" is a word, not a synonym
    assert len(ds.source["class_files"]) == len(class_files)
    assert ds.ignore_label == 255 and [s.id for s in ds.samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    label = saved_label(ds, 0)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, ADE_EXPECTED)
    np.testing.assert_array_equal(saved_label(ds, 1), np.full((2, 3), 3))


def test_ade_csv_alone_cannot_name_its_classes(tmp_path):
    raw = make_ade(tmp_path / "world", ("csv",))
    csv_file = raw / "ADEChallengeData2016" / "objectInfo4.csv"
    with pytest.raises(DataError, match="objectInfo4.txt") as err:
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    assert err.value.path == csv_file


def test_ade_csv_that_disagrees_with_the_txt_is_an_error(tmp_path):
    raw = make_ade(tmp_path / "world")
    csv_file = raw / "ADEChallengeData2016" / "objectInfo4.csv"
    csv_file.write_text(OBJECT_INFO_CSV.replace("pool;table;billiard;table;snooker;table", "pool;table;billiard"))
    with pytest.raises(DataError, match="line 4: 'pool;table;billiard' is not class 3") as err:
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    assert err.value.path == csv_file


# Rows of the official objectInfo150.csv (sceneparsing repository). Read with every ';' as a synonym break,
# the 14 whose name has several words lose its tail ("chest"), and six gain "synonyms" that name COCO-Stuff
# classes (pool table, coffee table: "table"; screen door: "door"; swivel chair: "chair"; palm: "tree";
# dirt track: "dirt").
OFFICIAL_CSV_ROWS = {
    45: "chest;of;drawers;chest;bureau;dresser", 57: "pool;table;billiard;table;snooker;table",
    59: "screen;door;screen", 65: "coffee;table;cocktail;table", 74: "kitchen;island", 76: "swivel;chair",
    79: "arcade;machine", 92: "dirt;track", 106: "conveyer;belt;conveyor;belt;conveyer;conveyor;transporter",
    110: "swimming;pool;swimming;bath;natatorium", 124: "trade;name;brand;name;brand;marque",
    137: "traffic;light;traffic;signal;stoplight", 142: "crt;screen", 145: "bulletin;board;notice;board",
    73: "palm;palm;tree", 2: "building;edifice", 15: "door;double;door",
}
OFFICIAL_NAMES = {45: "chest of drawers", 57: "pool table", 59: "screen door", 65: "coffee table",
                  74: "kitchen island", 76: "swivel chair", 79: "arcade machine", 92: "dirt track",
                  106: "conveyer belt", 110: "swimming pool", 124: "trade name", 137: "traffic light",
                  142: "crt screen", 145: "bulletin board", 73: "palm", 2: "building", 15: "door"}


def official_csv(header: str = "Idx,Ratio,Train,Val,Name") -> str:
    """objectInfo150.csv: the rows above as the release writes them, the others by its rule (words and synonyms
    joined by ';')."""
    rows = {i: ";".join(w for syn in name.split(", ") for w in syn.split()) for i, name in enumerate(ADE20K_150, 1)}
    rows |= OFFICIAL_CSV_ROWS
    stuff = ",0" if "Stuff" in header else ""
    return header + "\n" + "".join(f"{i},0.0010,100,10{stuff},{rows[i]}\n" for i in range(1, 151))


@pytest.mark.parametrize("header", ["Idx,Ratio,Train,Val,Name", "Idx,Ratio,Train,Val,Stuff,Name"])
def test_ade150_official_csv_gives_whole_names_and_honest_seen_flags(tmp_path, header):
    raw = make_ade(tmp_path / "ade", class_files=())
    (raw / "ADEChallengeData2016" / "objectInfo150.csv").write_text(official_csv(header))
    coco = [n for v, n in enumerate(COCO_STUFF_182) if v not in COCO_STUFF_UNUSED]
    ds = prepare_dataset("ade20k-150", raw, tmp_path / "out", "val", train_vocabulary=coco)
    assert {i: ds.classes[i - 1] for i in OFFICIAL_NAMES} == OFFICIAL_NAMES
    assert ds.source["synonyms"][44] == ["chest of drawers", "chest", "bureau", "dresser"]
    flipped = ["pool table", "coffee table", "dirt track", "screen door", "swivel chair", "palm"]
    assert [ds.seen[ds.classes.index(n)] for n in flipped] == [False] * 6
    builtin = prepare_dataset("ade20k-150", make_ade(tmp_path / "plain", class_files=()), tmp_path / "plain-out",
                              "val", train_vocabulary=coco)
    assert (ds.classes, ds.seen) == (builtin.classes, builtin.seen)


def test_ade150_official_txt_class_file_and_built_in_list(tmp_path):
    raw = make_ade(tmp_path / "ade", class_files=())
    builtin = prepare_dataset("ade20k-150", raw, tmp_path / "builtin", "validation", train_vocabulary=["edifice"])
    assert builtin.num_classes == 150 and builtin.classes[:3] == ["wall", "building", "sky"]
    assert builtin.seen[:3] == [False, True, False] and sum(builtin.seen) == 1
    assert builtin.classes[-1] == "flag" and builtin.source["class_files"] == []
    # the challenge's objectInfo150.txt: tab-separated, ', ' synonyms, stray spaces ("22 \t", "bed ")
    rows = [f"{i}{' ' if i == 22 else ''}\t0.0010\t100\t10\t{name}{' ' if i == 8 else ''}\n"
            for i, name in enumerate(ADE20K_150, 1)]
    txt = raw / "ADEChallengeData2016" / "objectInfo150.txt"
    txt.write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(rows))
    ds = prepare_dataset("ade20k-150", raw, tmp_path / "out", "val", train_vocabulary=["individual"])
    assert ds.classes == builtin.classes and ds.seen[12] and sum(ds.seen) == 1  # person, individual, ...
    assert ds.source["class_files"] == [os.path.relpath(txt, tmp_path / "out")]
    np.testing.assert_array_equal(saved_label(ds, 0), ADE_EXPECTED)


@pytest.mark.parametrize("kind, row, problem", [
    ("txt", "21\t0.0098\t3164\t306\tauto, automobile, machine, motorcar\n", "line 22: .* is not class 21"),
    ("csv", "21,0.0098,3164,306,car;auto;automobile;machine\n", "line 22: .* is not class 21"),
])
def test_ade150_class_file_that_differs_from_the_official_list_is_an_error(tmp_path, kind, row, problem):
    raw = make_ade(tmp_path / "ade", class_files=())
    path = raw / "ADEChallengeData2016" / f"objectInfo150.{kind}"
    if kind == "csv":
        lines = official_csv().splitlines(keepends=True)
    else:
        lines = ["Idx\tRatio\tTrain\tVal\tName\n"] + [f"{i}\t0.1\t1\t1\t{n}\n" for i, n in enumerate(ADE20K_150, 1)]
    lines[21] = row
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=problem) as err:
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    assert err.value.path == path


def test_ade_explicit_class_file_and_class_files_of_two_lists(tmp_path):
    raw = make_ade(tmp_path / "world")
    (raw / "ADEChallengeData2016" / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n" + "".join(f"{i}\t0.1\t1\t1\t{n}\n" for i, n in enumerate(ADE20K_150, 1)))
    with pytest.raises(DataError, match="list different numbers of classes"):
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    ds = prepare_dataset("ade20k-150", raw, tmp_path / "out", "val",
                         class_file=raw / "ADEChallengeData2016" / "objectInfo4.txt")
    assert ds.num_classes == 4


@pytest.mark.parametrize("content, problem", [
    ("Idx\tRatio\tName\n1\t0.1\twall\n3\t0.1\tfloor\n", "Idx '3', expected 2"),
    ("Index\tRatio\tLabel\n1\t0.1\twall\n", "needs columns Idx and Name"),
    ("Idx\tRatio\tTrain\tVal\tName\n", "lists no classes"),
    ("Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\t , \n", "empty class name"),
    ("Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tfloor\n", "lists 2 classes but its name says 4"),
    (b"Idx\tName\n1\tw\xe4ll\n", "cannot be read as UTF-8"),
])
def test_malformed_class_file_is_an_error_naming_it(tmp_path, content, problem):
    raw = make_ade(tmp_path / "world", ("txt",))
    path = raw / "ADEChallengeData2016" / "objectInfo4.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=problem) as err:
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val")
    assert err.value.path == path


def test_missing_explicit_class_file_is_an_error_naming_it(tmp_path):
    raw = make_ade(tmp_path / "world")
    with pytest.raises(DataError, match="class file is missing") as err:
        prepare_dataset("ade20k-150", raw, tmp_path / "out", "val", class_file=tmp_path / "objectInfo150.txt")
    assert err.value.path == tmp_path / "objectInfo150.txt"


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


def test_ade847_raw_labels_keep_the_released_resolution(tmp_path):
    """Decided: the raw layout is read at the released size (detectron2's preparation resizes to a short side
    of 512, so scores differ slightly between the layouts; the source records which one a set is)."""
    raw_ids = np.full((600, 700), 2978)
    raw_ids[100:300, 200:500] = 312
    raw = make_ade847_raw(tmp_path / "ade", raw_ids)
    ds = prepare_dataset("ade20k-847", raw, tmp_path / "out", "val")
    label = saved_label(ds, 0)
    assert label.shape == (600, 700) and (label[100:300, 200:500] == 1).all() and (label[:100] == 0).all()
    assert "not resized" in ds.source["resolution"]
    d2 = prepare_dataset("ade20k-847", make_ade847_d2(tmp_path / "d2", np.zeros((2, 2))), tmp_path / "d2-out", "val")
    assert "512" in d2.source["resolution"]


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
