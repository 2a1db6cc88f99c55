import math

import pytest
import torch

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.mpt import MaskPrompts, encode_masked
from ovseg_core.clip.text import text_features
from ovseg_core.clip.zeroshot import zero_shot_accuracy
from ovseg_core.clip.zeroshot import zero_shot_predict
from ovseg_core.clip import zeroshot

torch.set_num_threads(1)

CLASSES = ["cat", "dog", "teapot", "grass"]


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_clip("ovseg-tiny-vit")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(10, 64, 64, dtype=torch.bool)
    masks[:, 10:50, 20:44] = True
    return torch.randn(10, 3, 64, 64, generator=g) * masks[:, None], masks


def test_predictions_are_the_argmax_over_the_text_classifier(bundle, data):
    images, masks = data
    with torch.no_grad():
        expected = (encode_masked(bundle, images) @ text_features(bundle, CLASSES).T).argmax(dim=1)
    assert torch.equal(zero_shot_predict(bundle, images, None, CLASSES, batch_size=3), expected)


def test_predictions_inside_a_bf16_autocast_are_the_argmax_of_fp32_cosines(bundle, monkeypatch):
    """The probe runs under the stage's autocast; bf16 cosines (about 3 significant digits) would tie or flip classes
    whose cosines differ in the 4th digit. Features and text are set here, so that every image is such a near-tie."""
    g = torch.Generator().manual_seed(4)
    text = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)
    base = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1)
    gap = text[1] - text[0]  # move each feature along it until the two cosines differ by ±1e-4
    offset = ((base @ text[0] - base @ text[1]) + 1e-4 * torch.randn(64, generator=g).sign()) / gap.dot(gap)
    features = base + offset[:, None] * gap
    monkeypatch.setattr(zeroshot, "text_features", lambda bundle, names: text)
    monkeypatch.setattr(zeroshot, "encode_masked", lambda bundle, images, masks, prompts: features[: len(images)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predicted = zeroshot.zero_shot_predict(bundle, torch.zeros(64, 3, 64, 64), None, ["a", "b"])
    assert torch.equal(predicted, (features @ text.T).argmax(dim=1))


def test_accuracy_overall_and_per_class(bundle, data):
    images, masks = data
    predicted = zero_shot_predict(bundle, images, None, CLASSES)
    labels = predicted.clone()
    labels[:4] = (labels[:4] + 1) % len(CLASSES)  # 4 of 10 wrong
    result = zero_shot_accuracy(bundle, images, None, labels, CLASSES)
    assert result.accuracy == pytest.approx(0.6)
    assert sum(result.counts.values()) == 10
    for name, count in result.counts.items():
        k = CLASSES.index(name)
        of_class = labels == k
        assert count == int(of_class.sum())
        assert result.per_class[name] == pytest.approx(float((predicted[of_class] == k).float().mean()))
    assert result.subset_accuracy(CLASSES) == pytest.approx(0.6)
    assert math.isnan(result.subset_accuracy(["nothing"]))


def test_prompts_are_used_and_need_masks(bundle, data):
    images, masks = data
    prompts = MaskPrompts.for_visual(bundle.model.visual, 3, init_std=1.0)
    labels = torch.zeros(10, dtype=torch.long)
    with_prompts = zero_shot_accuracy(bundle, images, masks, labels, CLASSES, prompts=prompts)
    with torch.no_grad():
        expected = (encode_masked(bundle, images, masks, prompts) @ text_features(bundle, CLASSES).T).argmax(dim=1)
    assert with_prompts.accuracy == pytest.approx(float((expected == 0).float().mean()))
    with pytest.raises(ValueError, match="masks"):
        zero_shot_accuracy(bundle, images, None, labels, CLASSES, prompts=prompts)
