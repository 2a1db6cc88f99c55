"""ADE20K readers.

ADE20K-150 (SceneParsing): `<root>/ADEChallengeData2016/{images,annotations}/{training,validation}/`,
`<id>.jpg` + `<id>.png` (uint8; 0 unlabeled, k = class k-1). The classes are the official 150-class list;
the class files found in the dataset directory (the challenge's `objectInfo150.txt`, the sceneparsing
repository's `objectInfo150.csv`) or given are checked against it. An ADE-layout set with another number K of
classes (the embedded world's held-out sets) names them in `objectInfo{K}.txt`, its `.csv` checked against that.

ADE20K-847 (ADE20K-Full): the detectron2-prepared layout `<root>/ADE20K_2021_17_01/images_detectron2/<split>/
<id>.jpg` + `annotations_detectron2/<split>/<id>.tif` (uint16 class ids, 65535 ignore), or the raw release
`<root>/ADE20K_2021_17_01/images/ADE/<split>/**/<id>.jpg` + `<id>_seg.png` whose object index is
R/10·256 + G (0 unlabeled), mapped to the 847-class subset; objects outside the subset are ignore. The raw
layout keeps the released resolution; detectron2's preparation resizes images (bilinear) and labels (nearest)
to a short side of 512, so scores on the two layouts differ slightly: use the detectron2 layout to compare
with published numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .class_names import ADE20K_150, ADE20K_847
from .classes import ClassList, read_object_info
from .conversion import (INVALID, Item, apply_lut, ignore_for, read_index_label, read_rgb_label, relative,
                         require_dir, write_prepared)
from .prepared import PreparedDataset

ADE150_LAYOUT = ("<root>/ADEChallengeData2016/images/{training,validation}/*.jpg, "
                 "<root>/ADEChallengeData2016/annotations/{training,validation}/*.png (0 unlabeled, k = class k-1), "
                 "class files objectInfo150.txt / objectInfo150.csv (optional; objectInfo{K}.txt for K classes)")
ADE847_D2_LAYOUT = ("<root>/ADE20K_2021_17_01/images_detectron2/{training,validation}/*.jpg and "
                    "annotations_detectron2/{training,validation}/*.tif (uint16, 65535 ignore)")
ADE847_RAW_LAYOUT = ("<root>/ADE20K_2021_17_01/images/ADE/{training,validation}/**/*.jpg with *_seg.png beside "
                     "each image (class index R/10*256 + G)")
LAYOUTS = ("auto", "detectron2", "raw")
RESOLUTION = {"detectron2": "as detectron2's preparation wrote it (short side resized to 512)",
              "raw": "as released (not resized to detectron2's short side of 512)"}
RAW_INDEX_LIMIT = 26 * 256  # R/10 ≤ 25 in *_seg.png


def ade_split(split: str) -> str:
    names = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
    if split not in names:
        raise ValueError(f"ADE20K split must be one of {sorted(names)}, not {split!r}")
    return names[split]


def find_class_files(raw_root: Path) -> list[Path]:
    """The ADE class files (objectInfo{K}.txt / .csv) in the dataset directory or beside it."""
    return sorted({p for d in (raw_root / "ADEChallengeData2016", raw_root) if d.is_dir()
                   for p in d.glob("objectInfo*") if p.suffix in (".csv", ".txt")})


def prepare_ade150(raw_root: Path, out_root: Path, split: str, *, name: str,
                   train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None) -> PreparedDataset:
    raw_root, sdir = Path(raw_root), ade_split(split)
    base = raw_root / "ADEChallengeData2016"
    image_dir = require_dir(base / "images" / sdir, ADE150_LAYOUT)
    label_dir = require_dir(base / "annotations" / sdir, ADE150_LAYOUT)
    class_files = [class_file] if class_file else find_class_files(raw_root)
    builtin = ClassList.from_names(ADE20K_150)
    classes = read_object_info(class_files, builtin) if class_files else builtin
    ignore = ignore_for(len(classes))
    lut = np.concatenate([[ignore], np.arange(len(classes))])
    items = [Item(p.stem, p, label_dir / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]
    if not items:
        raise DataError(image_dir, f"no *.jpg images; expected layout: {ADE150_LAYOUT}")

    def make_label(item: Item) -> np.ndarray:
        return apply_lut(read_index_label(item.label), lut, item.label, f"0..{len(classes)}, 0 unlabeled")

    source = dict(reader="ade20k-150", layout=ADE150_LAYOUT, split=sdir, raw_root=relative(raw_root, out_root),
                  class_files=[relative(p, out_root) for p in class_files])
    return write_prepared(out_root, name, classes, train_vocabulary, items, make_label, source)


def read_full_categories(path: Path) -> list[tuple[int, str]]:
    """An ADE20K-Full class mapping file: a JSON list of {"name", "id" (raw ADE object index), "trainId"},
    as in detectron2's ADE20K-Full preparation; returned as (raw id, name) in trainId order."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        rows = sorted((int(e["trainId"]), int(e["id"]), str(e["name"])) for e in entries)
    except FileNotFoundError as e:
        raise DataError(path, "class mapping file is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"class mapping file is not valid JSON: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(path, "class mapping file must be a list of {\"name\", \"id\", \"trainId\"} objects") from e
    if [r[0] for r in rows] != list(range(len(rows))) or not rows:
        raise DataError(path, "class mapping trainIds must be 0..K-1, each once")
    if any(not 0 < r[1] < RAW_INDEX_LIMIT for r in rows):
        raise DataError(path, f"raw ADE ids must lie in 1..{RAW_INDEX_LIMIT - 1} (R/10*256 + G of *_seg.png)")
    if len({r[1] for r in rows}) != len(rows):
        raise DataError(path, "class mapping lists a raw ADE id twice")
    return [(raw, cname) for _, raw, cname in rows]


def prepare_ade847(raw_root: Path, out_root: Path, split: str, *, name: str,
                   train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None,
                   layout: str = "auto") -> PreparedDataset:
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, not {layout!r}")
    raw_root, sdir = Path(raw_root), ade_split(split)
    base = raw_root / "ADE20K_2021_17_01"
    categories = read_full_categories(class_file) if class_file else list(ADE20K_847)
    classes = ClassList.from_names(n for _, n in categories)
    ignore = ignore_for(len(classes))
    d2_images = base / "images_detectron2" / sdir
    if layout == "auto":
        layout = "detectron2" if d2_images.is_dir() else "raw"
        expected = f"{ADE847_D2_LAYOUT}, or {ADE847_RAW_LAYOUT}"
    else:
        expected = ADE847_D2_LAYOUT if layout == "detectron2" else ADE847_RAW_LAYOUT
    if layout == "detectron2":
        image_dir = require_dir(d2_images, expected)
        label_dir = require_dir(base / "annotations_detectron2" / sdir, ADE847_D2_LAYOUT)
        items = [Item(p.stem, p, label_dir / f"{p.stem}.tif") for p in sorted(image_dir.glob("*.jpg"))]
        lut = np.full(65536, INVALID, dtype=np.int64)
        lut[: len(classes)] = np.arange(len(classes))
        lut[65535] = ignore

        def make_label(item: Item) -> np.ndarray:
            return apply_lut(read_index_label(item.label), lut, item.label, f"0..{len(classes) - 1} or 65535")
    else:
        image_dir = require_dir(base / "images" / "ADE" / sdir, expected)
        items = [Item(p.stem, p, p.with_name(f"{p.stem}_seg.png")) for p in sorted(image_dir.rglob("*.jpg"))]
        lut = np.full(RAW_INDEX_LIMIT, ignore, dtype=np.int64)  # every raw index is an object or unlabeled
        lut[[raw for raw, _ in categories]] = np.arange(len(categories))

        def make_label(item: Item) -> np.ndarray:
            rgb = read_rgb_label(item.label).astype(np.int64)
            return lut[rgb[..., 0] // 10 * 256 + rgb[..., 1]]
    if not items:
        raise DataError(image_dir, "no *.jpg images")
    source = dict(reader="ade20k-847", layout=ADE847_D2_LAYOUT if layout == "detectron2" else ADE847_RAW_LAYOUT,
                  split=sdir, raw_root=relative(raw_root, out_root),
                  class_file=relative(class_file, out_root) if class_file else None,
                  raw_ids=[raw for raw, _ in categories],
                  resolution=RESOLUTION[layout])
    return write_prepared(out_root, name, classes, train_vocabulary, items, make_label, source)
