"""Two-stage open-vocabulary inference: MaskFormer proposals, CLIP on masked crops, ensemble, semantic map.

Used by mining (proposals + CLIP), evaluation and the demo CLI (`segment`). Tensors follow the model's
device; the networks run in whatever precision the caller's autocast context says (see
`ovseg_core.compute.Placement.autocast`), and every output here is fp32: the scores after the networks
(CLIP's logits over the vocabulary, the semantic map's sums) are computed with autocast off.

- `proposals`: mask logits [Q, H, W] at the image's size and p_mf [Q, K] = softmax over K + 1
  (void last) with void dropped, for whatever vocabulary the model holds (`set_vocabulary`).
  mode "resize" resizes the short side to `size` (default: the model's crop size) and pads to the
  backbone's stride; mode "slide" then also cuts crop-size windows (stride crop/3 by default, i.e.
  2/3 overlap as in OVSeg's config) and returns the Q proposals of every window, each with logit
  `OUTSIDE_WINDOW_LOGIT` (sigmoid ≈ 0) outside its window. `batch_proposals` does mode "resize" for
  several images at once (mining), equal-sized ones in one forward pass.
- `classify_proposals`: p_clip [M, K] = softmax over the K classes of logit_scale · cosine between
  the masked crop's CLIP feature and the text features, for the M masks that survive thresholding
  (`keep`); crops come from `ovseg_core.crops.masked_crops`, features from a caller-supplied encoder.
- `ensemble`: p = p_mf^(1−λ) · p_clip^λ (OVSeg); with a `seen` mask, zsseg's variant, in which seen
  classes use p_mf^λ · p_clip^(1−λ).
- `semantic_map`: scores = einsum("qc,qhw->chw", p, sigmoid(mask logits)), labels = argmax over c.
- `segment_masks`: given masks (a mask file's, e.g. SAM's) instead of proposals: CLIP alone classifies
  each mask (no MaskFormer scores exist for them), the map is the same einsum over the binary masks, and
  pixels no mask covers get NO_MASK_LABEL.
- `combine_scores` / `segment`: all of the above. Proposals whose mask is empty after thresholding have no crop and so
  no CLIP score: they are dropped from the semantic map (they cover no pixel above the threshold;
  OVSeg's code instead sets p_clip = 1 for them, which inflates them to p_mf^(1−λ)). When no proposal
  survives, the map falls back to MaskFormer's scores over all proposals, so every pixel gets a class.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .compute import autocast_off
from .crops import masked_crops
from .maskformer.model import OpenVocabMaskFormer

OUTSIDE_WINDOW_LOGIT = -100.0  # a sliding-window proposal's logit outside its window (sigmoid ≈ 4e-44)
NO_MASK_LABEL = -1  # the label of pixels no mask covers (semantic_map given no mask, segment_masks)

Encoder = Callable[[Tensor, Tensor], Tensor]  # (crops [M, 3, S, S], crop masks [M, S, S]) → normalised [M, D]


@dataclass
class Proposals:
    mask_logits: Tensor  # [Q, H, W] at the input image's size
    class_probs: Tensor  # [Q, K] MaskFormer's class probabilities, void dropped (rows sum to 1 − p_void)


@dataclass
class ClipScores:
    probs: Tensor  # [M, K] softmax over the K classes, one row per surviving mask
    keep: Tensor  # [N] bool: which input masks survived thresholding (have a crop)


@dataclass
class SemanticMap:
    labels: Tensor  # [H, W] int64 class ids (NO_MASK_LABEL everywhere when given no mask)
    scores: Tensor | None  # [K, H, W] per-class scores, when asked for


@dataclass
class ClipBranch:
    """What `segment` needs for the CLIP branch (e.g. encode = partial of clip.mpt.encode_masked)."""

    encode: Encoder
    text_features: Tensor  # [K, D] CLIP text embeddings of the vocabulary, same class order as the model's
    size: int  # CLIP's input resolution
    mean: Sequence[float]  # CLIP's normalisation (0..1 scale)
    std: Sequence[float]
    threshold: float  # mask probability threshold for the crop (0.4 Swin-B config, 0.5 R101c)
    logit_scale: float = 100.0  # CLIP's logit scale (100 for OpenAI weights)


@dataclass
class Segmentation:
    labels: Tensor  # [H, W] int64
    class_scores: Tensor  # [S, K] final per-mask class scores of the S masks used in the map
    mask_indices: Tensor  # [S] index of each of those masks into proposals
    proposals: Proposals
    score_maps: Tensor | None  # [K, H, W] when asked for


def as_chw(image: np.ndarray | Tensor) -> Tensor:
    """RGB uint8 numpy [H, W, 3] or torch [3, H, W] → torch uint8 [3, H, W]."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be [H, W, 3], got {image.shape}")
        return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)  # copies if read-only
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"torch images must be [3, H, W], got {tuple(image.shape)}")
    return image


