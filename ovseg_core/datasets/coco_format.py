"""COCO file-format helpers shared by the COCO-Stuff and COCO Captions readers."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from ..errors import DataError, read_json_file

# The keys each reader relies on, per top-level list.
SEGMENTATION_SCHEMA: Mapping[str, Sequence[str]] = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("image_id", "category_id", "segmentation"),
    "categories": ("id", "name"),
}
CAPTION_SCHEMA: Mapping[str, Sequence[str]] = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "caption"),
}


def split_dir(split: str) -> str:
    """'train' → 'train2017'; a name that already carries its year is kept."""
    return split if split[-4:].isdigit() else f"{split}2017"


def load_coco_json(path: Path, schema: Mapping[str, Sequence[str]] = SEGMENTATION_SCHEMA) -> dict[str, Any]:
    """Read a COCO-format JSON file, or raise DataError naming it and what is wrong."""
    data = read_json_file(path, "annotation file")
    if not isinstance(data, dict):
        raise DataError(path, "annotation file must hold a JSON object")
    for key, entry_keys in schema.items():
        if not isinstance(data.get(key), list):
            raise DataError(path, f"annotation file lacks the list {key!r}")
        for i, entry in enumerate(data[key]):
            missing = [k for k in entry_keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DataError(path, f"{key}[{i}] lacks {missing}")
    return data


class Captions(NamedTuple):
    by_image: dict[str, list[str]]  # image file stem → captions, in file order
    file_names: dict[str, str]  # image file stem → file_name


def read_captions(path: Path) -> Captions:
    """Read COCO Captions (`captions_*.json`)."""
    data = load_coco_json(path, CAPTION_SCHEMA)
    stems = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
    captions: dict[str, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in stems:
            raise DataError(path, f"annotations[{i}] refers to unknown image id {ann['image_id']}")
        if not isinstance(ann["caption"], str):
            raise DataError(path, f"annotations[{i}] caption is not a string")
        captions.setdefault(stems[ann["image_id"]], []).append(ann["caption"].strip())
    return Captions(captions, {Path(img["file_name"]).stem: img["file_name"] for img in data["images"]})
