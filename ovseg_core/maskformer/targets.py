"""Semantic label map → MaskFormer targets (one binary mask and one class label per class present)."""
from __future__ import annotations

import torch
from torch import Tensor


def semantic_targets(label: Tensor, ignore_label: int) -> tuple[Tensor, Tensor]:
    """label [H, W] integer map → (masks [N, H, W] float 0/1, classes [N] int64), N = classes present.

    MaskFormer's semantic recipe: every class present in the map becomes one target mask; ignored
    pixels belong to no mask (they are background for every target), and the ignore label is no class.
    """
    if label.ndim != 2:
        raise ValueError(f"label map must be [H, W], got {tuple(label.shape)}")
    classes = torch.unique(label)
    classes = classes[classes != ignore_label].long()
    masks = (label[None] == classes[:, None, None]).float()
    return masks, classes
