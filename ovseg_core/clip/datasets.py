"""Image–caption pairs of a prepared caption set, as CLIP training samples.

Item i is one (image, caption) pair: the pairs are enumerated image by image, caption by caption, so
`train_clip`'s seeded `batch_order` shows every caption of every image once per epoch, and which
caption goes with an image in which batch is a function of (seed, step) alone (resumable).
Images are decoded once, brought to the model's resolution with CLIP's evaluation preprocessing
(bicubic resize of the shorter side, centre crop) and kept as uint8; normalisation happens per item.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from ..crops import masked_crops
from ..datasets.prepared import CAPTIONS_FILE, DATASET_FILE, PreparedDataset
from ..errors import DataError
from ..progress import track
from .models import ClipBundle


def clip_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [3, size, size] from an RGB uint8 [H, W, 3] image: CLIP's resize + centre crop, no normalisation."""
    if image.shape[0] == size and image.shape[1] == size:
        return torch.tensor(image).permute(2, 0, 1).contiguous()  # a copy: decoded images are read-only
    pil = Image.fromarray(image)
    pil = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(pil))
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP-normalised float from uint8 [..., 3, H, W] pixels."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


class CaptionImageDataset(torch.utils.data.Dataset):
    """Every (image, caption) pair of a prepared dataset with captions; item = (image, None, caption).

    `captions_per_image` keeps only each image's first k captions (None: all of them).
    """

    def __init__(
        self,
        prepared: PreparedDataset,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        captions_per_image: int | None = None,
    ):
        if captions_per_image is not None and captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1 or None, got {captions_per_image}")
        by_image = prepared.captions()
        index_of = {s.id: i for i, s in enumerate(prepared.samples)}
        unknown = sorted(set(by_image) - set(index_of))[:5]
        if unknown:
            raise DataError(prepared.root / CAPTIONS_FILE, f"captions for images not in the dataset: {unknown}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        used = [i for i, s in enumerate(prepared.samples) if by_image.get(s.id)]
        if not used:
            raise DataError(prepared.root / CAPTIONS_FILE, "no image has a caption")
        self.pixels = torch.stack([
            clip_pixels(prepared.load_image(i), image_size)
            for i in track(used, total=len(used), desc=f"load {prepared.name}")
        ])
        self.pairs: list[tuple[int, str]] = [
            (row, caption)
            for row, i in enumerate(used)
            for caption in by_image[prepared.samples[i].id][:captions_per_image]
        ]

    @classmethod
    def for_model(
        cls, prepared: PreparedDataset, bundle: ClipBundle, captions_per_image: int | None = None
    ) -> "CaptionImageDataset":
        return cls(prepared, bundle.image_size, bundle.mean, bundle.std, captions_per_image)

    @property
    def num_images(self) -> int:
        return self.pixels.shape[0]

    def __len__(self) -> int:
        return len(self.pairs)

    def text(self, index: int) -> str:
        return self.pairs[index][1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, None, str]:
        row, caption = self.pairs[index]
        return normalise(self.pixels[row], self.mean, self.std), None, caption


@dataclass
class SegmentProbe:
    """Zero-shot probe inputs cut from a labelled prepared set (CLIP-normalised, model resolution).

    scenes: each whole image, labelled with the class covering most of its labelled pixels;
    boxes / masked: every class region of at least `min_fraction` of its image, as the tight box around it
    with the surroundings kept, and as the masked crop CLIP sees in OVSeg (background = mean colour).
    """

    classes: list[str]
    seen: list[bool]
    scenes: torch.Tensor  # [N, 3, S, S]
    scene_labels: torch.Tensor  # [N]
    boxes: torch.Tensor  # [M, 3, S, S]
    masked: torch.Tensor  # [M, 3, S, S]
    masks: torch.Tensor  # [M, S, S] bool, the masked crops' masks (for mask prompts)
    segment_labels: torch.Tensor  # [M]

    def names(self, seen: bool) -> list[str]:
        return [c for c, s in zip(self.classes, self.seen) if s == seen]


def segment_probe(
    prepared: PreparedDataset,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_images: int | None = None,
    min_fraction: float = 0.01,
) -> SegmentProbe:
    """Build a `SegmentProbe` from the first `max_images` labelled samples of `prepared`."""
    indices = [i for i, s in enumerate(prepared.samples) if s.label is not None][:max_images]
    if not indices:
        raise DataError(prepared.root / DATASET_FILE, "no labelled samples to probe CLIP with")
    scenes, scene_labels, boxes, masked, masks, labels = [], [], [], [], [], []
    for i in track(indices, total=len(indices), desc=f"probe {prepared.name}"):
        image, label = prepared.load_image(i), torch.from_numpy(prepared.load_label(i))
        if label.shape != image.shape[:2]:
            raise DataError(prepared.root / prepared.samples[i].label,
                            f"label map is {tuple(label.shape)}, its image {image.shape[:2]}")
        counts = torch.bincount(label[label != prepared.ignore_label].flatten(), minlength=prepared.num_classes)
        if counts.sum() == 0:
            continue
        scenes.append(normalise(clip_pixels(image, image_size), mean, std))
        scene_labels.append(int(counts.argmax()))
        present = (counts >= max(1.0, min_fraction * label.numel())).nonzero().flatten()
        if len(present) == 0:
            continue
        region = label[None] == present[:, None, None]
        pixels = torch.tensor(image).permute(2, 0, 1)
        cut = masked_crops(pixels, region, image_size, mean, std)
        box = torch.zeros_like(region)
        for k, (x0, y0, x1, y1) in enumerate(cut.boxes.tolist()):
            box[k, y0:y1, x0:x1] = True  # a full box as the "mask": the crop keeps the object's surroundings
        boxes.append(masked_crops(pixels, box, image_size, mean, std).crops)
        masked.append(cut.crops)
        masks.append(cut.masks)
        labels.append(present[cut.indices])
    if not scenes:
        raise DataError(prepared.root / DATASET_FILE, "every probed label map is entirely ignore")
    empty = torch.zeros(0, 3, image_size, image_size)
    return SegmentProbe(
        classes=list(prepared.classes),
        seen=list(prepared.seen),
        scenes=torch.stack(scenes),
        scene_labels=torch.tensor(scene_labels),
        boxes=torch.cat(boxes) if boxes else empty,
        masked=torch.cat(masked) if masked else empty,
        masks=torch.cat(masks) if masks else torch.zeros(0, image_size, image_size, dtype=torch.bool),
        segment_labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
    )
