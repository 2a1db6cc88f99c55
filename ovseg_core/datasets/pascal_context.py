"""Pascal Context readers (459 classes, and the 59-class subset).

Raw release: `<root>/VOCdevkit/VOC2010/JPEGImages/<id>.jpg` + `trainval/<id>.mat` (`LabelMap`: 0 unlabeled,
i = labels.txt id i), the class list `labels.txt` (`id: name`; the official list is built in when it is
absent) and the split list (`pascalcontext_<split>.txt`, `ImageSets/SegmentationContext/<split>.txt` or
`ImageSets/Main/<split>.txt`). PC-459: class = LabelMap − 1, ignore 65535. PC-59: the 59 names
(`59_labels.txt`, in its line order, or the built-in list) looked up in labels.txt; all else ignore 255.
detectron2-prepared: `annotations_detectron2/pc459_<split>/<id>.tif` (uint16, 65535 ignore) or
`pc59_<split>/<id>.png` (uint8, 255 ignore), with images from `JPEGImages`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.io

from ..errors import DataError
from .class_names import PASCAL_CONTEXT_59, PASCAL_CONTEXT_459
from .classes import ClassList, read_name_list, read_numbered_labels
from .conversion import (INVALID, Item, apply_lut, ignore_for, read_index_label, read_split_list, relative,
                         require_dir, write_prepared)
from .prepared import PreparedDataset

ROOT = Path("VOCdevkit") / "VOC2010"
RAW_LAYOUT = ("<root>/VOCdevkit/VOC2010/{JPEGImages/*.jpg, trainval/*.mat (LabelMap), labels.txt, "
              "pascalcontext_<split>.txt | ImageSets/SegmentationContext/<split>.txt | ImageSets/Main/<split>.txt}")
D2_LAYOUT = ("<root>/VOCdevkit/VOC2010/{JPEGImages/*.jpg, annotations_detectron2/pc459_<split>/*.tif | "
             "annotations_detectron2/pc59_<split>/*.png}")
LAYOUTS = ("auto", "detectron2", "raw")


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


def full_labels(voc: Path, class_file: Path | None = None) -> tuple[list[str], Path | None]:
    """The full class list in id order (LabelMap value i = names[i-1]) and the file it came from: `class_file`,
    else the dataset's labels.txt, else the built-in copy of it."""
    path = class_file or voc / "labels.txt"
    if class_file is None and not path.exists():
        return list(PASCAL_CONTEXT_459), None
    labels = read_numbered_labels(path)
    if sorted(labels) != list(range(1, len(labels) + 1)):
        raise DataError(path, "label ids must be 1..K, each once")
    return [labels[i] for i in range(1, len(labels) + 1)], path


def _squash(name: str) -> str:
    return name.lower().replace(" ", "")  # "potted plant" and "pottedplant" name the same class


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


def _prepare(raw_root: Path, out_root: Path, split: str, name: str, subset: str, layout: str,
             classes: ClassList, train_vocabulary: Sequence[str] | None, d2_lut: np.ndarray,
             raw_lut: np.ndarray, class_files: list[Path | None]) -> PreparedDataset:
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, not {layout!r}")
    raw_root = Path(raw_root)
    voc = require_dir(raw_root / ROOT, f"{RAW_LAYOUT}, or {D2_LAYOUT}")
    items, layout = _items(voc, split, subset, layout)
    lut, read = (d2_lut, read_index_label) if layout == "detectron2" else (raw_lut, read_label_map)
    expected = (f"0..{len(classes) - 1} or {ignore_for(len(classes))}" if layout == "detectron2"
                else f"LabelMap values 0..{len(raw_lut) - 1}")

    def make_label(item: Item) -> np.ndarray:
        return apply_lut(read(item.label), lut, item.label, expected)

    source = dict(reader=name, layout=D2_LAYOUT if layout == "detectron2" else RAW_LAYOUT, split=split,
                  raw_root=relative(raw_root, out_root),
                  class_files=[relative(p, out_root) for p in class_files if p is not None])
    return write_prepared(out_root, name, classes, train_vocabulary, items, make_label, source)


def prepare_pc459(raw_root: Path, out_root: Path, split: str, *, name: str,
                  train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None,
                  layout: str = "auto") -> PreparedDataset:
    names, labels_path = full_labels(Path(raw_root) / ROOT, class_file)
    classes = ClassList.from_names(names, None)
    k, ignore = len(classes), ignore_for(len(classes))
    d2_lut = np.full(65536, INVALID, dtype=np.int64)
    d2_lut[:k] = np.arange(k)
    d2_lut[65535] = ignore
    raw_lut = np.concatenate([[ignore], np.arange(k)])
    return _prepare(raw_root, out_root, split, name, "pc459", layout, classes, train_vocabulary, d2_lut, raw_lut,
                    [labels_path])


def prepare_pc59(raw_root: Path, out_root: Path, split: str, *, name: str,
                 train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None,
                 layout: str = "auto") -> PreparedDataset:
    voc = Path(raw_root) / ROOT
    subset_file = class_file or voc / "59_labels.txt"  # a 59_labels.txt-style file replaces the dataset's own
    if class_file is None and not subset_file.exists():
        subset_file = None
    subset_names = read_name_list(subset_file) if subset_file else list(PASCAL_CONTEXT_59)
    names, labels_path = full_labels(voc)
    ids = {_squash(n): i for i, n in enumerate(names, start=1)}
    missing = [n for n in subset_names if _squash(n) not in ids]
    if missing:
        raise DataError(subset_file or labels_path or voc,
                        f"classes {missing} are not in the Pascal Context label list")
    classes = ClassList.from_names(subset_names, None)
    k, ignore = len(classes), ignore_for(len(classes))
    d2_lut = np.full(max(256, ignore + 1), INVALID, dtype=np.int64)
    d2_lut[:k] = np.arange(k)
    d2_lut[ignore] = ignore
    raw_lut = np.full(len(names) + 1, ignore, dtype=np.int64)
    raw_lut[[ids[_squash(n)] for n in subset_names]] = np.arange(k)
    return _prepare(raw_root, out_root, split, name, "pc59", layout, classes, train_vocabulary, d2_lut, raw_lut,
                    [subset_file, labels_path])
