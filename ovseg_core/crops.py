"""Masked crops: THE one way a mask proposal becomes a CLIP input (mining, training and inference).

Threshold the mask, drop empty ones, take the tight bounding box, resize the box to CLIP's input
size, and set every pixel outside the resized mask to CLIP's mean colour (exactly 0 after
normalisation). The binary mask at crop resolution is returned with the crop, so nothing ever has
to recover it from the fill colour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision.ops import roi_align


@dataclass
class MaskedCrops:
    crops: torch.Tensor  # [M, 3, S, S] float, CLIP-normalised; background exactly 0
    masks: torch.Tensor  # [M, S, S] bool, the mask at crop resolution
    keep: torch.Tensor  # [N] bool, which input masks survived thresholding (non-empty)
    boxes: torch.Tensor  # [M, 4] long, x0, y0, x1, y1 in input pixels, inclusive-exclusive

    @property
    def indices(self) -> torch.Tensor:
        """Index into the input masks of each crop."""
        return self.keep.nonzero().flatten()

    def __len__(self) -> int:
        return self.crops.shape[0]


def mask_boxes(binary: torch.Tensor) -> torch.Tensor:
    """Tight boxes [N, 4] (x0, y0, x1, y1; exclusive ends) of non-empty boolean masks [N, H, W]."""
    rows = binary.any(dim=2)  # [N, H]
    cols = binary.any(dim=1)  # [N, W]
    height, width = rows.shape[1], cols.shape[1]
    y0 = rows.int().argmax(dim=1)
    y1 = height - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = width - cols.flip(1).int().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def masked_crops(
    image: torch.Tensor,
    masks: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    threshold: float = 0.5,
) -> MaskedCrops:
    """Crop every mask of one image. image: [3, H, W] uint8 or float in 0..1; masks: [N, H, W]
    probabilities (foreground where > threshold) or bool."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"masked_crops: image must be [3, H, W], got {tuple(image.shape)}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
        expected = f"[N, {image.shape[1]}, {image.shape[2]}]"
        raise ValueError(f"masked_crops: masks must be {expected}, got {tuple(masks.shape)}")
    binary = masks if masks.dtype == torch.bool else masks > threshold
    keep = binary.flatten(1).any(dim=1)
    binary = binary[keep]
    num = binary.shape[0]
    if num == 0:  # on the image's device: mining concatenates these with other images' crops
        return MaskedCrops(
            crops=torch.zeros(0, 3, size, size, device=image.device),
            masks=torch.zeros(0, size, size, dtype=torch.bool, device=image.device),
            keep=keep,
            boxes=torch.zeros(0, 4, dtype=torch.long, device=image.device),
        )
    pixels = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    mean_t = torch.tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=image.device).view(3, 1, 1)
    normalised = (pixels - mean_t) / std_t
    boxes = mask_boxes(binary)
    # roi_align resamples every box in one call (bilinear, averaging several samples per output pixel
    # when shrinking); aligned=True puts pixel i's centre at i + 0.5, matching inclusive-exclusive boxes.
    rois = torch.cat([torch.arange(num, device=image.device).view(-1, 1).float(), boxes.float()], dim=1)
    image_rois = torch.cat([torch.zeros(num, 1, device=image.device), boxes.float()], dim=1)
    crops = roi_align(normalised[None], image_rois, output_size=size, sampling_ratio=-1, aligned=True)
    coverage = roi_align(binary[:, None].float(), rois, output_size=size, sampling_ratio=-1, aligned=True)[:, 0]
    # A crop pixel is foreground when the mask covers at least half of it; the most-covered pixel always
    # counts, so a thin mask cannot vanish when its box is shrunk.
    peak = coverage.flatten(1).amax(dim=1).view(-1, 1, 1)
    crop_masks = (coverage >= 0.5) | ((coverage >= peak) & (peak > 0))
    crops = crops * crop_masks[:, None]
    return MaskedCrops(crops=crops, masks=crop_masks, keep=keep, boxes=boxes.long())
