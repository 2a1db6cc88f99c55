import numpy as np
import pytest
import torch
from PIL import Image
from numpy.lib.stride_tricks import sliding_window_view
from scipy.spatial.distance import pdist

from ovseg_core.visualize import (
    GAP,
    LINE,
    grid_figure,
    label_to_png,
    overlay,
    palette,
    save_image,
    save_label_png,
)

IGNORE = 255
NAMES = ["sky", "grass", "road", "dog", "cat", "traffic light", "kite"]


def has_solid_block(region: np.ndarray, colour, size: int = 8) -> bool:
    """Whether `region` holds a size×size block of exactly `colour` (a legend swatch, not text)."""
    mask = (region == np.asarray(colour, np.uint8)).all(axis=2)
    return bool(sliding_window_view(mask, (size, size)).all(axis=(2, 3)).any())


def expected_blend(image, label, alpha, scale):
    colours = palette(len(NAMES))[np.where(label == IGNORE, 0, label)]
    colours[label == IGNORE] = 0
    out = (1 - alpha) * image.astype(np.float64) + alpha * colours
    return np.repeat(np.repeat(out, scale, axis=0), scale, axis=1)


def scene(rng, classes, size=64):
    image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    label = rng.choice(classes, size=(size, size))
    return image, label


def test_palette_is_distinct_fixed_and_never_black():
    colours = palette(1000).astype(np.float64)
    assert len(np.unique(colours, axis=0)) == 1000
    assert pdist(colours).min() >= 10.0  # RGB distance between any two of 1000 classes
    assert pdist(colours[:20]).min() >= 60.0  # small vocabularies get very different colours
    assert np.linalg.norm(colours, axis=1).min() >= 60.0  # far from the ignore colour (black)
    assert np.array_equal(palette(20), palette(1000)[:20])  # class i's colour does not depend on K
    assert np.array_equal(palette(1000), palette(1000))


def test_overlay_size_content_and_legend():
    rng = np.random.default_rng(0)
    image, label = scene(rng, [0, 3, 5, IGNORE])
    fig = np.asarray(overlay(image, torch.from_numpy(label), NAMES, alpha=0.4))
    assert fig.shape[1] == 256 and fig.shape[0] > 256 + LINE  # 64 px enlarged ×4, legend below
    assert np.abs(fig[:256].astype(np.float64) - expected_blend(image, label, 0.4, 4)).max() <= 1
    legend = fig[256:]
    colours = palette(len(NAMES))
    for c in range(len(NAMES)):
        assert has_solid_block(legend, colours[c]) == (c in (0, 3, 5)), NAMES[c]
    assert has_solid_block(legend, (0, 0, 0))  # ignore pixels present: black "ignore" swatch
    _, no_ignore = scene(rng, [1, 2])
    legend = np.asarray(overlay(image, no_ignore, NAMES))[256:]
    assert not has_solid_block(legend, (0, 0, 0))
    assert has_solid_block(legend, colours[1]) and has_solid_block(legend, colours[2])


def test_overlay_keeps_large_images_and_rejects_bad_input():
    image = np.zeros((300, 400, 3), np.uint8)
    label = np.zeros((300, 400), np.int64)
    assert overlay(image, label, NAMES).size[1] > 300 and overlay(image, label, NAMES).size[0] == 400
    with pytest.raises(ValueError, match="shape"):
        overlay(image, label[:, :10], NAMES)
    with pytest.raises(ValueError, match=r"\[7\]"):
        overlay(image, np.full((300, 400), 7), NAMES)
    with pytest.raises(ValueError, match="RGB uint8"):
        overlay(image.astype(np.float32), label, NAMES)


def test_grid_layout_and_shared_legend():
    rng = np.random.default_rng(1)
    rows = []
    for gt_classes, pred_classes in [([0, 1, IGNORE], [0, 1]), ([2, 3], [2, 4])]:
        image, gt = scene(rng, gt_classes)
        rows.append((image, gt, rng.choice(pred_classes, size=gt.shape)))
    fig = np.asarray(grid_figure(rows, NAMES, IGNORE, titles=["a", "b"], alpha=0.6))
    assert fig.shape[1] == 3 * 256 + 4 * GAP
    y = GAP + LINE
    for image, gt, pred in rows:
        y += LINE  # row title
        panels = [fig[y:y + 256, GAP + c * (256 + GAP):][:, :256].astype(np.float64) for c in range(3)]
        assert np.array_equal(panels[0], np.repeat(np.repeat(image, 4, axis=0), 4, axis=1))
        assert np.abs(panels[1] - expected_blend(image, gt, 0.6, 4)).max() <= 1
        assert np.abs(panels[2] - expected_blend(image, pred, 0.6, 4)).max() <= 1
        y += 256 + GAP
    legend = fig[y:]
    assert legend.shape[0] > LINE
    colours = palette(len(NAMES))
    for c in range(len(NAMES)):
        assert has_solid_block(legend, colours[c]) == (c in (0, 1, 2, 3, 4)), NAMES[c]
    assert has_solid_block(legend, (0, 0, 0))
    with pytest.raises(ValueError, match="titles"):
        grid_figure(rows, NAMES, IGNORE, titles=["only one"])


def test_label_to_png_and_raw_label_png(tmp_path):
    label = np.array([[0, 1], [6, IGNORE]])
    rgb = np.asarray(label_to_png(label))
    assert rgb.shape == (2, 2, 3)
    assert np.array_equal(rgb[0, 1], palette(7)[1]) and np.array_equal(rgb[1, 0], palette(7)[6])
    assert np.array_equal(rgb[1, 1], [0, 0, 0])
    save_image(tmp_path / "colour.png", label_to_png(label))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "colour.png")), rgb)

    save_label_png(tmp_path / "ids8.png", label)
    with Image.open(tmp_path / "ids8.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), label)
    wide = np.array([[0, 846], [65535, 300]])
    save_label_png(tmp_path / "ids16.png", wide, ignore_label=65535)
    with Image.open(tmp_path / "ids16.png") as im:
        assert np.array_equal(np.asarray(im, dtype=np.int64), wide)
    with pytest.raises(ValueError, match="uint8"):
        save_label_png(tmp_path / "too_big.png", wide)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colour.png", "ids16.png", "ids8.png"]
