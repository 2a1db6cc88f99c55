"""COCO Captions: `<root>/annotations/captions_{split}2017.json` attached to a COCO split as `captions.json`.

The labels come from either COCO-Stuff reader (`labels="json"` or `"png"`), or there are none (`"none"`, the
default: a caption-only set of images, all the caption-mining stage needs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .classes import ClassList
from .coco_format import read_captions, split_dir
from .coco_stuff import prepare_json, prepare_png
from .conversion import Item, relative, require_dir, write_prepared
from .prepared import PreparedDataset

LAYOUT = "<root>/annotations/captions_{train2017,val2017}.json and images <root>/{train2017,val2017}/<file_name>"
LABEL_SOURCES = ("json", "png", "none")


def prepare(raw_root: Path, out_root: Path, split: str, *, name: str,
            train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None,
            labels: str = "none") -> PreparedDataset:
    if labels == "json":
        return prepare_json(raw_root, out_root, split, name=name, train_vocabulary=train_vocabulary,
                            class_file=class_file, captions=True)
    if labels == "png":
        return prepare_png(raw_root, out_root, split, name=name, train_vocabulary=train_vocabulary,
                           class_file=class_file, captions=True)
    if labels != "none":
        raise ValueError(f"{name}: labels must be one of {LABEL_SOURCES}, not {labels!r}")
    raw_root, sdir = Path(raw_root), split_dir(split)
    require_dir(raw_root / "annotations", LAYOUT)
    image_dir = require_dir(raw_root / sdir, LAYOUT)
    path = raw_root / "annotations" / f"captions_{sdir}.json"
    captions = read_captions(path)
    if not captions.by_image:
        raise DataError(path, "caption file holds no captions")
    items = [Item(stem, image_dir / captions.file_names[stem], None) for stem in sorted(captions.by_image)]
    source = dict(reader="coco-captions", layout=LAYOUT, split=sdir, raw_root=relative(raw_root, out_root))
    return write_prepared(out_root, name, ClassList(()), train_vocabulary, items, None, source,
                          captions.by_image)
