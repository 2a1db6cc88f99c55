"""Inference: proposals (resize and sliding window), CLIP branch, ensemble, semantic map, segment."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.mpt import encode_masked
from ovseg_core.clip.text import text_features
from ovseg_core.crops import masked_crops
from ovseg_core.inference import (
    NO_MASK_LABEL,
    OUTSIDE_WINDOW_LOGIT,
    ClipBranch,
    classify_proposals,
    ensemble,
    proposals,
    segment,
    semantic_map,
)
from ovseg_core.maskformer import build_model, preset_config
from test_maskformer import class_text

torch.set_num_threads(1)


def _random_probs(q: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(q, k + 1, generator=g).softmax(-1)[:, :k]


def test_ensemble_matches_the_formula_elementwise():
    p_mf, p_clip = _random_probs(5, 4, 0), _random_probs(5, 4, 1)
    seen = torch.tensor([True, False, True, False])
    lam = 0.7
    plain = ensemble(p_mf, p_clip, lam)
    zsseg = ensemble(p_mf, p_clip, lam, seen=seen)
    for q, c in itertools.product(range(5), range(4)):
        a, b = p_mf[q, c].item(), p_clip[q, c].item()
        assert plain[q, c].item() == pytest.approx(a ** (1 - lam) * b ** lam, rel=1e-5)
        expected = a ** lam * b ** (1 - lam) if seen[c] else a ** (1 - lam) * b ** lam
        assert zsseg[q, c].item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(ensemble(p_mf, p_clip, 0.0), p_mf)
    with pytest.raises(ValueError):
        ensemble(p_mf, p_clip, 1.5)


def test_semantic_map_matches_a_per_pixel_loop():
    g = torch.Generator().manual_seed(0)
    q, k, h, w = 4, 5, 6, 7
    scores = torch.rand(q, k, generator=g)
    logits = torch.randn(q, h, w, generator=g) * 3
    full = semantic_map(scores, logits, return_scores=True)
    chunked = semantic_map(scores, logits, max_elements=2 * h * w)  # two classes at a time
    for y, x in itertools.product(range(h), range(w)):
        per_class = [sum(scores[i, c].item() / (1 + math.exp(-logits[i, y, x].item())) for i in range(q))
                     for c in range(k)]
        best = max(range(k), key=lambda c: per_class[c])
        assert full.labels[y, x].item() == best and chunked.labels[y, x].item() == best
        assert full.scores[:, y, x].tolist() == pytest.approx(per_class, rel=1e-5)
    assert chunked.scores is None


def test_semantic_map_with_one_and_with_zero_masks():
    scores = torch.tensor([[0.1, 0.7, 0.2]])
    one = semantic_map(scores, torch.randn(1, 4, 5), return_scores=True)
    assert one.labels.shape == (4, 5) and (one.labels == 1).all()
    none = semantic_map(torch.zeros(0, 3), torch.zeros(0, 4, 5), return_scores=True)
    assert (none.labels == NO_MASK_LABEL).all() and none.scores.shape == (3, 4, 5) and (none.scores == 0).all()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(preset_config("tiny", num_queries=6), class_text(4)).eval()


def test_proposals_resize_mode_equals_a_direct_forward(tiny_model):
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    props = proposals(tiny_model, image)
    with torch.no_grad():
        out = tiny_model(tiny_model.normalize(image[None]))
    expected_masks = F.interpolate(out.masks_queries_logits, size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(props.mask_logits, expected_masks, atol=1e-5)
    assert torch.allclose(props.class_probs, out.class_queries_logits[0].softmax(-1)[:, :4], atol=1e-6)

    # A non-square image of another size: masks come back at the image's size.
    props = proposals(tiny_model, torch.randint(0, 256, (3, 50, 90), dtype=torch.uint8))
    assert props.mask_logits.shape == (6, 50, 90) and props.class_probs.shape == (6, 4)
    assert (props.class_probs.sum(-1) <= 1 + 1e-6).all()  # softmax over K + 1, void dropped


@pytest.mark.parametrize("height, width, size", [(50, 90, None), (90, 50, 96), (37, 41, None), (120, 200, None)])
def test_proposals_at_other_sizes_resize_pad_and_return_to_the_image(tiny_model, height, width, size):
    """Images that are not the model's input size, from the docstring's recipe written out step by step: short
    side resized to `size` (crop size by default), padded on the right and bottom to the backbone's stride with
    the mean colour (0 after normalisation), masks upsampled to the padded input, the padding cut off, and the
    result resized to the image."""
    g = torch.Generator().manual_seed(height * width)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    props = proposals(tiny_model, image, size=size)

    short = size or tiny_model.net.crop_size
    rh, rw = round(height * short / min(height, width)), round(width * short / min(height, width))
    assert min(rh, rw) == short
    resized = F.interpolate(image[None].float(), size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    stride = tiny_model.net.size_divisibility
    ph, pw = math.ceil(rh / stride) * stride, math.ceil(rw / stride) * stride
    padded = torch.zeros(1, 3, ph, pw)
    padded[..., :rh, :rw] = tiny_model.normalize(resized)
    with torch.no_grad():
        out = tiny_model(pixel_values=padded)
    masks = F.interpolate(out.masks_queries_logits, size=(ph, pw), mode="bilinear", align_corners=False)
    expected = F.interpolate(masks[..., :rh, :rw], size=(height, width), mode="bilinear", align_corners=False)[0]
    assert props.mask_logits.shape == (6, height, width)
    assert torch.allclose(props.mask_logits, expected, atol=1e-5)
    assert torch.allclose(props.class_probs, out.class_queries_logits[0].softmax(-1)[:, :4], atol=1e-6)


def test_proposals_sliding_windows(tiny_model):
    image = torch.randint(0, 256, (3, 64, 150), dtype=torch.uint8)
    props = proposals(tiny_model, image, mode="slide", stride=40)
    starts = [0, 40, 80, 86]  # the last window ends at the right edge
    assert props.mask_logits.shape == (6 * len(starts), 64, 150)
    for n, x in enumerate(starts):
        window = props.mask_logits[6 * n:6 * (n + 1)]
        direct = proposals(tiny_model, image[:, :, x:x + 64])
        assert torch.allclose(window[:, :, x:x + 64], direct.mask_logits, atol=1e-4)
        assert torch.allclose(props.class_probs[6 * n:6 * (n + 1)], direct.class_probs, rtol=1e-3, atol=1e-5)
        outside = torch.ones(64, 150, dtype=torch.bool)
        outside[:, x:x + 64] = False
        assert (window[:, outside] == OUTSIDE_WINDOW_LOGIT).all()


@pytest.fixture(scope="module")
def clip_setup():
    torch.manual_seed(0)
    bundle = load_clip("ovseg-tiny-vit")
    names = ["sand", "water", "box", "ball"]
    text = text_features(bundle, names)
    model = build_model(preset_config("tiny", num_queries=6), text).eval()
    branch = ClipBranch(encode=lambda crops, masks: encode_masked(bundle, crops, masks), text_features=text,
                        size=bundle.image_size, mean=bundle.mean, std=bundle.std, threshold=0.5)
    return bundle, model, branch, text


def test_classify_proposals_uses_surviving_masked_crops(clip_setup):
    bundle, _, branch, text = clip_setup
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    masks = torch.zeros(3, 40, 40)
    masks[1, 5:20, 10:30] = 0.9  # the only mask above the threshold
    masks[2] = 0.3
    scores = classify_proposals(image, masks, branch.encode, text, bundle.image_size, bundle.mean, bundle.std, 0.5)
    assert scores.keep.tolist() == [False, True, False] and scores.probs.shape == (1, 4)
    crops = masked_crops(image, masks, bundle.image_size, bundle.mean, bundle.std, 0.5)
    features = encode_masked(bundle, crops.crops, crops.masks)
    assert torch.allclose(scores.probs, (100 * features @ text.T).softmax(-1), atol=1e-5)
    none = classify_proposals(image, masks * 0, branch.encode, text, bundle.image_size, bundle.mean, bundle.std, 0.5)
    assert none.probs.shape == (0, 4) and not none.keep.any()


def test_clip_scores_and_the_semantic_map_stay_fp32_inside_a_bf16_autocast(clip_setup):
    """The networks run in the caller's bf16 autocast (compute.precision), the scores after them in fp32."""
    bundle, _, branch, text = clip_setup
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    masks = torch.zeros(2, 40, 40)
    masks[0, 5:20, 10:30] = masks[1, 15:35, 2:25] = 0.9
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with bf16:
        scores = classify_proposals(image, masks, branch.encode, text, bundle.image_size, bundle.mean, bundle.std,
                                    0.5)
        crops = masked_crops(image, masks, bundle.image_size, bundle.mean, bundle.std, 0.5)
        features = encode_masked(bundle, crops.crops, crops.masks)
    assert scores.probs.dtype == torch.float32
    expected = (100 * F.normalize(features.float(), dim=-1) @ text.T).softmax(-1)
    assert torch.allclose(scores.probs, expected, atol=1e-6)

    g = torch.Generator().manual_seed(0)
    class_scores = torch.rand(60, 50, generator=g)
    logits = torch.randn(60, 64, 64, generator=g)
    fp32 = semantic_map(class_scores, logits, return_scores=True)
    with bf16:
        inside = semantic_map(class_scores, logits, return_scores=True)
        chunked = semantic_map(class_scores, logits, max_elements=7 * 64 * 64)
    assert inside.scores.dtype == torch.float32 and torch.allclose(inside.scores, fp32.scores)
    assert torch.equal(inside.labels, fp32.labels) and torch.equal(chunked.labels, fp32.labels)


