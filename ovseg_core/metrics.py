"""Semantic segmentation metrics: a pixel confusion matrix and the scores derived from it.

Conventions, as in detectron2's `SemSegEvaluator` and zsseg's zero-shot protocol:

- the confusion matrix has ground truth on rows and prediction on columns; pixels whose ground truth
  is the ignore label are not counted;
- IoU_c = TP / (TP + FP + FN). A class absent from both ground truth and prediction (union 0) has no
  IoU and is left out of every mean; a class present in the ground truth but never predicted has
  IoU 0 and counts;
- accuracy_c = TP / ground-truth pixels of c; classes without ground-truth pixels are left out of mACC;
- fwIoU weights each class's IoU by its share of ground-truth pixels; pACC = all TP / all pixels;
- seen / unseen mIoU are the means over the seen / unseen classes that have an IoU, and
  hIoU = 2 · seen · unseen / (seen + unseen), their harmonic mean.

All scores are percentages (0-100). A score that is undefined (e.g. unseen mIoU when no unseen class
occurs) is None, which JSON writes as null.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np

from .atomic import atomic_file
from .datasets.prepared import PreparedDataset
from .errors import DataError
from .progress import track

if TYPE_CHECKING:
    import torch

# torch is not imported here: the stages that only score or read results (the report) would pay its import
# time for nothing; a tensor can only reach these functions once the caller has imported torch.
ArrayLike = Union[np.ndarray, "torch.Tensor"]


def as_label_array(x: ArrayLike, what: str) -> np.ndarray:
    """A 2-D integer label map (numpy or torch) as an int64 numpy array; ValueError otherwise."""
    torch_module = sys.modules.get("torch")
    is_tensor = torch_module is not None and isinstance(x, torch_module.Tensor)
    a = x.detach().cpu().numpy() if is_tensor else np.asarray(x)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{what} must hold integer class ids, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [H, W] label map, got shape {tuple(a.shape)}")
    return a.astype(np.int64, copy=False)


def ids_outside(ids: np.ndarray, num_classes: int) -> list[int]:
    """Up to ten distinct values of `ids` outside 0..num_classes-1 (empty when all are class ids)."""
    if ids.size == 0 or (ids.min() >= 0 and ids.max() < num_classes):
        return []
    return np.unique(ids[(ids < 0) | (ids >= num_classes)])[:10].tolist()


class ConfusionMatrix:
    """Accumulates a [K, K] int64 pixel confusion matrix (rows: ground truth, columns: prediction) and, with
    `keep_images`, each image's per-class [true positives, ground-truth pixels, predicted pixels] (`per_image`,
    for `bootstrap_se`; 3K numbers per image, so off where many matrices accumulate, as in the sweep)."""

    def __init__(self, num_classes: int, ignore_label: int, matrix: np.ndarray | None = None,
                 keep_images: bool = False):
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore label {ignore_label} collides with a class id (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.matrix = np.zeros((num_classes, num_classes), np.int64) if matrix is None else matrix
        self.keep_images = keep_images
        self.per_image: list[np.ndarray] = []  # [3, K] int64 per update
        if self.matrix.shape != (num_classes, num_classes):
            raise ValueError(f"matrix shape {self.matrix.shape} does not match {num_classes} classes")

    def update(self, pred: ArrayLike, gt: ArrayLike, source: str | Path | None = None) -> None:
        """Add one image. Bad predictions raise ValueError; ground-truth ids outside 0..K-1 (other than
        the ignore label) raise DataError naming `source` when it is given, ValueError otherwise."""
        p = as_label_array(pred, "prediction")
        g = as_label_array(gt, "ground truth")
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
        k = self.num_classes
        if bad := ids_outside(p, k):
            raise ValueError(f"prediction holds ids {bad} outside the class range 0..{k - 1}")
        valid = g != self.ignore_label
        g, p = g[valid], p[valid]
        if bad := ids_outside(g, k):
            problem = f"ground truth holds ids {bad} outside 0..{k - 1} (ignore {self.ignore_label})"
            if source is not None:
                raise DataError(source, problem)
            raise ValueError(problem)
        image = np.bincount(g * k + p, minlength=k * k).reshape(k, k)
        self.matrix += image
        if self.keep_images:
            self.per_image.append(np.stack([np.diag(image), image.sum(axis=1), image.sum(axis=0)]))

    def metrics(self, class_names: Sequence[str], seen: Sequence[bool]) -> "SegmentationMetrics":
        return SegmentationMetrics.from_confusion(self.matrix, class_names, seen)

    def save(self, path: str | Path) -> None:
        """Write the matrix as .npy, atomically."""
        with atomic_file(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
            np.save(f, self.matrix, allow_pickle=False)

    @classmethod
    def load(cls, path: str | Path, ignore_label: int) -> "ConfusionMatrix":
        try:
            m = np.load(path, allow_pickle=False)
        except FileNotFoundError as e:
            raise DataError(path, "confusion matrix file is missing") from e
        except ValueError as e:
            raise DataError(path, f"not a .npy confusion matrix: {e}") from e
        if not isinstance(m, np.ndarray) or m.ndim != 2 or m.shape[0] != m.shape[1] or m.dtype != np.int64 or (m < 0).any():
            raise DataError(path, "expected a square non-negative int64 .npy matrix")
        return cls(m.shape[0], ignore_label, m)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


@dataclass(frozen=True)
class SegmentationMetrics:
    """Scores of one confusion matrix, in percent. `iou` / `acc` are per class, NaN where undefined."""

    class_names: list[str]
    seen: list[bool]
    iou: np.ndarray
    acc: np.ndarray
    miou: float | None
    fwiou: float | None
    pacc: float | None
    macc: float | None
    seen_miou: float | None
    unseen_miou: float | None
    hiou: float | None

    @classmethod
    def from_confusion(cls, matrix: np.ndarray, class_names: Sequence[str],
                       seen: Sequence[bool]) -> "SegmentationMetrics":
        k = matrix.shape[0]
        if matrix.shape != (k, k) or len(class_names) != k or len(seen) != k:
            raise ValueError(f"matrix {matrix.shape}, {len(class_names)} class names and "
                             f"{len(seen)} seen flags must agree")
        m = matrix.astype(np.float64)
        tp = np.diag(m)
        gt_pixels = m.sum(axis=1)
        union = gt_pixels + m.sum(axis=0) - tp
        has_iou = union > 0
        has_gt = gt_pixels > 0
        iou = np.full(k, np.nan)
        iou[has_iou] = 100.0 * tp[has_iou] / union[has_iou]
        acc = np.full(k, np.nan)
        acc[has_gt] = 100.0 * tp[has_gt] / gt_pixels[has_gt]
        total = gt_pixels.sum()
        seen_mask = np.asarray(seen, dtype=bool)
        seen_miou = _mean(iou[has_iou & seen_mask])
        unseen_miou = _mean(iou[has_iou & ~seen_mask])
        if seen_miou is None or unseen_miou is None:
            hiou = None
        elif seen_miou + unseen_miou == 0:
            hiou = 0.0
        else:
            hiou = 2.0 * seen_miou * unseen_miou / (seen_miou + unseen_miou)
        return cls(
            class_names=list(class_names),
            seen=seen_mask.tolist(),
            iou=iou,
            acc=acc,
            miou=_mean(iou[has_iou]),
            fwiou=float((iou[has_iou] * gt_pixels[has_iou]).sum() / total) if total else None,
            pacc=float(100.0 * tp.sum() / total) if total else None,
            macc=_mean(acc[has_gt]),
            seen_miou=seen_miou,
            unseen_miou=unseen_miou,
            hiou=hiou,
        )

    def to_dict(self) -> dict[str, float | None]:
        """Flat summary for `dvc metrics` (rounded to 4 decimals so diffs stay readable)."""
        values = {"mIoU": self.miou, "fwIoU": self.fwiou, "pACC": self.pacc, "mACC": self.macc,
                  "seen_mIoU": self.seen_miou, "unseen_mIoU": self.unseen_miou, "hIoU": self.hiou}
        return {key: None if v is None else round(v, 4) for key, v in values.items()}

    def _by_class(self, values: np.ndarray) -> dict[str, float | None]:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class names are not unique; use per_class_rows() instead")
        return {n: None if np.isnan(v) else float(v) for n, v in zip(self.class_names, values)}

    def iou_by_class(self) -> dict[str, float | None]:
        return self._by_class(self.iou)

    def acc_by_class(self) -> dict[str, float | None]:
        return self._by_class(self.acc)

    def per_class_rows(self) -> list[dict[str, str | float | bool | None]]:
        """One row per class for a `dvc plots` bar chart; iou is None for classes left out."""
        return [{"class": n, "iou": None if np.isnan(v) else round(float(v), 4), "seen": s}
                for n, v, s in zip(self.class_names, self.iou, self.seen)]


def bootstrap_se(per_image: np.ndarray, seen: Sequence[bool], draws: int = 1000, seed: int = 0
                 ) -> dict[str, float | None]:
    """Standard errors over images of mIoU, seen/unseen mIoU and hIoU (percent points): their standard deviation
    over `draws` resamples of the images with replacement (Efron's bootstrap; seeded, so reproducible).

    `per_image` [N, 3, K]: each image's per-class true positives, ground-truth and predicted pixels
    (`ConfusionMatrix.per_image`). A resample's IoU is computed from its summed counts, as the full set's is, over
    the classes present in that resample. Written here: no library bootstraps a ratio of sums over classes."""
    n, _, k = per_image.shape
    if n < 2:
        return dict.fromkeys(("mIoU", "seen_mIoU", "unseen_mIoU", "hIoU"))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)  # [draws, N]
    sums = (weights @ per_image.reshape(n, 3 * k).astype(np.float64)).reshape(draws, 3, k)
    tp, union = sums[:, 0], sums[:, 1] + sums[:, 2] - sums[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, 100.0 * tp / union, np.nan)
    seen_mask = np.asarray(seen, dtype=bool)

    def mean_over(mask: np.ndarray) -> np.ndarray | None:
        part = iou[:, mask]
        present = ~np.isnan(part)
        if not present.any(axis=1).all():
            return None
        return np.nansum(part, axis=1) / present.sum(axis=1)

    values = {"mIoU": mean_over(np.ones(k, bool)), "seen_mIoU": mean_over(seen_mask),
              "unseen_mIoU": mean_over(~seen_mask)}
    s, u = values["seen_mIoU"], values["unseen_mIoU"]
    if s is not None and u is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            values["hIoU"] = np.where(s + u > 0, 2.0 * s * u / (s + u), 0.0)
    else:
        values["hIoU"] = None
    return {key: None if v is None else round(float(np.std(v, ddof=1)), 4) for key, v in values.items()}


def confusion_plot_rows(matrix: np.ndarray, class_names: Sequence[str],
                        max_rows: int = 10_000) -> list[dict[str, str]]:
    """Rows {"actual", "predicted"} for DVC's `confusion` / `confusion_normalized` templates.

    Those templates count rows, one per observation; a pixel matrix holds millions, so when the matrix
    total exceeds `max_rows` every cell is scaled to total = `max_rows` rows (largest-remainder
    rounding). Proportions are kept; cells below half a row's worth of pixels may drop out.
    """
    if len(class_names) != matrix.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {matrix.shape} matrix")
    total = int(matrix.sum())
    counts = matrix.ravel().astype(np.int64)
    if total > max_rows:
        quota = matrix.ravel().astype(np.float64) * (max_rows / total)
        counts = np.floor(quota).astype(np.int64)
        remainder_order = np.argsort(-(quota - counts), kind="stable")
        counts[remainder_order[: max_rows - int(counts.sum())]] += 1
    k = matrix.shape[0]
    rows: list[dict[str, str]] = []
    for flat in np.flatnonzero(counts):
        row = {"actual": class_names[flat // k], "predicted": class_names[flat % k]}
        rows.extend([row] * int(counts[flat]))
    return rows


def evaluate_dataset(
    dataset: PreparedDataset,
    predict: Callable[[np.ndarray], ArrayLike],
    progress_desc: str = "evaluate",
) -> tuple[SegmentationMetrics, ConfusionMatrix, float]:
    """Run `predict` (RGB uint8 [H, W, 3] → label map [H, W]) over every sample and score it.

    Returns the metrics, the confusion matrix and the throughput of `predict` alone in images per
    second (image decoding and scoring are not timed).
    """
    if len(dataset) == 0:
        raise DataError(dataset.root, f"prepared dataset {dataset.name!r} has no samples to evaluate")
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_label)
    predict_s = 0.0
    for sample, image, gt in track(dataset, total=len(dataset), desc=progress_desc):
        start = time.perf_counter()
        pred = predict(image)
        predict_s += time.perf_counter() - start
        try:
            cm.update(pred, gt, source=dataset.root / sample.label)
        except ValueError as e:
            raise ValueError(f"{dataset.name} sample {sample.id}: {e}") from e
    return cm.metrics(dataset.classes, dataset.seen), cm, len(dataset) / max(predict_s, 1e-9)
