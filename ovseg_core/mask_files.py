"""Bring your own masks: a COCO-format RLE JSON (what SAM's automatic mask generator exports) as the mask
source of mining (`MiningConfig.masks: file`) and of `ovseg segment --masks`, instead of MaskFormer proposals.

Accepted layouts (one file for a whole image set):

- COCO: `{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "segmentation", ...}]}`;
- COCO results: `[{"image_id" or "file_name", "segmentation", ...}, ...]`;
- per image: `{"<file name or image id>": [{"segmentation", ...}, ...]}` — SAM's per-image lists gathered
  under their images' names (`amg.py --convert-to-rle` writes one such list per image).

`segmentation` is an RLE `{"size": [height, width], "counts": ...}`, compressed (a string, as
`pycocotools.mask.encode` and SAM write it) or uncompressed (a list of run lengths); pycocotools decodes
both. An image is found by its id, file name or file stem (numeric ids match COCO's zero-padded file
stems). Its masks are ordered best first by SAM's `predicted_iou`, then `stability_score` where present
(file order otherwise), so that `top_proposals` keeps the best; an image with no masks needs an empty list.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from .errors import DataError, read_json_file


def image_key(name: str | int) -> str:
    """The lookup key of an image id, file name or stem: numbers lose their zero padding."""
    text = str(name)
    return str(int(text)) if text.isdigit() else text


def _rank(annotation: dict[str, Any]) -> tuple[float, float]:
    return -float(annotation.get("predicted_iou", 0.0)), -float(annotation.get("stability_score", 0.0))


@dataclass(frozen=True)
class MaskFile:
    path: Path
    by_image: dict[str, list[dict[str, Any]]]  # image key → annotations, best first

    @classmethod
    def load(cls, path: str | Path) -> "MaskFile":
        path = Path(path)
        data = read_json_file(path, "mask file")
        grouped: dict[str, list[dict[str, Any]]] = {}
        for key, annotation in _annotations(path, data):
            grouped.setdefault(image_key(key), []).append(annotation)
        return cls(path, {k: sorted(v, key=_rank) for k, v in grouped.items()})

    def find(self, names: Iterable[str]) -> list[dict[str, Any]] | None:
        """The annotations of the first of `names` (id, file name, stem) that the file holds, else None."""
        for name in names:
            found = self.by_image.get(image_key(name))
            if found is not None:
                return found
        return None

    def masks(self, names: Sequence[str], height: int, width: int, limit: int | None = None) -> np.ndarray:
        """bool [N, height, width]: the (best `limit`) masks of the image called any of `names` (names[0] in
        errors)."""
        annotations = self.find(names)
        if annotations is None:
            raise DataError(self.path, f"no masks for image {names[0]} (an image without masks needs an empty list)")
        annotations = annotations[:limit]
        if not annotations:
            return np.zeros((0, height, width), dtype=bool)
        rles = []
        for i, annotation in enumerate(annotations):
            size = list(annotation["segmentation"]["size"])
            if size != [height, width]:
                raise DataError(self.path, f"image {names[0]}: mask {i} is an RLE of size {size[1]}x{size[0]} "
                                           f"(width x height) but the image is {width}x{height}")
            rles.append(_compressed(annotation["segmentation"], height, width))
        try:
            decoded = mask_utils.decode(rles)  # [H, W, N]
        except Exception as e:  # noqa: BLE001 - pycocotools raises bare Exceptions on bad counts
            raise DataError(self.path, f"image {names[0]}: an RLE fails to decode: {e}") from e
        return np.ascontiguousarray(decoded.transpose(2, 0, 1).astype(bool))


def _compressed(rle: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    return mask_utils.frPyObjects(rle, height, width) if isinstance(rle["counts"], list) else rle


def _annotations(path: Path, data: Any) -> Iterable[tuple[str | int, dict[str, Any]]]:
    """(image id or file name, annotation) of every annotation in one of the accepted layouts, each checked."""
    if isinstance(data, dict) and "annotations" in data:
        images = data.get("images") or []
        names = {img["id"]: img["file_name"] for img in images if "id" in img and "file_name" in img}
        items = [(names.get(a.get("image_id"), a.get("image_id")), a, f"annotations[{i}]")
                 for i, a in enumerate(data["annotations"])]
    elif isinstance(data, list):
        items = [(a.get("image_id", a.get("file_name")) if isinstance(a, dict) else None, a, f"[{i}]")
                 for i, a in enumerate(data)]
    elif isinstance(data, dict):
        items = []
        for key, annotations in data.items():
            if not isinstance(annotations, list):
                raise DataError(path, f"{key!r}: expected the image's list of mask annotations")
            items += [(key, a, f"{key!r}[{i}]") for i, a in enumerate(annotations)]
    else:
        raise DataError(path, "expected COCO annotations, a list of them, or {image: [annotations]}")
    for key, annotation, where in items:
        if key is None:
            raise DataError(path, f"{where}: names no image (image_id or file_name)")
        rle = annotation.get("segmentation") if isinstance(annotation, dict) else None
        if not (isinstance(rle, dict) and {"size", "counts"} <= rle.keys() and len(rle["size"]) == 2):
            raise DataError(path, f"{where}: segmentation must be an RLE {{size: [h, w], counts}} "
                                  "(polygons are not masks a mask generator writes)")
        yield (Path(key).name if isinstance(key, str) else key), annotation
