"""Pascal Context readers (459 classes, and the 59-class subset).

Raw release: `<root>/VOCdevkit/VOC2010/JPEGImages/<id>.jpg` + `trainval/<id>.mat` (`LabelMap`: 0 unlabeled,
i = labels.txt id i) and the split list (`pascalcontext_<split>.txt`, `ImageSets/SegmentationContext/<split>.txt`
or `ImageSets/Main/<split>.txt`). PC-459: class = LabelMap − 1, ignore 65535. PC-59: the 59 classes of
`59_labels.txt`, in its line order (OVSeg's order); all else ignore 255.

The class names are the built-in lists (OVSeg's / detectron2's); the release's `labels.txt` and `59_labels.txt`,
when present, are checked against them. `59_labels.txt` spells three classes otherwise than `labels.txt`
(diningtable, bedcloth, clothes for table, bedclothes, cloth): they are the same classes.

detectron2-prepared: `annotations_detectron2/pc459_<split>/<id>.tif` (uint16 LabelMap − 1, 65535 ignore) or
`pc59_<split>/<id>.png` (uint8, 255 ignore), with images from `JPEGImages`. PC-59 PNGs exist in two id orders:
OVSeg's `prepare_pascal_context.py` writes the `59_labels.txt` order ("ovseg"), CAT-Seg's preparation the 59
classes sorted by their labels.txt id ("catseg"). The reader option `id_order` names it; it is checked against
`trainval/*.mat` or VOC's `SegmentationClass/*.png` of the same images where they exist.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy.io

from ..errors import DataError
from .class_names import PASCAL_CONTEXT_59, PASCAL_CONTEXT_459, VOC_20
from .classes import ClassList, read_name_list, read_numbered_labels
from .concepts import spelling
from .conversion import (INVALID, Item, apply_lut, ignore_for, read_index_label, read_split_list, relative,
                         require_dir, write_prepared)
from .prepared import PreparedDataset

ROOT = Path("VOCdevkit") / "VOC2010"
RAW_LAYOUT = ("<root>/VOCdevkit/VOC2010/{JPEGImages/*.jpg, trainval/*.mat (LabelMap), labels.txt, "
              "pascalcontext_<split>.txt | ImageSets/SegmentationContext/<split>.txt | ImageSets/Main/<split>.txt}")
D2_LAYOUT = ("<root>/VOCdevkit/VOC2010/{JPEGImages/*.jpg, annotations_detectron2/pc459_<split>/*.tif | "
             "annotations_detectron2/pc59_<split>/*.png}")
LAYOUTS = ("auto", "detectron2", "raw")
ID_ORDERS = ("ovseg", "catseg")
# 59_labels.txt's spelling → labels.txt's (and the built-in list's).
LABELS59_SPELLINGS = {"diningtable": "table", "bedcloth": "bedclothes", "clothes": "cloth"}
FULL_IDS = {spelling(n): i for i, n in enumerate(PASCAL_CONTEXT_459, start=1)}  # labels.txt id of each class
ORDER_CHECK_IMAGES = 20  # detectron2 PC-59 files compared with their reference annotation
ORDER_AGREEMENT = 0.5  # the share of labelled pixels the named id order must match


def read_label_map(path: Path) -> np.ndarray:
    """`LabelMap` of a Pascal Context .mat file (an integer array)."""
    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError as e:
        raise DataError(path, "annotation file is missing") from e
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError or NotImplementedError (v7.3)
        raise DataError(path, f"annotation file is not a readable .mat file: {e}") from e
    label = mat.get("LabelMap")
    if label is None:
        raise DataError(path, "annotation file lacks the variable LabelMap")
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise DataError(path, f"LabelMap must be a 2-D integer array, found {label.dtype} {label.shape}")
    return label


def check_full_labels(voc: Path, class_file: Path | None = None) -> Path | None:
    """Check `class_file`, else the dataset's labels.txt if present, against the built-in 459 classes (names
    compared letter by letter: the release writes "airconditioner"); returns the file checked."""
    path = class_file or voc / "labels.txt"
    if class_file is None and not path.exists():
        return None
    labels = read_numbered_labels(path)
    if sorted(labels) != list(range(1, len(PASCAL_CONTEXT_459) + 1)):
        raise DataError(path, f"label ids must be 1..{len(PASCAL_CONTEXT_459)}, each once")
    for i, name in enumerate(PASCAL_CONTEXT_459, start=1):
        if spelling(labels[i]) != spelling(name):
            raise DataError(path, f"id {i} is {labels[i]!r}, but class {i} of the Pascal Context list is {name!r}")
    return path


def check_59_labels(voc: Path, class_file: Path | None = None) -> Path | None:
    """Check `class_file`, else the dataset's 59_labels.txt if present, against the built-in 59 classes in
    order; returns the file checked."""
    path = class_file or voc / "59_labels.txt"
    if class_file is None and not path.exists():
        return None
    names = read_name_list(path)
    if len(names) != len(PASCAL_CONTEXT_59):
        raise DataError(path, f"lists {len(names)} classes, not the {len(PASCAL_CONTEXT_59)} of Pascal Context-59")
    for k, (name, expected) in enumerate(zip(names, PASCAL_CONTEXT_59), start=1):
        if LABELS59_SPELLINGS.get(spelling(name), spelling(name)) != spelling(expected):
            raise DataError(path, f"class {k} is {name!r}, but class {k} of Pascal Context-59 is {expected!r}")
    return path


def _items(voc: Path, split: str, subset: str, layout: str) -> tuple[list[Item], str]:
    """Samples and the layout used: detectron2 label files when present (or asked for), else .mat + split list."""
    d2_dir = voc / "annotations_detectron2" / f"{subset}_{split}"
    if layout == "auto":
        layout = "detectron2" if d2_dir.is_dir() else "raw"
    image_dir = voc / "JPEGImages"
    if layout == "detectron2":
        require_dir(image_dir, D2_LAYOUT)
        suffix = ".tif" if subset == "pc459" else ".png"
        labels = sorted(require_dir(d2_dir, D2_LAYOUT).glob(f"*{suffix}"))
        if not labels:
            raise DataError(d2_dir, f"no *{suffix} label files")
        return [Item(p.stem, image_dir / f"{p.stem}.jpg", p) for p in labels], layout
    require_dir(image_dir, RAW_LAYOUT)
    mat_dir = require_dir(voc / "trainval", RAW_LAYOUT)
    lists = [voc / f"pascalcontext_{split}.txt", voc / "ImageSets" / "SegmentationContext" / f"{split}.txt",
             voc / "ImageSets" / "Main" / f"{split}.txt"]
    split_list = next((p for p in lists if p.is_file()), None)
    if split_list is None:
        raise DataError(voc, f"no split list for {split!r}: expected one of {[str(p) for p in lists]}")
    return [Item(i, image_dir / f"{i}.jpg", mat_dir / f"{i}.mat") for i in read_split_list(split_list)], layout


# The lut for a set's detectron2 label files, with what the source records about it.
D2Lut = Callable[[list[Item], Path], tuple[np.ndarray, dict[str, Any]]]


def _prepare(raw_root: Path, out_root: Path, split: str, name: str, subset: str, layout: str,
             classes: ClassList, train_vocabulary: Sequence[str] | None, d2_lut: D2Lut,
             raw_lut: np.ndarray, class_files: list[Path | None]) -> PreparedDataset:
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, not {layout!r}")
    raw_root = Path(raw_root)
    voc = require_dir(raw_root / ROOT, f"{RAW_LAYOUT}, or {D2_LAYOUT}")
    items, layout = _items(voc, split, subset, layout)
    source = dict(reader=name, layout=D2_LAYOUT if layout == "detectron2" else RAW_LAYOUT, split=split,
                  raw_root=relative(raw_root, out_root),
                  class_files=[relative(p, out_root) for p in class_files if p is not None])
    if layout == "detectron2":
        lut, about = d2_lut(items, voc)
        source.update(about)
        read, expected = read_index_label, f"0..{len(classes) - 1} or {ignore_for(len(classes))}"
    else:
        lut, read, expected = raw_lut, read_label_map, f"LabelMap values 0..{len(raw_lut) - 1}"

    def make_label(item: Item) -> np.ndarray:
        return apply_lut(read(item.label), lut, item.label, expected)

    return write_prepared(out_root, name, classes, train_vocabulary, items, make_label, source)


def prepare_pc459(raw_root: Path, out_root: Path, split: str, *, name: str,
                  train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None,
                  layout: str = "auto") -> PreparedDataset:
    labels_path = check_full_labels(Path(raw_root) / ROOT, class_file)
    classes = ClassList.from_names(PASCAL_CONTEXT_459, None)
    k, ignore = len(classes), ignore_for(len(classes))
    d2_lut = np.full(65536, INVALID, dtype=np.int64)
    d2_lut[:k] = np.arange(k)
    d2_lut[65535] = ignore
    raw_lut = np.concatenate([[ignore], np.arange(k)])
    return _prepare(raw_root, out_root, split, name, "pc459", layout, classes, train_vocabulary,
                    lambda items, voc: (d2_lut, {}), raw_lut, [labels_path])


# ---------------------------------------------------------------- PC-59

def pc59_d2_ids(id_order: str) -> list[int]:
    """The class (index into the built-in 59, i.e. 59_labels.txt order) of each detectron2 PNG value."""
    if id_order == "catseg":
        return sorted(range(len(PASCAL_CONTEXT_59)), key=lambda k: FULL_IDS[spelling(PASCAL_CONTEXT_59[k])])
    return list(range(len(PASCAL_CONTEXT_59)))


def _d2_lut(id_order: str) -> np.ndarray:
    lut = np.full(256, INVALID, dtype=np.int64)
    lut[: len(PASCAL_CONTEXT_59)] = pc59_d2_ids(id_order)
    lut[255] = 255
    return lut


def _voc_lut() -> np.ndarray:
    """VOC SegmentationClass values → PC-59 class (VOC's diningtable is Pascal Context's table); background,
    void → 255 (no evidence about the order)."""
    pc59 = [spelling(n) for n in PASCAL_CONTEXT_59]
    lut = np.full(256, INVALID, dtype=np.int64)
    lut[0] = lut[255] = 255
    for v, voc_name in enumerate(VOC_20, start=1):
        lut[v] = pc59.index(LABELS59_SPELLINGS.get(spelling(voc_name), spelling(voc_name)))
    return lut


def _reference_label(voc: Path, image_id: str, raw_lut: np.ndarray) -> np.ndarray | None:
    """The PC-59 labels another annotation of the image implies: its .mat (all 59 classes), else VOC 2010's
    SegmentationClass PNG (VOC's 20 classes only); None without either."""
    mat = voc / "trainval" / f"{image_id}.mat"
    if mat.is_file():
        return apply_lut(read_label_map(mat), raw_lut, mat, f"LabelMap values 0..{len(raw_lut) - 1}")
    png = voc / "SegmentationClass" / f"{image_id}.png"
    if png.is_file():
        return apply_lut(read_index_label(png), _voc_lut(), png, "VOC values 0..20 or 255")
    return None


def _pc59_d2_lut(items: list[Item], voc: Path, raw_lut: np.ndarray, id_order: str | None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """The lut for detectron2 PC-59 PNGs in `id_order`, checked on up to ORDER_CHECK_IMAGES images against
    their reference annotation: a wrong or missing id_order is an error naming the order the files follow."""
    d2_dir = items[0].label.parent
    if id_order is None:
        raise DataError(d2_dir, "PC-59 detectron2 labels come in two id orders; set the reader option id_order: "
                                "'ovseg' (59_labels.txt order, OVSeg's prepare_pascal_context.py) or 'catseg' "
                                "(sorted by labels.txt id, CAT-Seg's preparation); see README 'Real data'")
    luts = {order: _d2_lut(order) for order in ID_ORDERS}
    agree = dict.fromkeys(ID_ORDERS, 0)
    labelled = images = 0
    for item in items:
        reference = _reference_label(voc, item.id, raw_lut)
        if reference is None:
            continue
        d2 = read_index_label(item.label)
        if d2.shape != reference.shape:
            raise DataError(item.label, f"label map is {d2.shape[1]}x{d2.shape[0]} but its reference annotation "
                                        f"is {reference.shape[1]}x{reference.shape[0]}")
        mask = reference != 255
        values = np.clip(d2[mask], 0, 255)  # out-of-range values fail the conversion itself, with their file
        for order, lut in luts.items():
            agree[order] += int((lut[values] == reference[mask]).sum())
        labelled += int(mask.sum())
        images += 1
        if images == ORDER_CHECK_IMAGES:
            break
    if not labelled:
        return luts[id_order], {"id_order": id_order, "id_order_check": "not checked: no trainval/*.mat or "
                                                                        "SegmentationClass/*.png for these images"}
    share = {order: n / labelled for order, n in agree.items()}
    found = max(share, key=share.get)
    report = ", ".join(f"{order} {share[order]:.0%}" for order in ID_ORDERS)
    if found != id_order or share[id_order] < ORDER_AGREEMENT:
        matches = f"follow the {found!r} order" if share[found] >= ORDER_AGREEMENT else "match neither order"
        raise DataError(d2_dir, f"id_order is {id_order!r}, but these labels {matches}: share of labelled pixels "
                                f"of {images} images that agree with their reference annotation: {report}")
    return luts[id_order], {"id_order": id_order, "id_order_check": f"{images} images against their .mat / "
                                                                    f"SegmentationClass labels: {report}"}


def prepare_pc59(raw_root: Path, out_root: Path, split: str, *, name: str,
                 train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None,
                 layout: str = "auto", id_order: str | None = None) -> PreparedDataset:
    if id_order is not None and id_order not in ID_ORDERS:
        raise ValueError(f"{name}: id_order must be one of {ID_ORDERS}, not {id_order!r}")
    voc = Path(raw_root) / ROOT
    subset_file = check_59_labels(voc, class_file)
    labels_path = check_full_labels(voc)
    classes = ClassList.from_names(PASCAL_CONTEXT_59, None)
    k, ignore = len(classes), ignore_for(len(classes))
    raw_lut = np.full(len(PASCAL_CONTEXT_459) + 1, ignore, dtype=np.int64)
    raw_lut[[FULL_IDS[spelling(n)] for n in PASCAL_CONTEXT_59]] = np.arange(k)
    return _prepare(raw_root, out_root, split, name, "pc59", layout, classes, train_vocabulary,
                    lambda items, d2_voc: _pc59_d2_lut(items, d2_voc, raw_lut, id_order), raw_lut,
                    [subset_file, labels_path])