def test_segment_composes_proposals_clip_and_ensemble(clip_setup):
    _, model, branch, text = clip_setup
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    seg = segment(model, image, text, clip=branch, lam=0.7, return_score_maps=True)
    props = proposals(model, image)
    clip = classify_proposals(image, props.mask_logits.sigmoid(), branch.encode, text, branch.size, branch.mean,
                              branch.std, branch.threshold)
    assert clip.keep.any() and seg.mask_indices.tolist() == clip.keep.nonzero().flatten().tolist()
    expected = props.class_probs[clip.keep] ** 0.3 * clip.probs ** 0.7
    assert torch.allclose(seg.class_scores, expected, atol=1e-6)
    expected_map = semantic_map(expected, props.mask_logits[clip.keep], return_scores=True)
    assert torch.equal(seg.labels, expected_map.labels)
    assert torch.allclose(seg.score_maps, expected_map.scores, atol=1e-5)

    # No mask survives the threshold: MaskFormer's own scores over all proposals, every pixel labelled.
    strict = ClipBranch(**{**branch.__dict__, "threshold": 1.0})
    fallback = segment(model, image, clip=strict, lam=0.7)
    alone = segment(model, image)
    assert torch.equal(fallback.labels, alone.labels) and fallback.mask_indices.numel() == 6
    assert (alone.labels >= 0).all() and (alone.labels < 4).all()

    # Another vocabulary: K changes everywhere.
    five = torch.cat([text, class_text(1, dim=text.shape[1], seed=5)])
    other = segment(model, image, five, clip=ClipBranch(**{**branch.__dict__, "text_features": five}), lam=0.5)
    assert other.class_scores.shape[1] == 5
    with pytest.raises(ValueError, match="CLIP branch"):
        segment(model, image, lam=0.7)
