"""Mined (masked crop, mask, noun) pairs as CLIP training samples."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..shards import PairDataset
from .datasets import clip_pixels, normalise


class MinedPairSamples(torch.utils.data.Dataset):
    """Item i = (CLIP-normalised crop [3, S, S], mask [S, S] bool, noun), read by random access.

    The crops were made by `masked_crops` at mining time (background already the mean colour), so
    training sees exactly what inference does; they are only resized if CLIP's resolution differs.
    """

    def __init__(self, pairs_dir: str | Path, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.pairs = PairDataset(pairs_dir)
        self.image_size = image_size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.pairs)

    def text(self, index: int) -> str:
        return self.pairs.noun(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        crop, mask, noun, _ = self.pairs[index]
        pixels = normalise(clip_pixels(crop, self.image_size), self.mean, self.std)
        mask_t = torch.from_numpy(mask)
        if mask_t.shape != (self.image_size, self.image_size):
            mask_t = F.interpolate(mask_t[None, None].float(), size=(self.image_size, self.image_size),
                                   mode="nearest")[0, 0] > 0.5
        return pixels, mask_t, noun
