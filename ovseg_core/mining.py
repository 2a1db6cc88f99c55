"""Mining (masked region, category) pairs: the paper's data engine (§3.2).

For every image of a captioned segmentation set: masks (MaskFormer proposals, or the ground-truth
segments for the paper's Table 2 controls), masked crops through THE shared `masked_crops`, CLIP
image features of the crops, categories (caption nouns, or the ground-truth class names), and each
category assigned its best-matching mask by CLIP. Work is split into independent units of
`images_per_unit` images; each unit becomes one WebDataset shard, so a crashed run resumes by
redoing only the units without a complete shard.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch

from .clip.models import ClipBundle
from .clip.mpt import encode_masked
from .clip.text import TextFeatureCache
from .crops import masked_crops
from .datasets.prepared import PreparedDataset
from .inference import as_chw, proposals
from .maskformer.model import OpenVocabMaskFormer
from .matching import match_nouns_to_proposals
from .nouns import NounConfig, NounExtractor
from .shards import Pair, pair_key, write_shard


@dataclass(frozen=True)
class MiningConfig:
    masks: Literal["proposals", "gt"] = "proposals"  # where masks come from
    categories: Literal["nouns", "gt_classes"] = "nouns"  # where category names come from
    num_captions: int = 1  # captions per image whose nouns are used (paper: 1; Table 2 case 4: 5)
    top_proposals: int = 20  # proposals kept per image, by MaskFormer objectness (1 − p_void)
    mask_threshold: float = 0.5  # sigmoid threshold of a proposal's mask for its crop
    score_threshold: float | None = None  # drop pairs whose CLIP cosine is below this
    one_noun_per_proposal: bool = False  # Hungarian assignment instead of best proposal per noun
    images_per_unit: int = 100  # one unit = one shard
    image_format: Literal["jpg", "png"] = "jpg"
    max_images: int | None = None  # mine only the first N images (quick runs)
    batch_size: int = 64  # crops per CLIP forward
    nouns: Mapping[str, Any] = field(default_factory=dict)  # NounConfig options

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MiningConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown mining option(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        if cfg.masks not in ("proposals", "gt") or cfg.categories not in ("nouns", "gt_classes"):
            raise ValueError(f"mining masks must be proposals|gt and categories nouns|gt_classes, "
                             f"got {cfg.masks}/{cfg.categories}")
        if cfg.categories == "gt_classes" and cfg.masks != "gt":
            raise ValueError("categories gt_classes needs masks gt (the classes belong to the GT segments)")
        return cfg


@dataclass
class ImageMasks:
    probs: torch.Tensor  # [N, H, W] mask probabilities
    names: list[str] | None  # the GT class of each mask (masks: gt), else None


class Miner:
    """Mines the pairs of one prepared dataset with one CLIP and (for proposals) one MaskFormer."""

    def __init__(self, cfg: MiningConfig, dataset: PreparedDataset, clip: ClipBundle,
                 proposal_net: OpenVocabMaskFormer | None):
        if cfg.masks == "proposals" and proposal_net is None:
            raise ValueError("mining from proposals needs the proposal network")
        self.cfg = cfg
        self.dataset = dataset
        self.clip = clip
        self.proposal_net = proposal_net
        self.text = TextFeatureCache(clip)
        self.nouns = NounExtractor(NounConfig.from_dict(cfg.nouns)) if cfg.categories == "nouns" else None
        self.captions = dataset.captions() if cfg.categories == "nouns" else {}

    @property
    def num_images(self) -> int:
        n = len(self.dataset)
        return min(n, self.cfg.max_images) if self.cfg.max_images else n

    @property
    def num_units(self) -> int:
        return -(-self.num_images // self.cfg.images_per_unit)

    def unit_images(self, unit: int) -> range:
        start = unit * self.cfg.images_per_unit
        return range(start, min(start + self.cfg.images_per_unit, self.num_images))

    def image_masks(self, i: int, image: torch.Tensor) -> ImageMasks:
        if self.cfg.masks == "gt":
            label = torch.from_numpy(self.dataset.load_label(i))
            present = [c for c in label.unique().tolist() if c != self.dataset.ignore_label]
            probs = torch.stack([(label == c).float() for c in present]) if present else label.new_zeros(
                (0, *label.shape), dtype=torch.float32)
            return ImageMasks(probs, [self.dataset.classes[c] for c in present])
        assert self.proposal_net is not None
        props = proposals(self.proposal_net, image)
        objectness = props.class_probs.sum(dim=1)
        top = objectness.argsort(descending=True)[: self.cfg.top_proposals]
        return ImageMasks(props.mask_logits[top].sigmoid(), None)

    def categories(self, i: int, masks: ImageMasks) -> list[tuple[str, str]]:
        """(name, caption it came from) pairs, unique by name, in caption order."""
        if self.cfg.categories == "gt_classes":
            assert masks.names is not None
            return [(name, "") for name in dict.fromkeys(masks.names)]
        assert self.nouns is not None
        captions = self.captions.get(self.dataset.samples[i].id, [])
        found: dict[str, str] = {}
        for caption in captions[: self.cfg.num_captions]:
            for noun in self.nouns.nouns(caption):
                found.setdefault(noun, caption)
        return list(found.items())

    @torch.no_grad()
    def mine_image(self, i: int) -> list[Pair]:
        sample = self.dataset.samples[i]
        image = as_chw(self.dataset.load_image(i))
        masks = self.image_masks(i, image)
        cats = self.categories(i, masks)
        if not cats or masks.probs.shape[0] == 0:
            return []
        b = self.clip
        crops = masked_crops(image, masks.probs, b.image_size, b.mean, b.std, self.cfg.mask_threshold)
        if len(crops) == 0:
            return []
        feats = torch.cat([encode_masked(b, crops.crops[s:s + self.cfg.batch_size], crops.masks[s:s + self.cfg.batch_size])
                           for s in range(0, len(crops), self.cfg.batch_size)])
        if self.cfg.categories == "gt_classes":
            # each GT segment is paired with its own class; CLIP's score is kept for the record
            assert masks.names is not None
            names = [masks.names[j] for j in crops.indices.tolist()]
            text = self.text(names)
            matches = [(k, k, float(feats[k] @ text[k])) for k in range(len(names))]
            cats = [(n, "") for n in names]
        else:
            text = self.text([name for name, _ in cats])
            matches = [(m.noun_index, m.proposal_index, m.score) for m in match_nouns_to_proposals(
                feats, text, self.cfg.score_threshold, self.cfg.one_noun_per_proposal)]
        pixels = denormalize(crops.crops, b.mean, b.std)
        pairs = []
        for k, (cat_index, crop_index, score) in enumerate(matches):
            name, caption = cats[cat_index]
            pairs.append(Pair(
                key=pair_key(sample.id, k), image_id=sample.id, caption=caption, noun=name,
                proposal_index=int(crops.indices[crop_index]), score=score,
                bbox=tuple(float(v) for v in crops.boxes[crop_index].tolist()),
                crop=pixels[crop_index], mask=crops.masks[crop_index].numpy(),
                extra={"mask_source": self.cfg.masks, "category_source": self.cfg.categories}))
        return pairs

    def mine_unit(self, unit: int, out_dir: str | Path) -> dict[str, int]:
        """Mine one unit's images into shard `unit` of `out_dir` (written atomically)."""
        pairs = [p for i in self.unit_images(unit) for p in self.mine_image(i)]
        write_shard(out_dir, unit, pairs, image_format=self.cfg.image_format)
        return {"unit": unit, "pairs": len(pairs)}


def denormalize(crops: torch.Tensor, mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]
                ) -> list[np.ndarray]:
    """CLIP-normalised crops [M, 3, S, S] → uint8 HWC arrays (the crop images stored in shards)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    pixels = ((crops * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    return [p.permute(1, 2, 0).numpy() for p in pixels]