def _run(model: OpenVocabMaskFormer, images: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised images [B, 3, h, w] → (p_mf [B, Q, K], mask logits [B, Q, h, w]), fp32 whatever the
    autocast precision of the forward pass."""
    h, w = images.shape[-2:]
    d = model.net.size_divisibility
    padded = F.pad(images, (0, -w % d, 0, -h % d))  # zero = the mean colour after normalisation
    out = model(pixel_values=padded)
    probs = out.class_queries_logits.float().softmax(-1)[..., :-1]
    masks = F.interpolate(out.masks_queries_logits.float(), size=padded.shape[-2:], mode="bilinear",
                          align_corners=False)
    return probs, masks[..., :h, :w]


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    last = max(length - window, 0)
    starts = list(range(0, last + 1, stride))
    return starts if starts[-1] == last else starts + [last]


def _resized(model: OpenVocabMaskFormer, image: Tensor, size: int) -> Tensor:
    """uint8 [3, H, W] on the model's device → normalised [1, 3, h, w] with short side `size`."""
    height, width = image.shape[1:]
    scale = size / min(height, width)
    rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
    resized = image[None].float()
    if (rh, rw) != (height, width):
        resized = F.interpolate(resized, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    return model.normalize(resized)


def _at_image_size(logits: Tensor, height: int, width: int) -> Tensor:
    if logits.shape[-2:] == (height, width):
        return logits
    return F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]


@contextlib.contextmanager
def _eval_mode(model: OpenVocabMaskFormer) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def batch_proposals(model: OpenVocabMaskFormer, images: Sequence[np.ndarray | Tensor], *, size: int | None = None
                    ) -> list[Proposals]:
    """`proposals` in mode "resize" for several images: each is resized on its own, and images of equal
    resized shape go through the network together (no padding between images, so each result equals
    the image's own up to float rounding)."""
    device = model.pixel_mean.device
    size = size or model.net.crop_size
    chw = [as_chw(image).to(device, non_blocking=True) for image in images]
    inputs = [_resized(model, image, size) for image in chw]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    results: list[Proposals | None] = [None] * len(images)
    with _eval_mode(model):
        for members in groups.values():
            probs, logits = _run(model, torch.cat([inputs[i] for i in members]))
            for i, p, m in zip(members, probs, logits):
                results[i] = Proposals(mask_logits=_at_image_size(m, *chw[i].shape[1:]), class_probs=p)
    return results  # type: ignore[return-value]


@torch.no_grad()
def proposals(model: OpenVocabMaskFormer, image: np.ndarray | Tensor, *, size: int | None = None,
              mode: Literal["resize", "slide"] = "resize", stride: int | None = None, batch_size: int = 8
              ) -> Proposals:
    """Mask proposals and MaskFormer class probabilities of one RGB image (see the module docstring)."""
    if mode == "resize":
        return batch_proposals(model, [image], size=size)[0]
    if mode != "slide":
        raise ValueError(f"unknown inference mode {mode!r} (use 'resize' or 'slide')")
    image = as_chw(image).to(model.pixel_mean.device)
    height, width = image.shape[1:]
    normalised = _resized(model, image, size or model.net.crop_size)
    rh, rw = normalised.shape[-2:]
    c = model.net.crop_size
    stride = stride or max(1, math.ceil(c / 3))
    canvas = F.pad(normalised, (0, max(c - rw, 0), 0, max(c - rh, 0)))[0]
    ch, cw = canvas.shape[1:]
    windows = [(y, x) for y in _window_starts(ch, c, stride) for x in _window_starts(cw, c, stride)]
    prob_list, logit_list = [], []
    with _eval_mode(model):
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            p, m = _run(model, torch.stack([canvas[:, y:y + c, x:x + c] for y, x in batch]))
            for (y, x), pw, mw in zip(batch, p, m):
                full = mw.new_full((mw.shape[0], ch, cw), OUTSIDE_WINDOW_LOGIT)
                full[:, y:y + c, x:x + c] = mw
                prob_list.append(pw)
                logit_list.append(full[:, :rh, :rw])
    return Proposals(mask_logits=_at_image_size(torch.cat(logit_list), height, width), class_probs=torch.cat(prob_list))


@torch.no_grad()
def classify_proposals(image: np.ndarray | Tensor, mask_probs: Tensor, encode: Encoder, text_features: Tensor,
                       size: int, mean: Sequence[float], std: Sequence[float], threshold: float,
                       logit_scale: float = 100.0, batch_size: int = 64) -> ClipScores:
    """CLIP class probabilities of each surviving masked crop; crops and masks are moved to
    text_features' device before `encode`."""
    image = as_chw(image).to(mask_probs.device)
    crops = masked_crops(image, mask_probs, size, mean, std, threshold)
    text = F.normalize(text_features.float(), dim=-1)
    if len(crops) == 0:
        return ClipScores(probs=text.new_zeros(0, text.shape[0]), keep=crops.keep)
    features = torch.cat([
        encode(crops.crops[i:i + batch_size].to(text.device), crops.masks[i:i + batch_size].to(text.device))
        for i in range(0, len(crops), batch_size)])
    with autocast_off(text.device):  # a caller's bf16 autocast would round the logits (±0.1 at scale 100)
        logits = logit_scale * F.normalize(features.float(), dim=-1) @ text.T
        return ClipScores(probs=logits.softmax(-1), keep=crops.keep)


def ensemble(p_mf: Tensor, p_clip: Tensor, lam: float, seen: Tensor | None = None) -> Tensor:
    """p_mf^(1−λ) · p_clip^λ per mask and class; with `seen` [K] bool, seen classes take p_mf^λ · p_clip^(1−λ)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"ensemble weight must lie in [0, 1], got {lam}")
    if seen is None:
        return p_mf.pow(1 - lam) * p_clip.pow(lam)
    clip_weight = torch.where(seen.to(p_mf.device), 1 - lam, lam).to(p_mf.dtype)
    return p_mf.pow(1 - clip_weight) * p_clip.pow(clip_weight)


def semantic_map(class_scores: Tensor, mask_logits: Tensor, return_scores: bool = False,
                 max_elements: int = 2**24) -> SemanticMap:
    """labels[h, w] = argmax_c Σ_q class_scores[q, c] · sigmoid(mask_logits[q, h, w]).

    Without `return_scores` the [K, H, W] scores are never held whole: classes are taken in chunks of
    at most `max_elements` scores, which keeps large vocabularies (ADE-847) at full resolution affordable."""
    num_masks, k = class_scores.shape
    height, width = mask_logits.shape[-2:]
    if num_masks == 0:
        labels = torch.full((height, width), NO_MASK_LABEL, dtype=torch.long, device=mask_logits.device)
        return SemanticMap(labels, class_scores.new_zeros(k, height, width, dtype=torch.float32) if return_scores
                           else None)
    with autocast_off(mask_logits.device):  # in bf16 (a caller's autocast) ~1% of pixels would take another label
        class_scores, masks = class_scores.float(), mask_logits.float().sigmoid()
        if return_scores:
            scores = torch.einsum("qc,qhw->chw", class_scores, masks)
            return SemanticMap(scores.argmax(0), scores)
        best = masks.new_full((height, width), -1.0)
        labels = torch.zeros((height, width), dtype=torch.long, device=masks.device)
        chunk = max(1, max_elements // (height * width))
        for c0 in range(0, k, chunk):
            scores = torch.einsum("qc,qhw->chw", class_scores[:, c0:c0 + chunk], masks)
            value, index = scores.max(0)
            better = value > best
            best = torch.where(better, value, best)
            labels = torch.where(better, index + c0, labels)
        return SemanticMap(labels, None)


def combine_scores(props: Proposals, clip: ClipScores | None, lam: float, seen: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """(per-mask class scores [S, K], indices [S] of those masks into the proposals): MaskFormer's over all
    proposals without CLIP scores; else the ensemble over the masks that have a crop, falling back to
    MaskFormer's over all proposals when none has one."""
    p_mf = props.class_probs
    if clip is None or not clip.keep.any():
        return p_mf, torch.arange(p_mf.shape[0], device=p_mf.device)
    used = clip.keep.to(p_mf.device).nonzero().flatten()
    return ensemble(p_mf[used], clip.probs.to(p_mf.device), lam, seen), used


@torch.no_grad()
def segment(model: OpenVocabMaskFormer, image: np.ndarray | Tensor, text_features: Tensor | None = None, *,
            clip: ClipBranch | None = None, lam: float = 0.0, seen: Tensor | None = None, size: int | None = None,
            mode: Literal["resize", "slide"] = "resize", return_score_maps: bool = False) -> Segmentation:
    """Open-vocabulary semantic segmentation of one image into the vocabulary of `text_features`
    (set on the model; None keeps the model's current vocabulary). Without `clip`, MaskFormer alone
    (λ must then be 0 and `seen` unset)."""
    if text_features is not None:
        model.set_vocabulary(text_features)
    if clip is None and (lam > 0 or seen is not None):
        raise ValueError("an ensemble weight λ > 0 or a seen mask needs the CLIP branch")
    props = proposals(model, image, size=size, mode=mode)
    clip_scores = None
    if clip is not None:
        if clip.text_features.shape[0] != model.num_classes:
            raise ValueError(f"CLIP vocabulary has {clip.text_features.shape[0]} classes, the model {model.num_classes}")
        clip_scores = classify_proposals(image, props.mask_logits.sigmoid(), clip.encode, clip.text_features,
                                         clip.size, clip.mean, clip.std, clip.threshold, clip.logit_scale)
    scores, used = combine_scores(props, clip_scores, lam, seen)
    sm = semantic_map(scores, props.mask_logits[used], return_scores=return_score_maps)
    return Segmentation(labels=sm.labels, class_scores=scores, mask_indices=used, proposals=props,
                        score_maps=sm.scores)


@torch.no_grad()
def segment_masks(image: np.ndarray | Tensor, masks: Tensor, clip: ClipBranch) -> Segmentation:
    """Semantic segmentation of one image from given bool masks [N, H, W] (module docstring), by CLIP alone."""
    image = as_chw(image)
    if masks.dtype != torch.bool or masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
        raise ValueError(f"masks must be bool [N, {image.shape[1]}, {image.shape[2]}], got {masks.dtype} "
                         f"{tuple(masks.shape)}")
    scores = classify_proposals(image, masks, clip.encode, clip.text_features, clip.size, clip.mean, clip.std,
                                clip.threshold, clip.logit_scale)
    logits = torch.where(masks, -OUTSIDE_WINDOW_LOGIT, OUTSIDE_WINDOW_LOGIT)  # sigmoid: 1 inside, ≈ 0 outside
    used = scores.keep.nonzero().flatten()
    probs = scores.probs.to(logits.device)
    class_probs = probs.new_zeros(len(masks), probs.shape[1])
    class_probs[used] = probs
    labels = semantic_map(probs, logits[used]).labels
    labels = torch.where(masks.any(0), labels, NO_MASK_LABEL)
    return Segmentation(labels=labels, class_scores=probs, mask_indices=used,
                        proposals=Proposals(mask_logits=logits, class_probs=class_probs), score_maps=None)
