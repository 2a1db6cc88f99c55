"""Training augmentation of MaskFormer's semantic recipe: random resize, random crop, horizontal flip.

The short side is resized to crop_size × s, s ~ U(scale_range) (long side capped at 4 × crop_size),
a random crop_size window is cut, flipped left-right with probability 1/2, and padded on the
bottom/right with `pad_value` / the ignore label where the resized image is smaller than the crop.
Every random draw comes from the numpy Generator passed in, so equal generators give equal outputs.
(MaskFormer's optional SSD-style colour jitter, COLOR_AUG_SSD, is not implemented.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    pad_value: tuple[int, int, int] = (124, 116, 104)  # ImageNet mean: zero after normalisation
    max_long_side_factor: float = 4.0


def resize_pair(image: Tensor, label: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Bilinear (antialiased) resize of a uint8 image [3, H, W]; nearest for its label map [H, W]."""
    if (height, width) == tuple(image.shape[1:]):
        return image, label
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                            antialias=True)[0]
    resized = resized.round().clamp(0, 255).to(torch.uint8)
    lab = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0]
    return resized, lab.to(label.dtype)


def augment(image: Tensor, label: Tensor, cfg: AugmentConfig, ignore_label: int, rng: np.random.Generator
            ) -> tuple[Tensor, Tensor]:
    """image uint8 [3, H, W], label [H, W] → (image [3, c, c], label [c, c]) with c = cfg.crop_size."""
    if image.shape[1:] != label.shape:
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} sizes differ")
    c = cfg.crop_size
    h, w = label.shape
    short = c * rng.uniform(*cfg.scale_range)
    scale = min(short / min(h, w), cfg.max_long_side_factor * c / max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image, label = resize_pair(image, label, nh, nw)

    ch, cw = min(c, nh), min(c, nw)
    y0 = int(rng.integers(0, nh - ch + 1))
    x0 = int(rng.integers(0, nw - cw + 1))
    image, label = image[:, y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]
    if cfg.flip and rng.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)

    out_img = torch.tensor(cfg.pad_value, dtype=torch.uint8).view(3, 1, 1).repeat(1, c, c)
    out_lab = torch.full((c, c), ignore_label, dtype=label.dtype)
    out_img[:, :ch, :cw] = image
    out_lab[:ch, :cw] = label
    return out_img, out_lab
