"""Stuff textures: one texture bank per class, cropped at random offsets for each scene.

A bank is a set of (2S, 2S, 3) images built once per (world seed, class, image size S), in a few
brightness/tint variants; a scene takes an S x S crop of one variant at a random offset. That keeps per-scene cost to a
slice while every region still looks different. Each texture has its own colour, orientation and
frequency, so stuff classes stay distinct from each other and from the saturated things.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from .spec import STUFF, StuffSpec

TextureFn = Callable[[np.random.Generator, int, np.ndarray], np.ndarray]


def _noise(rng: np.random.Generator, n: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Smooth noise with unit standard deviation (wraps around, so crops have no seams)."""
    field = gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _shade(base: np.ndarray, brightness: np.ndarray) -> np.ndarray:
    """Scale the base colour by a per-pixel brightness field."""
    return base[None, None, :] * brightness[..., None]


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a * (1 - t[..., None]) + b * t[..., None]


def grass(rng, n, base):
    blades = _noise(rng, n, (3.0, 0.5))  # vertical streaks
    patches = _noise(rng, n, 6.0)
    return _shade(base, 1 + 0.16 * blades + 0.08 * patches)


def sky(rng, n, base):
    y = np.linspace(0, 1, n)[:, None] * np.ones((1, n))
    clouds = np.clip(_noise(rng, n, (3.0, 7.0)) - 0.6, 0, None) * 0.5
    return _mix(_shade(base, 0.94 + 0.12 * y), np.array([246.0, 248.0, 252.0]), np.clip(clouds, 0, 0.8))


def water(rng, n, base):
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    waves = np.sin(2 * np.pi * (y / 5.0 + 0.25 * np.sin(2 * np.pi * x / 23.0)))
    return _shade(base, 1 + 0.14 * waves + 0.05 * _noise(rng, n, 1.0))


def sand(rng, n, base):
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    ripples = np.sin(2 * np.pi * (x + 0.6 * y) / 9.0)
    return _shade(base, 1 + 0.05 * ripples + 0.07 * rng.standard_normal((n, n)))


def snow(rng, n, base):
    drift = _noise(rng, n, 8.0)
    return _mix(_shade(base, np.ones((n, n))), np.array([200.0, 212.0, 238.0]), np.clip(0.18 + 0.12 * drift, 0, 1))


def brick(rng, n, base):
    y, x = np.mgrid[0:n, 0:n]
    row = y // 6
    col = (x + 5 * (row % 2)) // 10
    per_brick = rng.uniform(0.82, 1.12, size=(n // 6 + 2, n // 10 + 3))[row, col]
    img = _shade(base, per_brick + 0.04 * rng.standard_normal((n, n)))
    mortar = (y % 6 == 0) | ((x + 5 * (row % 2)) % 10 == 0)
    img[mortar] = (205.0, 200.0, 190.0)
    return img


def road(rng, n, base):
    return _shade(base, 1 + 0.1 * rng.standard_normal((n, n)) + 0.05 * _noise(rng, n, 4.0))


def dirt(rng, n, base):
    return _shade(base, 1 + 0.15 * _noise(rng, n, 2.0) + 0.08 * rng.standard_normal((n, n)))


TEXTURES: dict[str, TextureFn] = {f.__name__: f for f in (grass, sky, water, sand, snow, brick, road, dirt)}


PACKED = np.dtype("<u4")


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> one little-endian uint32 per pixel (R, G, B, 0 bytes).

    Scenes are composed in this packed form because numpy's masked copies are ~10x faster on one
    4-byte element per pixel than on three 1-byte channels."""
    rgbx = np.zeros(rgb.shape[:-1] + (4,), np.uint8)
    rgbx[..., :3] = rgb
    return rgbx.view(PACKED)[..., 0]


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_rgb: a contiguous uint8 [..., 3] array."""
    return np.ascontiguousarray(packed.astype(PACKED, copy=False)[..., None].view(np.uint8)[..., :3])


VARIANTS = 8  # brightness/tint variants per bank, so a scene's colour jitter is a choice, not arithmetic


@functools.lru_cache(maxsize=64)
def texture_bank(seed: int, stuff_index: int, size: int, jitter: float = 1.0) -> np.ndarray:
    """(VARIANTS, 2*size, 2*size) packed-RGB textures (see `pack_rgb`) of STUFF[stuff_index] for this
    world seed (read-only)."""
    spec: StuffSpec = STUFF[stuff_index]
    rng = np.random.default_rng([seed, 0x5707F, stuff_index, size])
    bank = TEXTURES[spec.texture](rng, 2 * size, np.asarray(spec.rgb, np.float64))
    gain = 1 + rng.uniform(-0.08, 0.08, (VARIANTS, 1, 1, 1)) * jitter
    tint = rng.normal(0.0, 4.0, (VARIANTS, 1, 1, 3)) * jitter
    out = pack_rgb(np.clip(bank[None] * gain + tint, 0, 255).round().astype(np.uint8))
    out.flags.writeable = False
    return out
