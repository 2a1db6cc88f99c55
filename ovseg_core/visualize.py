"""Colour-coded label maps, overlays with a legend, and qualitative grids (input | GT | prediction).

Class i always gets `palette(n)[i]`, whatever n: the palette is one fixed greedy sequence, so a short
palette is a prefix of a long one. The ignore label is black. Small images are enlarged by an integer
factor with nearest-neighbour sampling (the embedded world's scenes are 64 px) so that every panel
is at least `MIN_SIZE` pixels on its shorter side. Legends list only the classes that occur.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_file
from .datasets.prepared import save_label
from .metrics import ArrayLike, as_label_array, ids_outside

Color = tuple[int, int, int]
IGNORE_COLOR: Color = (0, 0, 0)
IGNORE_NAME = "ignore"
MIN_SIZE = 256
GAP = 8  # margin around and between panels, in pixels
LINE = 16  # height of one line of text or legend entry
SWATCH = 12  # side of a legend colour swatch
FONT_SIZE = 12
COLUMN_TITLES = ("input", "ground truth", "prediction")
# The table of contents of an examples folder (image, ground truth and each branch's prediction per sample):
# `evaluate` writes it, the report reads it.
EXAMPLES_INDEX = "index.json"
_LEVELS = 32  # candidate colours: 32 levels per channel, 32,768 in all
_MIN_LIGHTNESS = 25.0  # CIELAB L* below which a candidate is too close to black
MAX_CLASSES = 4096  # well above ADE-847 and Pascal Context-459; more would not stay distinguishable
_BLOCK = 1024  # the palette sequence is computed in blocks of this many colours


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    # Written out (the standard D65 formulas): no colour-science library is installed, and PIL's
    # ImageCms rounds Lab to 8 bits in a littleCMS-build-dependent way, which would make the palette
    # differ between machines.
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (linear @ to_xyz.T) / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@functools.lru_cache(maxsize=2)
def _palette_sequence(length: int) -> np.ndarray:
    levels = np.linspace(0, 255, _LEVELS).round()
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = _srgb_to_lab(candidates)
    # Near-black colours are left out so that the ignore colour stands apart.
    keep = lab[:, 0] >= _MIN_LIGHTNESS
    candidates, lab = candidates[keep], lab[keep]
    # Greedy farthest-point sampling in CIELAB: each colour is the candidate farthest from all
    # colours already chosen and from black (the ignore colour).
    dist = np.linalg.norm(lab - _srgb_to_lab(np.array([IGNORE_COLOR])), axis=1)
    chosen = np.empty(length, np.int64)
    for i in range(length):
        chosen[i] = j = int(np.argmax(dist))
        dist = np.minimum(dist, np.linalg.norm(lab - lab[j], axis=1))
    out = candidates[chosen].astype(np.uint8)
    out.setflags(write=False)
    return out


def palette(num_classes: int) -> np.ndarray:
    """[num_classes, 3] uint8 colours, visually distinct and never black; colour i is independent of
    num_classes."""
    if num_classes > MAX_CLASSES:
        raise ValueError(f"the palette has at most {MAX_CLASSES} colours, {num_classes} requested")
    return _palette_sequence(_BLOCK * max(1, math.ceil(num_classes / _BLOCK)))[:num_classes]


def colorize(label: ArrayLike, ignore_label: int = 255) -> np.ndarray:
    """RGB uint8 [H, W, 3] colour map of a label map; ignore pixels are black."""
    lab = as_label_array(label, "label")
    valid = lab != ignore_label
    ids = lab[valid]
    if bad := ids_outside(ids, MAX_CLASSES):
        raise ValueError(f"label holds ids {bad} that are neither class ids nor the ignore label {ignore_label}")
    out = np.zeros(lab.shape + (3,), np.uint8)
    if ids.size:
        out[valid] = palette(int(ids.max()) + 1)[ids]
    return out


def label_to_png(label: ArrayLike, ignore_label: int = 255) -> Image.Image:
    """The colour map of `label` as an RGB image (save it with `save_image`)."""
    return Image.fromarray(colorize(label, ignore_label))


def save_image(path: str | Path, image: Image.Image) -> None:
    """Save a PIL image atomically; the format follows the file extension."""
    path = Path(path)
    with atomic_file(path, suffix=path.suffix) as tmp:
        image.save(tmp)


def save_label_png(path: str | Path, label: ArrayLike, ignore_label: int = 255) -> None:
    """Save raw class ids as a PNG atomically: uint8 when the ignore label is 255, uint16 otherwise."""
    lab = as_label_array(label, "label")
    limit = 256 if ignore_label == 255 else 65536
    if bad := ids_outside(lab, limit):
        raise ValueError(f"{path}: label ids {bad} do not fit a {'uint8' if limit == 256 else 'uint16'} PNG")
    with atomic_file(path, suffix=".png") as tmp:
        save_label(tmp, lab, ignore_label)


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _check_image(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image must be RGB uint8 [H, W, 3], got {a.dtype} {a.shape}")
    return a


def _check_label(label: ArrayLike, image: np.ndarray, num_classes: int, ignore_label: int,
                 what: str) -> np.ndarray:
    lab = as_label_array(label, what)
    if lab.shape != image.shape[:2]:
        raise ValueError(f"{what} shape {lab.shape} differs from image shape {image.shape[:2]}")
    if bad := ids_outside(lab[lab != ignore_label], num_classes):
        raise ValueError(f"{what} holds ids {bad} outside 0..{num_classes - 1} (ignore {ignore_label})")
    return lab


def _scale(image: np.ndarray, min_size: int) -> int:
    return max(1, math.ceil(min_size / min(image.shape[:2])))


def _enlarge(image: np.ndarray, scale: int) -> Image.Image:
    h, w = image.shape[:2]
    return Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)


def _blend(image: np.ndarray, label: np.ndarray, alpha: float, ignore_label: int, scale: int) -> Image.Image:
    colours = colorize(label, ignore_label)
    blended = np.asarray(Image.blend(Image.fromarray(image), Image.fromarray(colours), alpha))
    return _enlarge(blended, scale)


def _legend_entries(labels: Sequence[np.ndarray], class_names: Sequence[str],
                    ignore_label: int) -> list[tuple[str, Color]]:
    present = np.unique(np.concatenate([lab.ravel() for lab in labels]))
    ids = [int(i) for i in present if i != ignore_label]
    colours = palette(len(class_names))
    entries = [(class_names[i], tuple(int(v) for v in colours[i])) for i in ids]
    if len(ids) < len(present):
        entries.append((IGNORE_NAME, IGNORE_COLOR))
    return entries


def _legend(entries: list[tuple[str, Color]], width: int) -> Image.Image:
    """Swatch + name entries in as many columns as fit `width`, filled column by column."""
    font = _font()
    text_w = max((math.ceil(font.getlength(name)) for name, _ in entries), default=0)
    entry_w = SWATCH + 4 + text_w + GAP
    ncols = max(1, (width - GAP) // entry_w)
    nrows = math.ceil(len(entries) / ncols)
    legend = Image.new("RGB", (max(width, GAP + entry_w), 2 * GAP + nrows * LINE), "white")
    draw = ImageDraw.Draw(legend)
    for k, (name, colour) in enumerate(entries):
        x = GAP + (k // nrows) * entry_w
        y = GAP + (k % nrows) * LINE
        top = y + (LINE - SWATCH) // 2
        draw.rectangle([x, top, x + SWATCH - 1, top + SWATCH - 1], fill=colour, outline=(110, 110, 110))
        draw.text((x + SWATCH + 4, y + LINE // 2), name, fill="black", font=font, anchor="lm")
    return legend


def overlay(image: np.ndarray, label: ArrayLike, class_names: Sequence[str], alpha: float = 0.5,
            ignore_label: int = 255, min_size: int = MIN_SIZE) -> Image.Image:
    """The image with the label map blended over it (ignore darkens), enlarged to `min_size`, and a
    legend of the classes present below it."""
    img = _check_image(image)
    lab = _check_label(label, img, len(class_names), ignore_label, "label")
    panel = _blend(img, lab, alpha, ignore_label, _scale(img, min_size))
    legend = _legend(_legend_entries([lab], class_names, ignore_label), panel.width)
    figure = Image.new("RGB", (legend.width, panel.height + legend.height), "white")
    figure.paste(panel, (0, 0))
    figure.paste(legend, (0, panel.height))
    return figure


def grid_figure(
    rows: Sequence[tuple[np.ndarray, ArrayLike, ArrayLike]],
    class_names: Sequence[str],
    ignore_label: int = 255,
    titles: Sequence[str] | None = None,
    alpha: float = 0.6,
    min_size: int = MIN_SIZE,
) -> Image.Image:
    """A qualitative grid: one row per (image, ground truth, prediction), columns `COLUMN_TITLES`,
    an optional title line above each row (e.g. the sample id) and one legend below for all rows.

    Layout: a `GAP` margin around and between panels; the column-title line is `LINE` high and so is
    each row title; every column is as wide as the widest panel, panels sit at its left edge.
    """
    if not rows:
        raise ValueError("grid_figure needs at least one row")
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"{len(titles)} titles for {len(rows)} rows")
    panels: list[list[Image.Image]] = []
    labels: list[np.ndarray] = []
    for image, gt, pred in rows:
        img = _check_image(image)
        g = _check_label(gt, img, len(class_names), ignore_label, "ground truth")
        p = _check_label(pred, img, len(class_names), ignore_label, "prediction")
        scale = _scale(img, min_size)
        panels.append([_enlarge(img, scale)] + [_blend(img, lab, alpha, ignore_label, scale) for lab in (g, p)])
        labels += [g, p]
    col_w = max(row[0].width for row in panels)
    width = GAP + len(COLUMN_TITLES) * (col_w + GAP)
    height = GAP + LINE + sum(row[0].height + GAP + (LINE if titles else 0) for row in panels)
    legend = _legend(_legend_entries(labels, class_names, ignore_label), width)
    figure = Image.new("RGB", (max(width, legend.width), height + legend.height), "white")
    draw = ImageDraw.Draw(figure)
    font = _font()
    for c, name in enumerate(COLUMN_TITLES):
        draw.text((GAP + c * (col_w + GAP) + col_w // 2, GAP + LINE // 2), name, fill="black",
                  font=font, anchor="mm")
    y = GAP + LINE
    for r, row in enumerate(panels):
        if titles:
            draw.text((GAP, y + LINE // 2), titles[r], fill="black", font=font, anchor="lm")
            y += LINE
        for c, panel in enumerate(row):
            figure.paste(panel, (GAP + c * (col_w + GAP), y))
        y += row[0].height + GAP
    figure.paste(legend, (0, height))
    return figure
