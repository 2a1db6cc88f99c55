"""Zero-shot classification probes: how well CLIP names whole scenes or masked crops.

Used to measure the masked-image domain gap (whole scenes vs masked crops, seen vs unseen nouns)
before and after fine-tuning / mask prompt tuning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..compute import autocast_off
from ..progress import Progress
from .models import ClipBundle
from .mpt import MaskPrompts, encode_masked
from .text import text_features


@dataclass
class ZeroShotResult:
    accuracy: float  # over all samples
    per_class: dict[str, float]  # accuracy per class, for classes that have samples
    counts: dict[str, int]  # samples per class
    correct: dict[str, int]  # correct predictions per class

    def subset_accuracy(self, names: Sequence[str]) -> float:
        """Sample-weighted accuracy over the samples whose class is in `names` (NaN if none)."""
        total = sum(self.counts.get(n, 0) for n in names)
        return sum(self.correct.get(n, 0) for n in names) / total if total else float("nan")

    def mean_class_accuracy(self) -> float:
        return sum(self.per_class.values()) / len(self.per_class) if self.per_class else float("nan")


@torch.no_grad()
def zero_shot_predict(
    bundle: ClipBundle,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    class_names: Sequence[str],
    prompts: MaskPrompts | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Predicted class index [N] for normalised images [N, 3, S, S] (masks [N, S, S] needed with prompts)."""
    classifier = text_features(bundle, list(class_names))
    predictions = []
    with Progress(images.shape[0], desc="zero-shot") as progress:
        for i in range(0, images.shape[0], batch_size):
            batch = images[i : i + batch_size].to(bundle.device)
            batch_masks = masks[i : i + batch_size].to(bundle.device) if masks is not None else None
            features = encode_masked(bundle, batch, batch_masks, prompts)
            with autocast_off(features.device):  # bf16 cosines would tie and flip near-equal classes
                predictions.append((features @ classifier.T).argmax(dim=1).cpu())
            progress.update(batch.shape[0])
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def zero_shot_accuracy(
    bundle: ClipBundle,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    labels: torch.Tensor,
    class_names: Sequence[str],
    prompts: MaskPrompts | None = None,
    batch_size: int = 128,
) -> ZeroShotResult:
    """Accuracy overall and per class of zero-shot predictions against `labels` [N] (indices into class_names)."""
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    correct_mask = zero_shot_predict(bundle, images, masks, class_names, prompts, batch_size) == labels.cpu()
    counts: dict[str, int] = {}
    correct: dict[str, int] = {}
    for k, name in enumerate(class_names):
        of_class = labels.cpu() == k
        if of_class.any():
            counts[name] = int(of_class.sum())
            correct[name] = int(correct_mask[of_class].sum())
    return ZeroShotResult(
        accuracy=float(correct_mask.float().mean()) if len(correct_mask) else float("nan"),
        per_class={n: correct[n] / counts[n] for n in counts},
        counts=counts,
        correct=correct,
    )
