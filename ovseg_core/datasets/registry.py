"""One registry of dataset readers: name → reader of an official layout, converting to the prepared form."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import ade, captioned, coco_captions, coco_stuff, pascal_context, voc
from .prepared import PreparedDataset

Reader = Callable[..., PreparedDataset]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    reader: Reader
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)  # reader options a caller may set, with defaults


_SPECS = (
    DatasetSpec("coco-stuff-171", coco_stuff.prepare_png,
                f"COCO-Stuff-171 from the stuffthingmaps PNGs: {coco_stuff.PNG_LAYOUT}", {"captions": False}),
    DatasetSpec("coco-stuff-171-json", coco_stuff.prepare_json,
                f"COCO-Stuff from the stuff + instances JSON (classes = the JSON's categories): "
                f"{coco_stuff.JSON_LAYOUT}", {"captions": False}),
    DatasetSpec("coco-captions", coco_captions.prepare,
                f"COCO Captions of a COCO split, caption-only or with labels (option labels: none, json or png): "
                f"{coco_captions.LAYOUT}",
                {"labels": "none"}),
    DatasetSpec("ade20k-150", ade.prepare_ade150,
                f"ADE20K-150, or any ADE-layout set with its objectInfo class file: {ade.ADE150_LAYOUT}"),
    DatasetSpec("ade20k-847", ade.prepare_ade847,
                f"ADE20K-Full 847 classes: {ade.ADE847_D2_LAYOUT}; or {ade.ADE847_RAW_LAYOUT}", {"layout": "auto"}),
    DatasetSpec("pascal-context-59", pascal_context.prepare_pc59,
                f"Pascal Context 59: {pascal_context.RAW_LAYOUT}; or {pascal_context.D2_LAYOUT} (option id_order: "
                f"ovseg or catseg, the id order of detectron2 PC-59 files)", {"layout": "auto", "id_order": None}),
    DatasetSpec("pascal-context-459", pascal_context.prepare_pc459,
                f"Pascal Context 459: {pascal_context.RAW_LAYOUT}; or {pascal_context.D2_LAYOUT}", {"layout": "auto"}),
    DatasetSpec("voc-20", voc.prepare_voc20, f"Pascal VOC 2012, 20 classes: {voc.LAYOUT}"),
    DatasetSpec("webdataset-captions", captioned.prepare_webdataset,
                f"your own captioned images as img2dataset writes them (caption-only): {captioned.WDS_LAYOUT}"),
    DatasetSpec("caption-folder", captioned.prepare_folder,
                f"your own images with sidecar .txt captions (caption-only): {captioned.FOLDER_LAYOUT}"),
)
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


def prepare_dataset(
    name: str,
    raw_root: Path,
    out_root: Path,
    split: str,
    train_vocabulary: list[str] | None = None,
    class_file: Path | None = None,
    options: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
) -> PreparedDataset:
    """Convert the official layout under `raw_root` into a prepared dataset at `out_root` (replaced atomically).

    `train_vocabulary`: the proposal network's training class names, for the seen flags of an evaluation set
    (matched by concept, see `concepts`); leave it out for a training set (all its classes are seen).
    `class_file`: the data set's official class file where it is not in the dataset directory (ADE
    objectInfo .txt/.csv, Pascal labels.txt / 59_labels.txt), checked against the built-in list; or an ADE-847
    JSON mapping, which replaces it. `options`: the reader options listed in DATASETS[name].options.
    `dataset_name`: the name recorded in dataset.json (default: the reader's name), e.g. "world-eval" for an
    ADE-layout set.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    unknown = sorted(set(options or {}) - set(spec.options))
    if unknown:
        raise ValueError(f"{name}: unknown options {unknown}; it takes {sorted(spec.options) or 'none'}")
    vocabulary: Sequence[str] | None = list(train_vocabulary) if train_vocabulary is not None else None
    return spec.reader(Path(raw_root), Path(out_root), split, name=dataset_name or name, train_vocabulary=vocabulary,
                       class_file=Path(class_file) if class_file is not None else None,
                       **{**spec.options, **(options or {})})
