"""Segment any image into any list of class names: the Python API behind `ovseg segment`.

    segmenter = Segmenter.load()                    # the models/ directory `dvc repro` wrote
    result = segmenter.segment("photo.jpg", ["sky", "kite", "grass", "golden retriever"])
    result.labels, result.present, result.overlay   # [H, W] class ids, classes found, overlay with legend

Models come from a run's `models/` directory (the repository's own by default; any `dvc exp`
workspace's can be named), laid out as the pipeline writes it::

    models/train_maskformer/model.pt      proposal network (MaskFormer with the CLIP-text class head)
    models/adapt_clip/<variant>/          adapted CLIP (`ovseg_core.clip.adapted`): ft-mpt, mpt, ft, ...
    models/pretrain_clip/clip.pt          the original CLIP (clip_variant="original")

or from explicit files (e.g. the paper recipe's weights: `maskformer=...`, `clip=<ViT-L-14 checkpoint>`,
`clip_arch="ViT-L-14"`). Any vocabulary works: class names are encoded by CLIP's text tower over
the ViLD templates, once per name (cached). The text tower is the one of the adapted CLIP, which
adaptation never changes (text locked), so it is the tower the proposal network was trained with.

Behaviour choices:

- Class lists: names are whitespace-trimmed (inner runs of spaces collapse); empty names are an
  error; duplicates (ignoring case — CLIP's tokenizer lowercases) are dropped with a warning.
  Fewer than two classes is an error: argmax over one class labels every pixel with it. OVSeg's demo
  silently adds "others"; here a `background` name must be asked for explicitly, and is then
  appended as one more class.
- Resolution, as in OVSeg's demo (detectron2 resizes the test image and upsamples the result): the
  image is downscaled so that its short side is at most the proposal network's crop size (the
  scale it was trained at), segmented there — proposals and CLIP's masked crops alike — and the
  label map is brought back to the input size by nearest-neighbour sampling. Smaller images are
  segmented as they are (the network upsamples internally). This bounds memory ([Q, H, W] mask
  logits) for photos of any size.
- Mode "auto" runs the network once on the whole (resized) image, unless the image is more than
  `SLIDE_ASPECT` times as long as it is high (or vice versa): then crop-size windows slide along it
  (2/3 overlap), so that the network never sees an input far from its square training crops.
- Your own masks (`masks=`, e.g. SAM's from a mask file, see `ovseg_core.mask_files`): CLIP classifies
  each mask at the image's full resolution and the proposal network is not run; pixels no mask covers
  are left unlabelled (the ignore value, `label_ignore`). Mode "masks".
- `mean_score` of a class is the mean, over the pixels labelled with it, of the class's share of the
  pixel's total score Σ_c Σ_q p[q, c] · sigmoid(mask_q) — 1 where no other class competes.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from .clip.adapted import ADAPTED_FILE, AdaptedClip, load_adapted
from .clip.models import checkpoint_metadata
from .clip.text import TextFeatureCache
from .compute import CPU_FP32, ComputeConfig, Placement
from .datasets.prepared import load_rgb
from .errors import DataError, MissingWeightsError, read_text_file
from .inference import NO_MASK_LABEL, ClipBranch, Segmentation, segment, segment_masks
from .maskformer.model import OpenVocabMaskFormer, load_model
from .visualize import MAX_CLASSES, overlay

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = REPO_ROOT / "models"
MASKFORMER_FILE = Path("train_maskformer") / "model.pt"
ADAPTED_CLIP_DIR = Path("adapt_clip")
ORIGINAL_CLIP_FILE = Path("pretrain_clip") / "clip.pt"
ORIGINAL_VARIANT = "original"
DEFAULT_VARIANT = "ft-mpt"
DEFAULT_LAM = 0.7  # OVSeg's ensemble weight for ADE-style vocabularies
DEFAULT_THRESHOLD = 0.5  # mask probability threshold of the masked crop (OVSeg's R101c config)
SLIDE_ASPECT = 2.0
Mode = Literal["auto", "resize", "slide"]


@dataclass(frozen=True)
class ModelFiles:
    maskformer: Path | None  # None: masks come from elsewhere (`--masks`), no proposal network
    clip: Path  # an adapted-CLIP directory or a plain CLIP checkpoint file
    clip_arch: str | None  # needed only for a plain checkpoint that does not record it


def _stage_hint(stage: str) -> str:
    return f"the `{stage}` stage writes it: run `dvc repro {stage}` (or `dvc repro`) in the repository"


def _adapted_variants(run_dir: Path) -> list[str]:
    root = run_dir / ADAPTED_CLIP_DIR
    found = sorted(p.name for p in root.iterdir() if (p / ADAPTED_FILE).is_file()) if root.is_dir() else []
    return found + ([ORIGINAL_VARIANT] if (run_dir / ORIGINAL_CLIP_FILE).is_file() else [])


def locate_models(run_dir: str | Path | None = None, *, maskformer: str | Path | None = None,
                  clip: str | Path | None = None, clip_arch: str | None = None,
                  clip_variant: str = DEFAULT_VARIANT, proposals: bool = True) -> ModelFiles:
    """The model files to load: explicit paths where given, the rest from `run_dir` (default: the
    repository's models/); without `proposals` no proposal network (the masks come from elsewhere).
    Raises MissingWeightsError naming the path and the stage that writes it."""
    if not proposals:
        maskformer = None
    elif maskformer is not None and not Path(maskformer).is_file():
        raise MissingWeightsError(f"{maskformer}: proposal network file not found")
    if clip is not None and not Path(clip).exists():
        raise MissingWeightsError(f"{clip}: CLIP not found (an adapted-CLIP directory or a CLIP checkpoint file)")
    if clip is not None and (maskformer is not None or not proposals):
        return ModelFiles(None if maskformer is None else Path(maskformer), Path(clip), clip_arch)
    run = Path(run_dir) if run_dir is not None else DEFAULT_MODELS_DIR
    if not run.is_dir():
        raise MissingWeightsError(
            f"{run}: model directory not found. `dvc repro` in the repository writes models/; or name a run's "
            f"models/ directory (--model) or the model files (--maskformer, --clip)")
    if maskformer is None and proposals:
        maskformer = run / MASKFORMER_FILE
        if not maskformer.is_file():
            raise MissingWeightsError(f"{maskformer}: proposal network not found; {_stage_hint('train_maskformer')}")
    if clip is None:
        if clip_variant == ORIGINAL_VARIANT:
            clip = run / ORIGINAL_CLIP_FILE
            if not clip.is_file():
                raise MissingWeightsError(f"{clip}: original CLIP not found; {_stage_hint('pretrain_clip')}")
        else:
            clip = run / ADAPTED_CLIP_DIR / clip_variant
            if not (clip / ADAPTED_FILE).is_file():
                available = ", ".join(_adapted_variants(run)) or "none"
                raise MissingWeightsError(
                    f"{clip}: no adapted CLIP {clip_variant!r} (variants available here: {available}); "
                    f"{_stage_hint('adapt_clip')}")
    return ModelFiles(None if maskformer is None else Path(maskformer), Path(clip), clip_arch)


def _clean(name: str) -> str:
    return re.sub(r"\s+", " ", name).strip()


def normalize_classes(names: str | Iterable[str], background: str | None = None) -> list[str]:
    """The class list to segment into (see the module docstring): a comma-separated string or a list
    of names, trimmed, de-duplicated with a warning, `background` appended; ValueError for empty
    names or fewer than two classes."""
    if isinstance(names, str):
        names = names.split(",")
    cleaned = []
    for i, name in enumerate(names, 1):
        if not _clean(name):
            raise ValueError(f"class name #{i} is empty")
        cleaned.append(_clean(name))
    if background is not None:
        if not _clean(background):
            raise ValueError("the background class name is empty")
        cleaned.append(_clean(background))
    unique: dict[str, str] = {}
    for name in cleaned:
        if name.casefold() in unique:
            warnings.warn(f"duplicate class name {name!r} ignored (same as {unique[name.casefold()]!r})", stacklevel=2)
        else:
            unique[name.casefold()] = name
    classes = list(unique.values())
    if not classes:
        raise ValueError("no class names given")
    if len(classes) == 1:
        raise ValueError(f"only one class ({classes[0]!r}): every pixel would get it. Name at least two classes, "
                         f"or add a background class (--background others / background='others')")
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"{len(classes)} classes; at most {MAX_CLASSES} can be told apart in one segmentation")
    return classes


def read_classes_file(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (commas are part of a name); blank lines and lines
    starting with '#' are skipped."""
    text = read_text_file(path, "class list file")
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class SegmentResult:
    labels: np.ndarray  # [H, W] int64 ids into `classes` (label_ignore where no given mask covers), input size
    classes: list[str]
    present: list[dict[str, Any]]  # {class, pixel_share, mean_score} of each class found, largest first
    overlay: Image.Image  # the image with the label map blended over it and a legend
    mode: str  # the inference mode used: "resize", "slide" or "masks"
    inference_size: tuple[int, int]  # (width, height) of the image as segmented (before upsampling)
    seconds: float  # wall time of `segment` (model loading excluded)


def _as_rgb(image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, (str, Path)):
        array = load_rgb(image)
    elif isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be RGB uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return array


def _working_image(rgb: np.ndarray, crop_size: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = crop_size / min(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    return np.require(rgb, requirements=["C", "W"])  # torch.from_numpy warns on PIL's read-only arrays


def choose_mode(height: int, width: int) -> Literal["resize", "slide"]:
    """"slide" for images more than SLIDE_ASPECT times as long as high (or high as long), else "resize"."""
    return "slide" if max(height, width) > SLIDE_ASPECT * min(height, width) else "resize"


def _confidence(seg: Segmentation) -> torch.Tensor:
    """Per pixel: the winning class's share of the total score over all classes (see module docstring)."""
    masks = seg.proposals.mask_logits[seg.mask_indices].sigmoid()  # [S, h, w]
    total = torch.einsum("s,shw->hw", seg.class_scores.sum(1), masks)
    winner = (seg.class_scores[:, seg.labels] * masks).sum(0)  # class_scores[:, labels]: [S, h, w]
    return winner / total.clamp_min(torch.finfo(total.dtype).tiny)


def _upsample_nearest(values: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.arange(height) * values.shape[0] // height
    cols = np.arange(width) * values.shape[1] // width
    return values[rows[:, None], cols[None, :]]


def label_ignore(num_classes: int) -> int:
    """The ignore value whose PNG type holds every class id: 255 (uint8) up to 255 classes, else 65535."""
    return 255 if num_classes <= 255 else 65535


def check_settings(lam: float, threshold: float) -> None:
    """ValueError unless λ lies in [0, 1] and the mask threshold in (0, 1)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"ensemble weight λ must lie in [0, 1], got {lam}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"mask threshold must lie in (0, 1), got {threshold}")


class Segmenter:
    """Loaded models plus a per-name text-feature cache; `segment` any number of images, with any
    vocabulary each time. Not thread-safe: each call sets the proposal network's vocabulary."""

    def __init__(self, model: OpenVocabMaskFormer | None, clip: AdaptedClip, files: ModelFiles,
                 lam: float = DEFAULT_LAM, threshold: float = DEFAULT_THRESHOLD, placement: Placement = CPU_FP32):
        """`model` None: a segmenter of given masks only (`segment(..., masks=...)`)."""
        check_settings(lam, threshold)
        text_dim = None if model is None else model.class_predictor.void_embedding.shape[0]
        clip_dim = clip.bundle.embed_dim
        if text_dim is not None and text_dim != clip_dim:
            raise DataError(files.clip, f"CLIP embeds text in {clip_dim} dimensions, the proposal network "
                                        f"{files.maskformer} in {text_dim}: they must come from the same CLIP")
        self.model = model
        self.clip = clip
        self.files = files
        self.lam = lam
        self.threshold = threshold
        self.placement = placement
        self.text = TextFeatureCache(clip.bundle)
        self._encode = clip.encoder()

    @classmethod
    def load(cls, run_dir: str | Path | None = None, *, maskformer: str | Path | None = None,
             clip: str | Path | None = None, clip_arch: str | None = None, clip_variant: str = DEFAULT_VARIANT,
             lam: float = DEFAULT_LAM, threshold: float = DEFAULT_THRESHOLD, device: str = "auto",
             precision: str = "auto", proposals: bool = True) -> "Segmenter":
        """Load the models once (see `locate_models` for which files) onto `device` (auto: the GPU when one
        is visible), to run in `precision` (auto: bf16 where the device computes it natively, else fp32).
        Without `proposals` only CLIP is loaded: it labels the masks given to `segment`."""
        placement = ComputeConfig(device=device, precision=precision).placement()
        files = locate_models(run_dir, maskformer=maskformer, clip=clip, clip_arch=clip_arch,
                              clip_variant=clip_variant, proposals=proposals)
        arch = files.clip_arch
        if arch is None and files.clip.is_file():
            arch = checkpoint_metadata(files.clip).get("arch")
            if arch is None:
                raise DataError(files.clip, "this CLIP checkpoint does not record its architecture: name it "
                                            "(--clip-arch, e.g. ViT-L-14)")
        model = None if files.maskformer is None else load_model(files.maskformer, device=placement.device)[0]
        adapted = load_adapted(files.clip, arch, device=placement.device)
        return cls(model, adapted, ModelFiles(files.maskformer, files.clip, adapted.bundle.arch), lam, threshold,
                   placement)

    @property
    def crop_size(self) -> int:
        return self.model.net.crop_size

    def describe(self) -> dict[str, Any]:
        """The models and settings, as recorded beside every result."""
        maskformer = None if self.files.maskformer is None else str(self.files.maskformer.resolve())
        return {"maskformer": maskformer, "clip": str(self.files.clip.resolve()),
                "clip_name": self.clip.name, "clip_arch": self.files.clip_arch, "lam": self.lam,
                "threshold": self.threshold, **self.placement.describe()}

    @torch.no_grad()
    def segment(self, image: str | Path | Image.Image | np.ndarray, classes: str | Sequence[str], *,
                background: str | None = None, mode: Mode = "auto", masks: np.ndarray | None = None
                ) -> SegmentResult:
        """Label every pixel of `image` (a path, PIL image or RGB uint8 array) with one of `classes` (a list,
        or one comma-separated string); with `masks` (bool [N, H, W] at the image's size) from those masks."""
        if masks is None and self.model is None:
            raise ValueError("this segmenter was loaded without a proposal network (masks only): pass `masks`")
        start = time.perf_counter()
        names = normalize_classes(classes, background)
        rgb = _as_rgb(image)
        height, width = rgb.shape[:2]
        work = rgb if masks is not None else _working_image(rgb, self.crop_size)
        used_mode = "masks" if masks is not None else choose_mode(*work.shape[:2]) if mode == "auto" else mode
        with self.placement.autocast():
            text = self.text(names)
            branch = ClipBranch(encode=self._encode, text_features=text, size=self.clip.bundle.image_size,
                                mean=self.clip.bundle.mean, std=self.clip.bundle.std, threshold=self.threshold,
                                logit_scale=self.clip.logit_scale)
            if masks is not None:
                seg = segment_masks(work, torch.as_tensor(masks, device=self.placement.device), branch)
            else:
                seg = segment(self.model, work, text, clip=branch, lam=self.lam, mode=used_mode)
        labels = _upsample_nearest(seg.labels.cpu().numpy(), height, width)
        confidence = _upsample_nearest(_confidence(seg).cpu().numpy(), height, width)
        covered = labels != NO_MASK_LABEL
        counts = np.bincount(labels[covered], minlength=len(names))
        sums = np.bincount(labels[covered], weights=confidence[covered].astype(np.float64), minlength=len(names))
        present = [{"class": names[c], "pixel_share": float(counts[c]) / labels.size,
                    "mean_score": float(sums[c] / counts[c])}
                   for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
        labels = np.where(covered, labels, label_ignore(len(names)))
        picture = overlay(rgb, labels, names, ignore_label=label_ignore(len(names)))
        return SegmentResult(labels=labels, classes=names, present=present, overlay=picture, mode=used_mode,
                             inference_size=(work.shape[1], work.shape[0]), seconds=time.perf_counter() - start)


def result_record(result: SegmentResult, segmenter: Segmenter, image: str | Path | None = None) -> dict[str, Any]:
    """A JSON-able summary of one result: every class's pixel share and mean score, sizes, models, timing."""
    found = {p["class"]: p for p in result.present}
    height, width = result.labels.shape
    return {
        "image": None if image is None else str(image),
        "image_size": {"width": width, "height": height},
        "inference_size": {"width": result.inference_size[0], "height": result.inference_size[1]},
        "mode": result.mode,
        "classes": result.classes,
        "per_class": [{"id": i, "class": name, "pixel_share": found[name]["pixel_share"] if name in found else 0.0,
                       "mean_score": found[name]["mean_score"] if name in found else None}
                      for i, name in enumerate(result.classes)],
        "models": segmenter.describe(),
        "latency_s": round(result.seconds, 4),
    }


__all__ = [
    "DEFAULT_MODELS_DIR", "ModelFiles", "SegmentResult", "Segmenter", "check_settings", "choose_mode", "label_ignore",
    "locate_models", "normalize_classes", "read_classes_file", "result_record",
]
