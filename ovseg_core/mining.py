"""Mining (masked region, category) pairs: the paper's data engine (§3.2).

For every image of a captioned image set: masks (MaskFormer proposals, the ground-truth segments for
the paper's Table 2 controls, or your own from a COCO RLE file, e.g. SAM's: `mask_files`), masked crops
through THE shared `masked_crops`, CLIP image features of the crops, categories (caption nouns, or the
ground-truth class names), and each category assigned its best-matching mask by CLIP. Work is split
into independent units of `images_per_unit` images; each unit becomes one WebDataset shard, so a
crashed run resumes by redoing only the units without a complete shard.

The data path streams: DataLoader workers (`loader_workers`) decode images and extract caption nouns
ahead of the GPU; `batch_images` images go through MaskFormer together (equal-sized ones in one
forward pass) and the crops of all of them through CLIP in batches of `crop_batch`; each pair holds
its own small uint8 copies of crop and mask and is written to the unit's shard as soon as its batch
is done, so memory stays that of one batch whatever the unit's size. Models run on the miner's
`Placement` (device and precision); only the pairs' pixels come back to the host. The pairs do not
depend on the batch sizes or worker counts beyond float rounding.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.utils.data

from .clip.models import ClipBundle
from .clip.mpt import encode_masked
from .clip.text import TextFeatureCache
from .compute import CPU_FP32, Placement
from .crops import MaskedCrops, masked_crops
from .datasets.prepared import PreparedDataset
from .errors import DataError
from .inference import batch_proposals
from .loading import data_loader
from .mask_files import MaskFile
from .maskformer.model import OpenVocabMaskFormer
from .matching import match_nouns_to_proposals
from .nouns import NounConfig, NounExtractor
from .shards import Pair, PairShardWriter, pair_key


@dataclass(frozen=True)
class MiningConfig:
    masks: Literal["proposals", "gt", "file"] = "proposals"  # where masks come from
    mask_file: str | None = None  # masks "file": COCO RLE JSON of the dataset's images (`mask_files`)
    categories: Literal["nouns", "gt_classes"] = "nouns"  # where category names come from
    num_captions: int = 1  # captions per image whose nouns are used (paper: 1; Table 2 case 4: 5)
    top_proposals: int = 20  # masks kept per image, by MaskFormer objectness (1 − p_void) or a file's predicted_iou
    mask_threshold: float = 0.5  # sigmoid threshold of a proposal's mask for its crop
    score_threshold: float | None = None  # drop pairs whose CLIP cosine is below this
    one_noun_per_proposal: bool = False  # Hungarian assignment instead of best proposal per noun
    images_per_unit: int = 100  # one unit = one shard
    image_format: Literal["jpg", "png"] = "jpg"
    max_images: int | None = None  # mine only the first N images (quick runs)
    batch_images: int = 8  # images per MaskFormer forward pass (and per CLIP round)
    crop_batch: int = 256  # masked crops per CLIP forward pass
    nouns: Mapping[str, Any] = field(default_factory=dict)  # NounConfig options

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MiningConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown mining option(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        if cfg.masks not in ("proposals", "gt", "file") or cfg.categories not in ("nouns", "gt_classes"):
            raise ValueError(f"mining masks must be proposals|gt|file and categories nouns|gt_classes, "
                             f"got {cfg.masks}/{cfg.categories}")
        if (cfg.masks == "file") != (cfg.mask_file is not None):
            raise ValueError("mining masks: file and a mask_file go together (the COCO RLE JSON to read)")
        if cfg.categories == "gt_classes" and cfg.masks != "gt":
            raise ValueError("categories gt_classes needs masks gt (the classes belong to the GT segments)")
        if cfg.batch_images < 1 or cfg.crop_batch < 1:
            raise ValueError("mining batch_images and crop_batch must be >= 1")
        return cfg

    def num_images(self, dataset_size: int) -> int:
        return min(dataset_size, self.max_images) if self.max_images else dataset_size

    def num_units(self, dataset_size: int) -> int:
        return -(-self.num_images(dataset_size) // self.images_per_unit)

    def unit_images(self, unit: int, dataset_size: int) -> range:
        start = unit * self.images_per_unit
        return range(start, min(start + self.images_per_unit, self.num_images(dataset_size)))


@dataclass
class MiningInput:
    """One image, decoded (and its caption nouns extracted) by a loader worker."""

    index: int
    id: str
    image: torch.Tensor  # uint8 [3, H, W]
    label: torch.Tensor | None  # int64 [H, W] ground truth (masks: gt)
    masks: torch.Tensor | None  # bool [N, H, W] from the mask file (masks: file), best first
    categories: list[tuple[str, str]] | None  # (noun, caption it came from), unique, in caption order


class MiningImages(torch.utils.data.Dataset):
    """Item i: `MiningInput` of image i (the CPU work of mining, done in loader workers)."""

    def __init__(self, cfg: MiningConfig, dataset: PreparedDataset, nouns: NounExtractor | None,
                 captions: Mapping[str, list[str]], mask_file: MaskFile | None = None):
        self.cfg, self.dataset = cfg, dataset
        self.nouns, self.captions = nouns, captions
        self.mask_file = mask_file

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> MiningInput:
        sample = self.dataset.samples[i]
        image = torch.from_numpy(np.ascontiguousarray(self.dataset.load_image(i))).permute(2, 0, 1)
        label = torch.from_numpy(self.dataset.load_label(i)) if self.cfg.masks == "gt" else None
        masks = None
        if self.mask_file is not None:
            names = image_names(self.dataset, i)
            masks = torch.from_numpy(self.mask_file.masks(names, *image.shape[1:], limit=self.cfg.top_proposals))
        categories = None
        if self.nouns is not None:
            found: dict[str, str] = {}
            for caption in self.captions.get(sample.id, [])[: self.cfg.num_captions]:
                for noun in self.nouns.nouns(caption):
                    found.setdefault(noun, caption)
            categories = list(found.items())
        return MiningInput(i, sample.id, image, label, masks, categories)


def image_names(dataset: PreparedDataset, i: int) -> list[str]:
    """The names a mask file may know sample i by: its image's file name, its id and the file's stem."""
    path = dataset.image_path(i)
    return [path.name, dataset.samples[i].id, path.stem]


class _Indices(torch.utils.data.Sampler[int]):
    """The image indices of the current call (the loader's workers persist across calls)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def top_proposals(class_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` most object-like proposals (objectness = 1 - p(void) = the sum of p_mf over the
    classes), most object-like first; equal objectness keeps query order (a stable sort: torch's default sort
    may order ties differently on other devices and thread counts, which would change the mined pairs)."""
    objectness = class_probs.sum(dim=1)
    return torch.sort(objectness, descending=True, stable=True).indices[:k]


class Miner:
    """Mines the pairs of one prepared dataset with one CLIP and (for proposals) one MaskFormer, both on
    `placement` (they are moved there)."""

    def __init__(self, cfg: MiningConfig, dataset: PreparedDataset, clip: ClipBundle,
                 proposal_net: OpenVocabMaskFormer | None, placement: Placement = CPU_FP32, loader_workers: int = 0):
        if cfg.masks == "proposals" and proposal_net is None:
            raise ValueError("mining from proposals needs the proposal network")
        self.cfg = cfg
        self.dataset = dataset
        self.placement = placement
        self.loader_workers = loader_workers
        self.clip = clip
        clip.model.to(placement.device).eval()
        self.proposal_net = proposal_net.to(placement.device).eval() if proposal_net is not None else None
        self.text = TextFeatureCache(clip)
        self.nouns = NounExtractor(NounConfig.from_dict(cfg.nouns)) if cfg.categories == "nouns" else None
        self.captions = dataset.captions() if cfg.categories == "nouns" else {}
        self.mask_file = MaskFile.load(cfg.mask_file) if cfg.mask_file else None
        if self.mask_file is not None:
            self._check_mask_file(self.mask_file)
        self._loaders = threading.local()

    def _check_mask_file(self, mask_file: MaskFile) -> None:
        """Every image to mine needs an entry in the mask file (so that a file for other images fails here)."""
        images = range(self.cfg.num_images(len(self.dataset)))
        missing = [self.dataset.samples[i].id for i in images if mask_file.find(image_names(self.dataset, i)) is None]
        if missing:
            raise DataError(mask_file.path, f"no masks for {len(missing)} of the {len(images)} images of "
                                            f"{self.dataset.name} to mine, e.g. {missing[:3]} (by id, file name or "
                                            "stem; an image without masks needs an empty list)")

    @property
    def num_units(self) -> int:
        return self.cfg.num_units(len(self.dataset))

    def unit_images(self, unit: int) -> range:
        return self.cfg.unit_images(unit, len(self.dataset))

    def inputs(self, indices: Sequence[int]) -> Iterator[list[MiningInput]]:
        """Batches of `batch_images` decoded images, in index order, prepared by the loader workers (which
        live as long as the miner: each thread keeps its own loader, re-pointed at every call's images)."""
        loader = getattr(self._loaders, "loader", None)
        if loader is None:
            images = MiningImages(self.cfg, self.dataset, self.nouns, self.captions, self.mask_file)
            self._loaders.sampler = _Indices()
            loader = data_loader(images, self.loader_workers, batch_size=self.cfg.batch_images, collate_fn=list,
                                 sampler=self._loaders.sampler, persistent_workers=self.loader_workers > 0)
            self._loaders.loader = loader
        self._loaders.sampler.indices = list(indices)
        yield from loader

    def _masks(self, items: list[MiningInput]) -> list[tuple[torch.Tensor, list[str] | None]]:
        """Per image: masks [N, H, W] on the device (probabilities, or bool for GT segments and mask files)
        and, for GT segments, each mask's class name."""
        device = self.placement.device
        if self.cfg.masks == "file":
            return [(it.masks.to(device), None) for it in items]
        if self.cfg.masks == "gt":
            out = []
            for it in items:
                label = it.label.to(device)
                present = [c for c in label.unique().tolist() if c != self.dataset.ignore_label]
                masks = label[None] == torch.tensor(present, device=device, dtype=label.dtype).view(-1, 1, 1)
                out.append((masks, [self.dataset.classes[c] for c in present]))
            return out
        assert self.proposal_net is not None
        with self.placement.autocast():
            props = batch_proposals(self.proposal_net, [it.image for it in items])
        return [(p.mask_logits[top_proposals(p.class_probs, self.cfg.top_proposals)].sigmoid(), None) for p in props]

    @torch.no_grad()
    def mine_batch(self, items: list[MiningInput]) -> Iterator[Pair]:
        """The pairs of a batch of images, image by image in input order."""
        if self.cfg.categories == "nouns":
            items = [it for it in items if it.categories]  # no noun, no pair: skip the networks
        if not items:
            return
        b, device = self.clip, self.placement.device
        masks = self._masks(items)
        crops = [masked_crops(it.image.to(device), m, b.image_size, b.mean, b.std, self.cfg.mask_threshold)
                 for it, (m, _) in zip(items, masks)]
        all_crops = torch.cat([c.crops for c in crops])
        all_masks = torch.cat([c.masks for c in crops])
        with self.placement.autocast():
            feats = [encode_masked(b, all_crops[s:s + self.cfg.crop_batch], all_masks[s:s + self.cfg.crop_batch])
                     for s in range(0, len(all_crops), self.cfg.crop_batch)]
        features = torch.cat(feats).split([len(c) for c in crops]) if feats else [None] * len(crops)
        for it, (_, gt_names), cut, feat in zip(items, masks, crops, features):
            if len(cut):
                yield from self._pairs(it, gt_names, cut, feat)

    def _pairs(self, item: MiningInput, gt_names: list[str] | None, cut: MaskedCrops, feats: torch.Tensor
               ) -> Iterator[Pair]:
        if self.cfg.categories == "gt_classes":
            # each GT segment is paired with its own class; CLIP's score is kept for the record
            assert gt_names is not None
            cats = [(gt_names[j], "") for j in cut.indices.tolist()]
            with self.placement.autocast():
                text = self.text([name for name, _ in cats])
            matches = [(k, k, float(feats[k] @ text[k])) for k in range(len(cats))]
        else:
            cats = item.categories or []
            with self.placement.autocast():
                text = self.text([name for name, _ in cats])
            matches = [(m.noun_index, m.proposal_index, m.score) for m in match_nouns_to_proposals(
                feats, text, self.cfg.score_threshold, self.cfg.one_noun_per_proposal)]
        if not matches:
            return
        chosen = torch.tensor([crop for _, crop, _ in matches], device=cut.crops.device)
        pixels = denormalize(cut.crops[chosen], self.clip.mean, self.clip.std).cpu().numpy()
        crop_masks = cut.masks[chosen].cpu().numpy()
        for k, (cat_index, crop_index, score) in enumerate(matches):
            name, caption = cats[cat_index]
            yield Pair(
                key=pair_key(item.id, k), image_id=item.id, caption=caption, noun=name,
                proposal_index=int(cut.indices[crop_index]), score=score,
                bbox=tuple(float(v) for v in cut.boxes[crop_index].tolist()),
                crop=pixels[k].copy(), mask=crop_masks[k].copy(),
                extra={"mask_source": self.cfg.masks, "category_source": self.cfg.categories})

    def mine_images(self, indices: Sequence[int]) -> Iterator[Pair]:
        """Every pair of these images, in image order."""
        for batch in self.inputs(indices):
            yield from self.mine_batch(batch)

    def mine_unit(self, unit: int, out_dir: str | Path) -> dict[str, int]:
        """Mine one unit's images into shard `unit` of `out_dir`, streaming (written atomically)."""
        with PairShardWriter(out_dir, unit, image_format=self.cfg.image_format) as writer:
            for pair in self.mine_images(self.unit_images(unit)):
                writer.write(pair)
        return {"unit": unit, "pairs": writer.count}


def denormalize(crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP-normalised crops [M, 3, S, S] → uint8 [M, S, S, 3] (the crop images stored in shards), on
    the crops' device."""
    m = torch.tensor(mean, device=crops.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=crops.device).view(1, 3, 1, 1)
    return ((crops * s + m) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
