"""COCO-Stuff readers: the official stuffthingmaps PNGs, or the official stuff + instances JSON files.

PNG: `<root>/stuffthingmaps_trainval2017/{split}2017/<id>.png` with values 0..181 (255 unlabeled); the 11
never-annotated thing ids are dropped, leaving 171 contiguous classes. Images `<root>/{split}2017/<id>.jpg`.
JSON: `<root>/annotations/stuff_{split}2017.json` and `instances_{split}2017.json` (category id = PNG value + 1).
The class list is the JSON's own categories sorted by id, so a JSON that holds only some categories (the
embedded world's seen classes) gives exactly those. Stuff is painted first, things on top; the stuff file's
catch-all "other" category and unannotated pixels are ignore. Crowd annotations (`iscrowd` 1) are not painted,
as in the official conversion to label maps (cocostuffapi's `cocoSegmentationToPng`, `includeCrowd=False`):
a crowd region keeps what the stuff file says there (usually "other", so ignore).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO

from ..errors import DataError
from .class_names import COCO_STUFF_182, COCO_STUFF_UNUSED
from .classes import ClassList
from .coco_format import load_coco_json, read_captions, split_dir
from .conversion import INVALID, Item, apply_lut, ignore_for, read_index_label, relative, require_dir, write_prepared
from .prepared import PreparedDataset

PNG_LAYOUT = ("<root>/stuffthingmaps_trainval2017/{train2017,val2017}/*.png (values 0..181, 255 unlabeled) "
              "and images <root>/{train2017,val2017}/*.jpg")
JSON_LAYOUT = ("<root>/annotations/{stuff,instances}_{train2017,val2017}.json (COCO format, RLE or polygon "
               "masks) and images <root>/{train2017,val2017}/<file_name>")
_OTHER = "other"  # COCO-Stuff's catch-all stuff category (id 183): annotated, but no class


def png_classes() -> ClassList:
    return ClassList.from_names((n for v, n in enumerate(COCO_STUFF_182) if v not in COCO_STUFF_UNUSED), None)


def png_lut() -> np.ndarray:
    lut = np.full(256, INVALID, dtype=np.int64)
    used = [v for v in range(len(COCO_STUFF_182)) if v not in COCO_STUFF_UNUSED]
    lut[used] = np.arange(len(used))
    lut[255] = 255
    return lut


def prepare_png(raw_root: Path, out_root: Path, split: str, *, name: str,
                train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None,
                captions: bool = False) -> PreparedDataset:
    if class_file is not None:
        raise ValueError(f"{name}: the 171 COCO-Stuff classes are fixed by the PNG values; no class file")
    raw_root, sdir = Path(raw_root), split_dir(split)
    label_dir = require_dir(raw_root / "stuffthingmaps_trainval2017" / sdir, PNG_LAYOUT)
    image_dir = require_dir(raw_root / sdir, PNG_LAYOUT)
    items = [Item(p.stem, p, label_dir / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]
    if not items:
        raise DataError(image_dir, f"no *.jpg images; expected layout: {PNG_LAYOUT}")
    lut = png_lut()

    def make_label(item: Item) -> np.ndarray:
        return apply_lut(read_index_label(item.label), lut, item.label,
                         "COCO-Stuff PNG values 0..181 without the unused ids, or 255")

    caps = read_captions(raw_root / "annotations" / f"captions_{sdir}.json").by_image if captions else None
    source = dict(reader="coco-stuff-png", layout=PNG_LAYOUT, split=sdir, raw_root=relative(raw_root, out_root))
    return write_prepared(out_root, name, png_classes(), train_vocabulary, items, make_label, source, caps)


def _coco_index(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def prepare_json(raw_root: Path, out_root: Path, split: str, *, name: str,
                 train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None,
                 captions: bool = False) -> PreparedDataset:
    if class_file is not None:
        raise ValueError(f"{name}: the class list comes from the JSON categories; no class file")
    raw_root, sdir = Path(raw_root), split_dir(split)
    ann_dir = require_dir(raw_root / "annotations", JSON_LAYOUT)
    image_dir = require_dir(raw_root / sdir, JSON_LAYOUT)
    stuff_path, things_path = ann_dir / f"stuff_{sdir}.json", ann_dir / f"instances_{sdir}.json"
    stuff, things = load_coco_json(stuff_path), load_coco_json(things_path)

    categories: dict[Any, str] = {}
    ignored: set[Any] = set()
    for path, data in ((stuff_path, stuff), (things_path, things)):
        for cat in data["categories"]:
            cid, cname = cat["id"], str(cat["name"])
            if path == stuff_path and cname == _OTHER:
                ignored.add(cid)
            elif categories.setdefault(cid, cname) != cname:
                raise DataError(path, f"category id {cid} is {cname!r} here but {categories[cid]!r} elsewhere")
    ids = sorted(categories)
    classes = ClassList.from_names((categories[i] for i in ids), None)
    ignore = ignore_for(len(classes))
    to_class = {cid: k for k, cid in enumerate(ids)} | {cid: ignore for cid in ignored}

    images: dict[Any, dict[str, Any]] = {}
    for path, data in ((things_path, things), (stuff_path, stuff)):
        for img in data["images"]:
            known = images.setdefault(img["id"], img)
            if known["file_name"] != img["file_name"]:
                raise DataError(path, f"image id {img['id']} is {img['file_name']!r} here but "
                                      f"{known['file_name']!r} in the other annotation file")
    if not images:
        raise DataError(things_path, "annotation file lists no images")
    indexes = [(stuff_path, _coco_index(stuff)), (things_path, _coco_index(things))]  # paint order
    for path, coco in indexes:
        for ann in coco.dataset["annotations"]:
            if ann["category_id"] not in to_class:
                raise DataError(path, f"annotation {ann.get('id')} has unknown category id {ann['category_id']}")
            if ann["image_id"] not in images:
                raise DataError(path, f"annotation {ann.get('id')} refers to unknown image id {ann['image_id']}")

    by_id = {Path(img["file_name"]).stem: iid for iid, img in images.items()}
    items = [Item(Path(img["file_name"]).stem, image_dir / img["file_name"], things_path)
             for _, img in sorted(images.items())]

    def make_label(item: Item) -> np.ndarray:
        iid = by_id[item.id]
        img = images[iid]
        label = np.full((int(img["height"]), int(img["width"])), ignore, dtype=np.int64)
        for path, coco in indexes:
            coco.imgs.setdefault(iid, img)  # annToMask reads the size from the file's own image entry
            for ann in coco.imgToAnns.get(iid, []):
                if ann.get("iscrowd"):
                    continue
                try:
                    mask = coco.annToMask(ann).astype(bool)
                except Exception as e:  # pycocotools raises bare Exception/TypeError for malformed masks
                    raise DataError(path, f"annotation {ann.get('id')}: malformed segmentation: {e}") from e
                if mask.shape != label.shape:
                    raise DataError(path, f"annotation {ann.get('id')}: mask is {mask.shape[1]}x{mask.shape[0]} "
                                          f"but image {img['file_name']} is {img['width']}x{img['height']}")
                label[mask] = to_class[ann["category_id"]]
        return label

    caps = read_captions(ann_dir / f"captions_{sdir}.json").by_image if captions else None
    source = dict(reader="coco-stuff-json", layout=JSON_LAYOUT, split=sdir, raw_root=relative(raw_root, out_root),
                  category_ids=ids, crowd="not painted (as cocostuffapi's includeCrowd=False)")
    return write_prepared(out_root, name, classes, train_vocabulary, items, make_label, source, caps)
