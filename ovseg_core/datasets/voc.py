"""Pascal VOC 2012 segmentation (20 classes): `<root>/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg,
SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt}`. The label PNGs are palette images whose
indices are 0 background, 1..20 the classes, 255 void; background and void become ignore (255)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .class_names import VOC_20
from .classes import ClassList
from .conversion import (INVALID, Item, apply_lut, read_index_label, read_split_list, relative, require_dir,
                         write_prepared)
from .prepared import PreparedDataset

LAYOUT = ("<root>/VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png (palette: 0 background, "
          "1..20 classes, 255 void), ImageSets/Segmentation/{train,val,trainval}.txt}")


def prepare_voc20(raw_root: Path, out_root: Path, split: str, *, name: str,
                  train_vocabulary: Sequence[str] | None = None, class_file: Path | None = None) -> PreparedDataset:
    if class_file is not None:
        raise ValueError(f"{name}: the 20 VOC classes are fixed by the label values; no class file")
    raw_root = Path(raw_root)
    voc = require_dir(raw_root / "VOCdevkit" / "VOC2012", LAYOUT)
    image_dir = require_dir(voc / "JPEGImages", LAYOUT)
    label_dir = require_dir(voc / "SegmentationClass", LAYOUT)
    ids = read_split_list(voc / "ImageSets" / "Segmentation" / f"{split}.txt")
    items = [Item(i, image_dir / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]
    lut = np.full(256, INVALID, dtype=np.int64)
    lut[0] = lut[255] = 255
    lut[1 : len(VOC_20) + 1] = np.arange(len(VOC_20))

    def make_label(item: Item) -> np.ndarray:
        return apply_lut(read_index_label(item.label), lut, item.label, "0..20 or 255")

    source = dict(reader="voc-20", layout=LAYOUT, split=split, raw_root=relative(raw_root, out_root))
    return write_prepared(out_root, name, ClassList.from_names(VOC_20, None), train_vocabulary, items, make_label,
                          source)
