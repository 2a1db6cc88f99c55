import pytest
import torch

from ovseg_core.crops import mask_boxes, masked_crops

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def normalised(image: torch.Tensor) -> torch.Tensor:
    return (image.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.fixture
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 40, 50), generator=g, dtype=torch.uint8)


def test_boxes_are_tight(image):
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 5, 7] = True
    masks[0, 12, 30] = True
    masks[1, 0:40, 49] = True
    out = masked_crops(image, masks, 16, MEAN, STD)
    assert out.boxes.tolist() == [[7, 5, 31, 13], [49, 0, 50, 40]]
    assert mask_boxes(masks).tolist() == out.boxes.tolist()


def test_unresized_crop_keeps_pixels_and_fills_background_with_mean(image):
    # An L-shaped mask whose box is exactly the output size: no resampling, so pixels must be exact.
    mask = torch.zeros(1, 40, 50, dtype=torch.bool)
    mask[0, 10:26, 20:24] = True
    mask[0, 22:26, 20:36] = True
    out = masked_crops(image, mask, 16, MEAN, STD)
    assert out.boxes.tolist() == [[20, 10, 36, 26]]
    crop_mask = mask[0, 10:26, 20:36]
    assert torch.equal(out.masks[0], crop_mask)
    expected = normalised(image)[:, 10:26, 20:36]
    assert torch.allclose(out.crops[0][:, crop_mask], expected[:, crop_mask], atol=1e-6)
    background = out.crops[0][:, ~crop_mask]
    assert background.numel() > 0 and torch.all(background == 0)
    # 0 after normalisation is CLIP's mean colour
    restored = background * torch.tensor(STD).view(3, 1) + torch.tensor(MEAN).view(3, 1)
    assert torch.allclose(restored, torch.tensor(MEAN).view(3, 1).expand_as(restored))


def test_resized_crop_is_zero_exactly_outside_its_mask(image):
    mask = torch.zeros(1, 40, 50, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(50), indexing="ij")
    mask[0] = (yy - 20) ** 2 + (xx - 25) ** 2 < 12**2  # a disc: box corners are background
    out = masked_crops(image, mask, 64, MEAN, STD)
    assert out.crops.shape == (1, 3, 64, 64) and out.masks.shape == (1, 64, 64)
    assert out.masks[0].any() and (~out.masks[0]).any()
    assert torch.all(out.crops[0][:, ~out.masks[0]] == 0)
    assert not out.masks[0, 0, 0] and out.masks[0, 32, 32]
    assert (out.crops[0][:, out.masks[0]] != 0).any()


def test_threshold_and_float_masks(image):
    probs = torch.zeros(1, 40, 50)
    probs[0, 10:20, 10:20] = 0.7
    probs[0, 5:30, 5:30] += 0.3  # a weaker halo: in at threshold 0.2, out at 0.5
    strict = masked_crops(image, probs, 8, MEAN, STD, threshold=0.5)
    loose = masked_crops(image, probs, 8, MEAN, STD, threshold=0.2)
    assert strict.boxes.tolist() == [[10, 10, 20, 20]]
    assert loose.boxes.tolist() == [[5, 5, 30, 30]]
    as_bool = masked_crops(image, probs > 0.5, 8, MEAN, STD)
    assert torch.equal(as_bool.crops, strict.crops) and torch.equal(as_bool.masks, strict.masks)


def test_float_image_equals_uint8_image(image):
    mask = torch.zeros(1, 40, 50, dtype=torch.bool)
    mask[0, 3:33, 8:19] = True
    a = masked_crops(image, mask, 24, MEAN, STD)
    b = masked_crops(image.float() / 255, mask, 24, MEAN, STD)
    assert torch.allclose(a.crops, b.crops, atol=1e-6)


def test_empty_masks_dropped_with_keep_flags(image):
    masks = torch.zeros(4, 40, 50)
    masks[1, 2:4, 2:9] = 1.0
    masks[2] = 0.4  # below threshold everywhere
    masks[3, 30:35, 40:45] = 0.9
    out = masked_crops(image, masks, 8, MEAN, STD)
    assert out.keep.tolist() == [False, True, False, True]
    assert out.indices.tolist() == [1, 3]
    assert len(out) == 2 and out.boxes.tolist() == [[2, 2, 9, 4], [40, 30, 45, 35]]


def test_one_mask_and_zero_masks(image):
    one = torch.zeros(1, 40, 50, dtype=torch.bool)
    one[0, 1, 1] = True
    out = masked_crops(image, one, 8, MEAN, STD)
    assert out.crops.shape == (1, 3, 8, 8) and out.masks[0].any()
    none = masked_crops(image, torch.zeros(0, 40, 50), 8, MEAN, STD)
    assert none.crops.shape == (0, 3, 8, 8) and none.masks.shape == (0, 8, 8)
    assert none.keep.shape == (0,) and none.boxes.shape == (0, 4)
    all_empty = masked_crops(image, torch.zeros(3, 40, 50), 8, MEAN, STD)
    assert all_empty.keep.tolist() == [False] * 3 and len(all_empty) == 0


def test_thin_mask_survives_downsampling():
    image = torch.full((3, 200, 200), 128, dtype=torch.uint8)
    mask = torch.zeros(1, 200, 200, dtype=torch.bool)
    mask[0, torch.arange(200), torch.arange(200)] = True  # a one-pixel diagonal line
    out = masked_crops(image, mask, 16, MEAN, STD)
    assert out.masks[0].any()


def test_shape_errors(image):
    with pytest.raises(ValueError, match="masks must be"):
        masked_crops(image, torch.zeros(1, 10, 10), 8, MEAN, STD)
    with pytest.raises(ValueError, match="image must be"):
        masked_crops(image[0], torch.zeros(1, 40, 50), 8, MEAN, STD)
