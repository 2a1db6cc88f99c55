"""What a mined pair is, checked field by field against an independent computation on a few tiny-world images.

For each variant (proposals-nouns, gt-nouns, gt-classes) the pairs are mined into a real shard and read back;
each pair is then recomputed from scratch: the image's masks (the proposal network's top-k queries by
objectness, or the ground-truth segments), `masked_crops` of those masks, CLIP's score of every crop against
the noun by brute force, and the noun's source (the image's first caption, or the segment's GT class). The
round trip shard → `MinedPairSamples` must give training the crop and mask that inference computes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import NLTK_DATA
from ovseg_core.clip.models import ClipBundle, load_clip
from ovseg_core.clip.mpt import encode_masked
from ovseg_core.clip.pairs import MinedPairSamples
from ovseg_core.clip.text import text_features
from ovseg_core.crops import MaskedCrops, masked_crops
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.inference import proposals
from ovseg_core.maskformer.model import OpenVocabMaskFormer, load_model
from ovseg_core.mining import Miner, MiningConfig, top_proposals
from ovseg_core.nouns import NounConfig, NounExtractor
from ovseg_core.shards import PairDataset, finalize_dataset

IMAGES = 4  # one unit, one shard
TOP_PROPOSALS = 6  # of the tiny MaskFormer's 24 queries: the selection matters
# The random-init network's mask probabilities peak at 0.502..0.505: this threshold empties some of the top-k
# proposals (asserted), so a pair's proposal_index (into the masks) and its crop's index (into the non-empty
# ones) differ.
MASK_THRESHOLD = 0.5025
VARIANTS = {
    "proposals-nouns": {"masks": "proposals", "categories": "nouns"},
    "gt-nouns": {"masks": "gt", "categories": "nouns"},
    "gt-classes": {"masks": "gt", "categories": "gt_classes"},
}
# Mining encodes the crops of all images in one CLIP batch, this test those of one image: float rounding only.
SCORE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Models:
    clip: ClipBundle
    net: OpenVocabMaskFormer
    dataset: PreparedDataset
    nouns: NounExtractor


def noun_settings(tiny_world) -> dict[str, str]:
    return {"tagger": f"trained:{tiny_world.tagged_captions}", "nltk_data": str(NLTK_DATA)}


@pytest.fixture(scope="module")
def models(tiny_world, tiny_models) -> Models:
    net = load_model(tiny_models.proposal_net)[0].eval()
    # At the default scale (100) the random-init network's p_void is ~1e-7 for most queries, so their fp32
    # objectness ties at 1.0 and any order of them is "top-k"; a cooler softmax spreads it out.
    net.class_predictor.logit_scale = 5.0
    nouns = NounExtractor(NounConfig.from_dict(noun_settings(tiny_world)))
    return Models(load_clip(tiny_models.clip_arch, tiny_models.clip), net, PreparedDataset.load(tiny_world.coco), nouns)


def mine(models: Models, tiny_world, out: Path, variant: str, image_format: str = "png") -> PairDataset:
    """Mine the first IMAGES images into one shard under `out` (the stage's writer and finalizer), read back."""
    cfg = MiningConfig.from_dict({
        **VARIANTS[variant], "top_proposals": TOP_PROPOSALS, "images_per_unit": IMAGES, "max_images": IMAGES,
        "mask_threshold": MASK_THRESHOLD, "image_format": image_format, "batch_images": 2, "crop_batch": 5,
        "nouns": noun_settings(tiny_world)})
    miner = Miner(cfg, models.dataset, models.clip, models.net if cfg.masks == "proposals" else None)
    miner.mine_unit(0, out)
    finalize_dataset(out, {"variant": variant}, expected_units=1)
    return PairDataset(out)


@pytest.fixture(scope="module", params=list(VARIANTS))
def mined(request, models, tiny_world, tmp_path_factory) -> tuple[str, PairDataset]:
    """(variant, its pairs): each variant mined once."""
    return request.param, mine(models, tiny_world, tmp_path_factory.mktemp(request.param), request.param)


def present_classes(label: np.ndarray, ignore: int) -> list[int]:
    return sorted(int(c) for c in np.unique(label) if c != ignore)


def reference_masks(models: Models, variant: str, i: int) -> torch.Tensor:
    """The masks mining must have cropped for image i, in proposal_index order: the TOP_PROPOSALS queries of
    highest objectness (1 − p_void, i.e. the non-void class probabilities summed) with their sigmoid mask
    probabilities, or one boolean mask per GT class present, by class id."""
    if VARIANTS[variant]["masks"] == "gt":
        label = models.dataset.load_label(i)
        return torch.from_numpy(np.stack([label == c for c in present_classes(label, models.dataset.ignore_label)]))
    props = proposals(models.net, models.dataset.load_image(i))
    objectness = props.class_probs.sum(dim=1).tolist()
    top = sorted(range(len(objectness)), key=lambda q: -objectness[q])[:TOP_PROPOSALS]
    rest = set(range(len(objectness))) - set(top)
    assert min(objectness[q] for q in top) > max(objectness[q] for q in rest) + 1e-4  # a well-defined top-k
    ranked = [objectness[q] for q in top]  # and a well-defined order among them (the rest's order is unused)
    assert min(a - b for a, b in zip(ranked, ranked[1:])) > 1e-6
    return props.mask_logits[top].sigmoid()


def crops_of(models: Models, i: int, masks: torch.Tensor) -> MaskedCrops:
    b = models.clip
    return masked_crops(torch.from_numpy(models.dataset.load_image(i)).permute(2, 0, 1), masks, b.image_size,
                        b.mean, b.std, MASK_THRESHOLD)


def as_uint8(crops: torch.Tensor, mean: Any, std: Any) -> np.ndarray:
    """CLIP-normalised [M, 3, S, S] → the uint8 [M, S, S, 3] pixels they stand for."""
    pixels = crops * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 (exclusive ends) of a non-empty boolean mask."""
    rows, cols = np.nonzero(mask)
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def pairs_by_image(pairs: PairDataset) -> dict[str, list[tuple[np.ndarray, np.ndarray, str, dict[str, Any]]]]:
    out: dict[str, list] = {}
    for k in range(len(pairs)):
        item = pairs[k]
        out.setdefault(item[3]["image_id"], []).append(item)
    return out


def test_every_field_of_every_pair(mined, models):
    variant, pairs_of_variant = mined
    b, ds = models.clip, models.dataset
    captions = ds.captions()
    by_image = pairs_by_image(pairs_of_variant)
    assert set(by_image) <= {s.id for s in ds.samples[:IMAGES]}
    checked = empty = 0
    for i in range(IMAGES):
        image_id = ds.samples[i].id
        pairs = by_image.get(image_id, [])
        if VARIANTS[variant]["categories"] == "nouns":
            caption = captions[image_id][0]  # num_captions 1: the first caption only
            expected_nouns = models.nouns.nouns(caption)
            words = set(re.findall(r"[a-z]+", caption.lower()))
            assert all(noun in words for noun in expected_nouns)
        else:
            caption = ""
            expected_nouns = [ds.classes[c] for c in present_classes(ds.load_label(i), ds.ignore_label)]
        masks = reference_masks(models, variant, i)
        cut = crops_of(models, i, masks)
        kept = cut.indices.tolist()
        empty += len(masks) - len(kept)
        # no score threshold and no one-noun-per-proposal: every noun (class) gets exactly one pair, if any crop
        assert sorted(p[2] for p in pairs) == (sorted(expected_nouns) if kept else []), image_id
        with torch.no_grad():
            crop_features = encode_masked(b, cut.crops)
        binary = (masks > MASK_THRESHOLD if masks.dtype != torch.bool else masks).numpy()
        for crop, mask, noun, meta in pairs:
            assert meta["caption"] == caption and meta["noun"] == noun
            proposal = meta["proposal_index"]
            assert proposal in kept  # a proposal whose mask is empty after thresholding has no crop
            c = kept.index(proposal)
            with torch.no_grad():
                scores = (crop_features @ text_features(b, [noun])[0]).numpy()
            if variant == "gt-classes":  # the segment is the noun's own GT region
                assert noun == ds.classes[present_classes(ds.load_label(i), ds.ignore_label)[proposal]]
            else:  # CLIP's best crop for the noun, by brute force over all crops
                assert scores[c] >= scores.max() - SCORE_TOLERANCE, (image_id, noun, scores, c)
            assert meta["score"] == pytest.approx(float(scores[c]), abs=SCORE_TOLERANCE)
            np.testing.assert_array_equal(mask, cut.masks[c].numpy())
            np.testing.assert_array_equal(crop, as_uint8(cut.crops[c:c + 1], b.mean, b.std)[0])
            assert tuple(meta["bbox"]) == box_of(binary[proposal])
            checked += 1
    assert checked >= 2 * IMAGES
    assert empty > 0 or VARIANTS[variant]["masks"] == "gt"


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_training_sample_is_what_mining_stored_and_inference_computes(image_format, models, tiny_world, tmp_path):
    """`MinedPairSamples` item = (normalised crop, mask, noun) of the pair, equal to the inference-side
    `masked_crops` of the same proposal: to within uint8 storage (half a grey level) for PNG; for JPEG (quality
    95, no chroma subsampling) within JPEG's loss (see the bounds below)."""
    b = models.clip
    pairs = mine(models, tiny_world, tmp_path / "mined", "proposals-nouns", image_format)
    samples = MinedPairSamples(tmp_path / "mined", b.image_size, b.mean, b.std)
    assert len(samples) == len(pairs) > 0
    ids = [s.id for s in models.dataset.samples]
    std = torch.tensor(b.std).view(3, 1, 1)
    cuts = {i: crops_of(models, i, reference_masks(models, "proposals-nouns", i)) for i in range(IMAGES)}
    errors = []
    for k in range(len(samples)):
        pixels, mask, noun = samples[k]
        _, _, stored_noun, meta = pairs[k]
        cut = cuts[ids.index(meta["image_id"])]
        c = cut.indices.tolist().index(meta["proposal_index"])
        assert noun == stored_noun == meta["noun"]
        assert torch.equal(mask, cut.masks[c])  # masks are stored losslessly in every format
        # in grey levels (0..255) of the unnormalised image
        errors.append(((pixels - cut.crops[c]) * std * 255).abs())
    error = torch.stack(errors)
    stats = (f"{image_format} round trip: max {error.max():.2f}, mean {error.mean():.2f}, "
             f"99th percentile {error.flatten().quantile(0.99):.2f} grey levels")
    print(stats)
    if image_format == "png":
        assert error.max() <= 0.5 + 1e-3, stats  # the uint8 rounding of the stored crop, nothing else
    else:
        # JPEG's quantisation noise on the world's fine textures (measured: mean ~2, 99th percentile ~10,
        # max ~23 grey levels, the largest where texture meets the flat background); a crop of another
        # proposal or a wrong normalisation is off by tens of levels on average
        assert error.mean() <= 3 and error.flatten().quantile(0.99) <= 16 and error.max() <= 40, stats


def test_top_proposals_rank_by_objectness_and_keep_query_order_on_ties():
    # objectness (the non-void class probabilities summed) per query, exact in binary: 0.5, 0.75, 0.625, 0.75,
    # 0.25, 0.625, 0.75
    class_probs = torch.tensor([[0.25, 0.25], [0.5, 0.25], [0.625, 0.0], [0.375, 0.375], [0.125, 0.125],
                                [0.0, 0.625], [0.75, 0.0]])
    by_hand = [1, 3, 6, 2, 5, 0, 4]  # most object-like first; equal objectness in query order
    assert top_proposals(class_probs, 7).tolist() == by_hand
    assert top_proposals(class_probs, 4).tolist() == by_hand[:4]  # the tie at 0.625 is cut by query order
    # a hundred tied queries (as an untrained head gives them): the first k, whatever the sort's algorithm
    assert top_proposals(torch.full((100, 3), 0.3), 16).tolist() == list(range(16))
