"""Indexable (image, label map) pairs for MaskFormer training, over a prepared dataset."""
from __future__ import annotations

import torch
from torch import Tensor

from ..datasets.prepared import DATASET_FILE, PreparedDataset
from ..errors import DataError


class SemanticDataset:
    """dataset[i] → (image uint8 [3, H, W], label int64 [H, W]) of a prepared dataset with labels."""

    def __init__(self, prepared: PreparedDataset):
        unlabeled = [s.id for s in prepared.samples if s.label is None]
        if unlabeled:
            raise DataError(prepared.root / DATASET_FILE,
                            f"{len(unlabeled)} samples have no label map (e.g. {unlabeled[:3]}); "
                            "MaskFormer trains on labeled data only")
        if len(prepared) == 0:
            raise DataError(prepared.root / DATASET_FILE, "no samples to train on")
        self.prepared = prepared

    @property
    def classes(self) -> list[str]:
        return self.prepared.classes

    @property
    def ignore_label(self) -> int:
        return self.prepared.ignore_label

    def __len__(self) -> int:
        return len(self.prepared)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = self.prepared.load_image(i)
        label = self.prepared.load_label(i)
        if image.shape[:2] != label.shape:
            raise DataError(self.prepared.root / self.prepared.samples[i].label,
                            f"label map {label.shape} does not match image {image.shape[:2]} "
                            f"({self.prepared.image_path(i)})")
        return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(), torch.from_numpy(label)
