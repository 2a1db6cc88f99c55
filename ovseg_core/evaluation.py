"""Zero-shot evaluation of a (MaskFormer, adapted CLIP) pair: several branches from one set of computations.

Per image, the two expensive steps run once: MaskFormer's proposals (mask logits, p_mf; `batch_images`
equal-sized images share one forward pass) and CLIP's scores of the masked crops at the crop threshold.
Every branch is then a cheap combination of them:

- `maskformer`: MaskFormer alone, p_mf over all proposals (what `inference.segment` does without CLIP);
- `clip`: CLIP alone, λ = 1 (p_mf^0 · p_clip^1 = p_clip on the masks that have a crop);
- `ensemble`: p_mf^(1−λ) · p_clip^λ, optionally zsseg's seen/unseen variant.

Each branch's label map equals `inference.segment` run for that branch alone (tested). A λ × mask
threshold sweep reuses the proposals for every cell and CLIP's crop scores for every λ of one
threshold. Results are pixel confusion matrices, which add up, so a dataset can be split into chunks
of images evaluated anywhere and merged (`merge`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from .clip.adapted import AdaptedClip
from .clip.text import VILD_TEMPLATES, text_features
from .compute import CPU_FP32, Placement
from .datasets.prepared import PreparedDataset
from .loading import data_loader
from .inference import (ClipBranch, ClipScores, Proposals, batch_proposals, classify_proposals, combine_scores,
                        proposals, semantic_map)
from .maskformer.model import OpenVocabMaskFormer
from .metrics import ConfusionMatrix, SegmentationMetrics, bootstrap_se
from .progress import Progress

BRANCHES: tuple[str, ...] = ("maskformer", "clip", "ensemble")
PROPOSAL_STEP, CLIP_STEP = "proposals", "crop_scores"  # keys of the shared steps in `BranchResult.seconds`


@dataclass
class BranchSegmenter:
    """A proposal network and a CLIP branch sharing one vocabulary (the dataset's classes), on one
    device and precision (both models must be on `placement.device`)."""

    model: OpenVocabMaskFormer
    clip: ClipBranch
    size: int | None = None  # short side for proposals (None: the model's crop size)
    mode: Literal["resize", "slide"] = "resize"
    placement: Placement = CPU_FP32

    @classmethod
    def build(cls, model: OpenVocabMaskFormer, adapted: AdaptedClip, class_names: Sequence[str], threshold: float,
              size: int | None = None, mode: Literal["resize", "slide"] = "resize",
              placement: Placement = CPU_FP32) -> "BranchSegmenter":
        """Encode `class_names` with the adapted CLIP's text tower over the ViLD templates and give that
        vocabulary to both the model and the CLIP branch. The text tower is frozen in every adaptation,
        so these features live in the space the proposal network was trained against."""
        bundle = adapted.bundle
        with placement.autocast():
            text = text_features(bundle, list(class_names), VILD_TEMPLATES)
        model.set_vocabulary(text)
        branch = ClipBranch(encode=adapted.encoder(), text_features=text, size=bundle.image_size, mean=bundle.mean,
                            std=bundle.std, threshold=threshold, logit_scale=adapted.logit_scale)
        return cls(model, branch, size, mode, placement)

    def proposals(self, images: Sequence[np.ndarray | Tensor]) -> list[Proposals]:
        """The proposals of each image; in mode "resize" images of equal size share a forward pass (equal to
        one image at a time up to float rounding)."""
        with self.placement.autocast():
            if self.mode == "resize":
                return batch_proposals(self.model, images, size=self.size)
            return [proposals(self.model, image, size=self.size, mode=self.mode) for image in images]

    def clip_scores(self, image: np.ndarray | Tensor, props: Proposals, threshold: float | None = None) -> ClipScores:
        c = self.clip if threshold is None else replace(self.clip, threshold=threshold)
        with self.placement.autocast():
            return classify_proposals(image, props.mask_logits.sigmoid(), c.encode, c.text_features, c.size, c.mean,
                                      c.std, c.threshold, c.logit_scale)


class LabelledImages(torch.utils.data.Dataset):
    """Item k: (index, RGB uint8 image [H, W, 3], ground truth [H, W]) of sample `indices[k]`."""

    def __init__(self, dataset: PreparedDataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, np.ndarray, np.ndarray]:
        i = self.indices[k]
        return i, self.dataset.load_image(i), self.dataset.load_label(i)


def labelled_images(dataset: PreparedDataset, indices: Sequence[int], workers: int, batch_images: int
                    ) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
    """Lists of up to `batch_images` (index, image, ground truth), in index order, decoded ahead by `workers`
    DataLoader processes (collated as lists: the loader's default would turn the arrays into tensors)."""
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    yield from data_loader(LabelledImages(dataset, indices), workers, batch_size=batch_images, collate_fn=list)


def label_map(props: Proposals, clip: ClipScores | None, lam: float, seen: Tensor | None = None) -> Tensor:
    """The semantic label map [H, W] of one branch: MaskFormer alone when `clip` is None."""
    if clip is None:
        return semantic_map(props.class_probs, props.mask_logits).labels
    scores, used = combine_scores(props, clip, lam, seen)
    return semantic_map(scores, props.mask_logits[used]).labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # timings must include the queued GPU work
        torch.cuda.synchronize(device)


@dataclass
class Example:
    """One evaluated image kept for qualitative figures."""

    index: int
    id: str
    image: np.ndarray  # RGB uint8 [H, W, 3]
    label: np.ndarray  # ground truth [H, W]
    predictions: dict[str, np.ndarray]  # branch → label map [H, W]


@dataclass
class BranchResult:
    """Confusion matrices of every branch over some images, with timings (additive: see `merge`)."""

    confusion: dict[str, np.ndarray]  # branch → [K, K] int64 (rows ground truth, columns prediction)
    seconds: dict[str, float]  # PROPOSAL_STEP, CLIP_STEP and each branch's semantic map
    images: int
    examples: list[Example] = field(default_factory=list)
    per_image: dict[str, np.ndarray] = field(default_factory=dict)  # branch → [images, 3, K] (metrics.bootstrap_se)

    @classmethod
    def merge(cls, parts: Sequence["BranchResult"]) -> "BranchResult":
        if not parts:
            raise ValueError("nothing to merge")
        return cls(confusion={b: sum(p.confusion[b] for p in parts) for b in parts[0].confusion},
                   seconds={k: sum(p.seconds[k] for p in parts) for k in parts[0].seconds},
                   images=sum(p.images for p in parts),
                   examples=sorted((e for p in parts for e in p.examples), key=lambda e: e.index),
                   per_image={b: np.concatenate([p.per_image[b] for p in parts]) for b in parts[0].per_image})

    def metrics(self, class_names: Sequence[str], seen: Sequence[bool]) -> dict[str, SegmentationMetrics]:
        return {b: SegmentationMetrics.from_confusion(m, class_names, seen) for b, m in self.confusion.items()}

    def standard_errors(self, seen: Sequence[bool]) -> dict[str, dict[str, float | None]]:
        """Per branch, the bootstrap standard errors over these images (images in index order: reproducible)."""
        return {b: bootstrap_se(counts, seen) for b, counts in self.per_image.items()}

    def branch_seconds(self, branch: str) -> float:
        """Time that branch alone would take: the shared steps it needs plus its own semantic map."""
        steps = [PROPOSAL_STEP] if branch == "maskformer" else [PROPOSAL_STEP, CLIP_STEP]
        return sum(self.seconds[s] for s in steps) + self.seconds[branch]

    def images_per_s(self, branch: str | None = None) -> float:
        """Throughput of one branch alone, or (None) of all branches from shared computations; model
        time only (decoding and scoring are not timed)."""
        seconds = sum(self.seconds.values()) if branch is None else self.branch_seconds(branch)
        return self.images / max(seconds, 1e-9)


def evaluate_branches(segmenter: BranchSegmenter, dataset: PreparedDataset, lam: float, *, seen_lambda: bool = False,
                      indices: Sequence[int] | None = None, keep_examples: int = 0, desc: str = "evaluate",
                      loader_workers: int = 0, batch_images: int = 8) -> BranchResult:
    """Score the maskformer, clip and ensemble branches on `indices` (default: every sample) of a prepared
    set whose classes are the segmenter's vocabulary. `seen_lambda` selects zsseg's ensemble; images with
    index < `keep_examples` are returned as `Example`s."""
    if segmenter.clip.text_features.shape[0] != dataset.num_classes:
        raise ValueError(f"the segmenter's vocabulary has {segmenter.clip.text_features.shape[0]} classes, "
                         f"{dataset.name} {dataset.num_classes}")
    indices = range(len(dataset)) if indices is None else indices
    device = segmenter.model.pixel_mean.device
    seen = torch.tensor(dataset.seen, device=device) if seen_lambda else None
    confusion = {b: ConfusionMatrix(dataset.num_classes, dataset.ignore_label, keep_images=True) for b in BRANCHES}
    seconds = dict.fromkeys((PROPOSAL_STEP, CLIP_STEP, *BRANCHES), 0.0)
    examples = []

    def timed(key: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        _sync(device)
        seconds[key] += time.perf_counter() - start
        return out

    with Progress(len(indices), desc) as progress:
        for batch in labelled_images(dataset, indices, loader_workers, batch_images):
            batch_props = timed(PROPOSAL_STEP, segmenter.proposals, [image for _, image, _ in batch])
            for (i, image, gt), props in zip(batch, batch_props):
                clip = timed(CLIP_STEP, segmenter.clip_scores, image, props)
                maps = {"maskformer": timed("maskformer", label_map, props, None, 0.0),
                        "clip": timed("clip", label_map, props, clip, 1.0),
                        "ensemble": timed("ensemble", label_map, props, clip, lam, seen)}
                source = dataset.root / str(dataset.samples[i].label)
                for branch, labels in maps.items():
                    confusion[branch].update(labels, gt, source=source)
                if i < keep_examples:
                    examples.append(Example(i, dataset.samples[i].id, image, gt,
                                            {b: m.cpu().numpy().astype(np.int64) for b, m in maps.items()}))
            progress.update(len(batch))
    return BranchResult({b: c.matrix for b, c in confusion.items()}, seconds, len(indices), examples,
                        {b: np.array(c.per_image, np.int64).reshape(-1, 3, dataset.num_classes)
                         for b, c in confusion.items()})


@dataclass
class SweepResult:
    """Confusion matrices of the ensemble for every (threshold, λ) cell (additive: see `merge`)."""

    lambdas: list[float]
    thresholds: list[float]
    confusion: np.ndarray  # [T, L, K, K] int64
    images: int

    @classmethod
    def merge(cls, parts: Sequence["SweepResult"]) -> "SweepResult":
        if not parts:
            raise ValueError("nothing to merge")
        first = parts[0]
        if any(p.lambdas != first.lambdas or p.thresholds != first.thresholds for p in parts):
            raise ValueError("sweep parts cover different grids")
        return cls(first.lambdas, first.thresholds, sum(p.confusion for p in parts), sum(p.images for p in parts))

    def cell(self, lam: float, threshold: float) -> np.ndarray:
        return self.confusion[self.thresholds.index(threshold), self.lambdas.index(lam)]

    def rows(self, class_names: Sequence[str], seen: Sequence[bool]) -> list[dict[str, float | None]]:
        """One row per cell: lambda, threshold and the cell's summary scores (`SegmentationMetrics.to_dict`)."""
        return [{"lambda": lam, "threshold": t,
                 **SegmentationMetrics.from_confusion(self.cell(lam, t), class_names, seen).to_dict()}
                for t in self.thresholds for lam in self.lambdas]


def sweep(segmenter: BranchSegmenter, dataset: PreparedDataset, lambdas: Sequence[float], thresholds: Sequence[float], *,
          seen_lambda: bool = False, indices: Sequence[int] | None = None, desc: str = "sweep",
          loader_workers: int = 0, batch_images: int = 8) -> SweepResult:
    """The ensemble's confusion matrix for every λ × crop-threshold cell: proposals once per image, CLIP's
    crop scores once per image and threshold, only the ensemble and the semantic map per cell."""
    lambdas, thresholds = [float(x) for x in lambdas], [float(x) for x in thresholds]
    if not lambdas or not thresholds or len(set(lambdas)) != len(lambdas) or len(set(thresholds)) != len(thresholds):
        raise ValueError("a sweep needs at least one λ and one threshold, each value once")
    indices = range(len(dataset)) if indices is None else indices
    seen = torch.tensor(dataset.seen, device=segmenter.model.pixel_mean.device) if seen_lambda else None
    cells = [[ConfusionMatrix(dataset.num_classes, dataset.ignore_label) for _ in lambdas] for _ in thresholds]
    with Progress(len(indices), desc) as progress:
        for batch in labelled_images(dataset, indices, loader_workers, batch_images):
            for (i, image, gt), props in zip(batch, segmenter.proposals([image for _, image, _ in batch])):
                source = dataset.root / str(dataset.samples[i].label)
                for row, t in zip(cells, thresholds):
                    clip = segmenter.clip_scores(image, props, t)
                    for cm, lam in zip(row, lambdas):
                        cm.update(label_map(props, clip, lam, seen), gt, source=source)
            progress.update(len(batch))
    matrices = np.stack([np.stack([cm.matrix for cm in row]) for row in cells])
    return SweepResult(lambdas, thresholds, matrices, len(indices))
