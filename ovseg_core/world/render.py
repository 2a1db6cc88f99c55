"""Scene rendering in numpy: stuff regions partition the image, things are drawn on top.

All randomness comes from the generator passed in, so a scene is a pure function of its seed.
Instance masks are the visible parts (later objects occlude earlier ones); stuff masks are the
region pixels no object covers, as in COCO-Stuff.
"""
from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass, field

import numpy as np

from .config import SceneParams
from .shapes import SHAPES
from .spec import CLASSES, NUM_THINGS, STUFF, ThingSpec, Vocabulary, class_index, thing_classes
from .textures import PACKED, pack_rgb, texture_bank, unpack_rgb

MIN_THING_PX = 10  # smaller silhouettes stop being recognisable at all
MAX_PLACEMENT_TRIES = 12


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    thing_classes: list[int]  # indices into spec.CLASSES, drawing order (last on top)
    thing_masks: np.ndarray  # [N, H, W] bool, visible part of each object
    thing_sizes: list[float]  # drawn diameter / image size
    stuff_classes: list[int]  # indices into spec.CLASSES
    stuff_masks: np.ndarray  # [M, H, W] bool, region pixels not covered by any object
    captions: list[str] = field(default_factory=list)
    tagged: list[list[tuple[str, str]]] = field(default_factory=list)  # Penn Treebank tags per token

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def label_map(self) -> np.ndarray:
        """uint8 [H, W]: 1 + class index for every pixel (0 = unlabeled, which rendering never leaves)."""
        label = np.zeros(self.image.shape[:2], np.uint8)
        for c, m in zip(self.stuff_classes + self.thing_classes, list(self.stuff_masks) + list(self.thing_masks)):
            label[m] = c + 1
        return label

    def centroid(self, i: int) -> tuple[float, float]:
        """(y, x) centre of object i's visible pixels, in [0, 1] image coordinates."""
        ys, xs = np.nonzero(self.thing_masks[i])
        return float(ys.mean() + 0.5) / self.size, float(xs.mean() + 0.5) / self.size

    def class_names(self) -> set[str]:
        return {CLASSES[c].name for c in self.thing_classes + self.stuff_classes}


@functools.lru_cache(maxsize=16)
def _unit_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (v down, u right) spanning [-1, 1]; read-only, shared."""
    c = ((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1
    v, u = np.meshgrid(c, c, indexing="ij")
    v.flags.writeable = u.flags.writeable = False
    return v, u


# ---------------------------------------------------------------------------------------------- things

@dataclass(frozen=True)
class Sprite:
    """One drawn object in its own px x px box."""

    mask: np.ndarray  # [px, px] bool
    tone: np.ndarray  # [px, px] uint8 index into palette: body, pattern, outline
    palette: np.ndarray  # [3] packed RGB (textures.pack_rgb)


def _palette(h: float, s: float, v: float, accent: str) -> np.ndarray:
    """Packed body, pattern and outline colours (plain Python arithmetic: ~10x cheaper than numpy on 9 numbers)."""
    base = [c * 255.0 for c in colorsys.hsv_to_rgb((h / 360.0) % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))]
    pattern = [c * 0.5 for c in base] if accent == "dark" else [c * 0.4 + 153.0 for c in base]
    outline = [c * 0.35 for c in base]
    return np.array([round(r) | round(g) << 8 | round(b) << 16 for r, g, b in (base, pattern, outline)], PACKED)


def draw_thing(rng: np.random.Generator, spec: ThingSpec, px: int, jitter: float = 1.0) -> Sprite:
    """One object of class `spec` in a px x px box.

    Jitter: rotation (+-20 deg), mirror, aspect (+-10%), hue (+-5 deg), saturation and brightness
    (+-0.06), pattern phase, all scaled by `jitter` <= 1.5; the class hues are >= 18 degrees apart
    and neighbours differ in brightness, shape and pattern, so jitter never makes classes overlap."""
    r = rng.random(8).tolist()  # all jitter in one draw: rotation, aspect, mirror, h, s, v, 2 pattern phases
    v0, u0 = _unit_grid(px)
    theta = math.radians((r[0] * 40 - 20) * jitter)
    # stretch one axis by up to 10% while keeping the shape inside the unit disc
    aspect = math.exp((r[1] * 0.2 - 0.1) * jitter)
    su, sv = (1.0, aspect) if aspect > 1 else (1 / aspect, 1.0)
    flip = -1.0 if r[2] < 0.5 else 1.0
    cos, sin = math.cos(theta), math.sin(theta)
    # one affine map: mirror, rotate, then scale each axis
    u = (flip * cos * su) * u0 + (sin * su) * v0
    v = (-flip * sin * sv) * u0 + (cos * sv) * v0
    mask = SHAPES[spec.shape](u, v)

    palette = _palette(spec.hue + (r[3] * 10 - 5) * jitter, spec.saturation + (r[4] * 0.12 - 0.06) * jitter,
                       spec.value + (r[5] * 0.12 - 0.06) * jitter, spec.accent)

    if spec.pattern == "solid":
        tone = np.zeros((px, px), np.uint8)
    else:
        period = max(0.45, 11.0 / px)  # unit coordinates; >= ~5.5 px so patterns survive small sizes
        a = math.radians(spec.pattern_angle)
        ca, sa = math.cos(a) / period, math.sin(a) / period
        pu = ca * u + sa * v + r[6]
        pv = ca * v - sa * u + r[7]
        if spec.pattern == "stripes":
            on = pu % 1 < 0.5
        elif spec.pattern == "dots":
            du, dv = pu % 1 - 0.5, pv % 1 - 0.5
            on = du * du + dv * dv < 0.09
        else:  # checker
            on = (np.floor(pu) + np.floor(pv)) % 2 == 1
        tone = on.view(np.uint8)
    # dark 1-px outline separates the object from a background of similar colour
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return Sprite(mask, np.where(inner, tone, np.uint8(2)), palette)


# ---------------------------------------------------------------------------------------------- stuff

def _stuff_layer(rng: np.random.Generator, stuff_index: int, size: int, texture_seed: int,
                 jitter: float) -> np.ndarray:
    """A size x size packed-RGB crop (a read-only view) of one variant of the class's texture bank."""
    bank = texture_bank(texture_seed, stuff_index, size, jitter)
    variant, oy, ox = (int(x) for x in rng.random(3) * (len(bank), size, size))
    return bank[variant, oy:oy + size, ox:ox + size]


def _regions(rng: np.random.Generator, n: int, size: int, angled: bool) -> np.ndarray:
    """Region index map [size, size] (0..n-1): n bands cut by wavy boundaries that never cross."""
    if n == 1:
        return np.zeros((size, size), np.uint8)
    yy, xx = _unit_grid(size)
    if angled:
        theta = math.radians(rng.uniform(25, 90) * (1 if rng.random() < 0.5 else -1))
        across = xx * math.cos(theta) + yy * math.sin(theta)  # along the boundaries
        down = yy * math.cos(theta) - xx * math.sin(theta)  # across the boundaries
    else:  # horizon-like: boundaries are functions of x only, compared per column
        across, down = xx[:1], yy
    if n == 2:
        offsets = [rng.uniform(-0.45, 0.45)]
    else:
        first = rng.uniform(-0.65, -0.05)
        offsets = [first, rng.uniform(first + 0.5, 0.7)]
    region = np.zeros((size, size), np.uint8)
    prev = None
    for off in offsets:
        slope, amp, freq, phase = rng.uniform((-0.15, 0.0, 2.0, 0.0), (0.15, 0.08, 7.0, 2 * math.pi))
        curve = off + slope * across + amp * np.sin(freq * across + phase)
        if prev is not None:
            curve = np.maximum(curve, prev + 0.2)
        region += down >= curve
        prev = curve
    return region


def _pick_stuff(rng: np.random.Generator, params: SceneParams) -> list[int]:
    """Distinct stuff indices (into STUFF) in region order, top-only classes (sky) first."""
    w = np.ones(len(STUFF))
    if params.stuff_weights is not None:
        w = np.array([params.stuff_weights.get(s.name, 0.0) for s in STUFF], float)
    n = min(int(rng.integers(params.stuff[0], params.stuff[1] + 1)), int((w > 0).sum()))
    # weighted sampling without replacement: the n smallest exponential "arrival times" (Efraimidis-Spirakis)
    with np.errstate(divide="ignore"):
        keys = rng.exponential(size=len(STUFF)) / w
    chosen = [int(i) for i in np.argsort(keys, kind="stable")[:n]]
    chosen.sort(key=lambda i: not STUFF[i].top_only)
    return chosen


# ---------------------------------------------------------------------------------------------- scenes

def render_scene(rng: np.random.Generator, size: int = 64, params: SceneParams = SceneParams(),
                 texture_seed: int = 0, vocabulary: Vocabulary = "base") -> Scene:
    """A scene of 1-3 stuff regions and some objects on top (captions are added by captions.py); its things
    come from the vocabulary's (spec.thing_classes)."""
    things = thing_classes(vocabulary)
    stuff = _pick_stuff(rng, params)
    # the sky stays the top band of a horizon-like layout; other mixes may be cut at an angle
    angled = rng.random() < params.angled and not any(STUFF[i].top_only for i in stuff)
    region = _regions(rng, len(stuff), size, angled)
    image = _stuff_layer(rng, stuff[0], size, texture_seed, params.jitter).copy()
    for j in range(1, len(stuff)):
        layer = _stuff_layer(rng, stuff[j], size, texture_seed, params.jitter)
        np.copyto(image, layer, where=region == j)

    inst = np.full((size, size), -1, np.int16)
    classes: list[int] = []
    sizes: list[float] = []
    full_area: list[int] = []
    visible: list[int] = []
    n_things = int(rng.integers(params.things[0], params.things[1] + 1))
    lo, hi = params.thing_size
    for repeat, pick, rel, partial in rng.random((n_things, 4)).tolist():
        if classes and repeat < 0.25:
            c = classes[int(pick * len(classes))]  # repeats give plural captions ("two kites")
        else:
            c = things[int(pick * len(things))]
        px = max(MIN_THING_PX, round((lo + rel * (hi - lo)) * size))
        sprite = draw_thing(rng, CLASSES[c], px, params.jitter)
        area = int(np.count_nonzero(sprite.mask))
        slack = px // 3 if partial < params.partial else 0
        for y0, x0 in (rng.random((MAX_PLACEMENT_TRIES, 2)) * (size - px + 2 * slack + 1) - slack).astype(int):
            y0, x0 = int(y0), int(x0)
            iy0, ix0, iy1, ix1 = max(y0, 0), max(x0, 0), min(y0 + px, size), min(x0 + px, size)
            m = sprite.mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
            inside = int(np.count_nonzero(m))
            if inside < 0.6 * area:  # at most 40% of an object may be cut off by the border
                continue
            box = inst[iy0:iy1, ix0:ix1]
            under = box[m]
            covered = np.bincount(under[under >= 0], minlength=len(classes))
            if any(visible[k] - covered[k] < (1 - params.max_overlap) * full_area[k] for k in range(len(classes))):
                continue
            k = len(classes)
            box[m] = k
            image[iy0:iy1, ix0:ix1][m] = sprite.palette.take(sprite.tone[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0][m])
            for j in range(k):
                visible[j] -= int(covered[j])
            classes.append(c)
            sizes.append(px / size)
            full_area.append(inside)
            visible.append(inside)
            break

    thing_masks = inst[None] == np.arange(len(classes), dtype=np.int16)[:, None, None]
    stuff_masks = (region[None] == np.arange(len(stuff), dtype=region.dtype)[:, None, None]) & (inst < 0)[None]
    keep = stuff_masks.reshape(len(stuff), -1).any(1)
    return Scene(
        image=unpack_rgb(image),
        thing_classes=classes,
        thing_masks=thing_masks,
        thing_sizes=sizes,
        stuff_classes=[NUM_THINGS + s for s, k in zip(stuff, keep) if k],
        stuff_masks=stuff_masks[keep],
    )


def render_single_object(rng: np.random.Generator, class_name: str, size: int = 64,
                         background: str | tuple[int, int, int] = (128, 128, 128), object_size: float = 0.6,
                         texture_seed: int = 0, jitter: float = 1.0) -> Scene:
    """One object near the centre, on a plain colour or on a stuff class's texture (by name)."""
    c = class_index(class_name)
    spec = CLASSES[c]
    if not isinstance(spec, ThingSpec):
        raise ValueError(f"{class_name!r} is a stuff class; render_single_object draws things")
    stuff: list[int] = []
    if isinstance(background, str):
        b = class_index(background)
        if CLASSES[b].kind != "stuff":
            raise ValueError(f"background {background!r} is not a stuff class")
        image = _stuff_layer(rng, b - NUM_THINGS, size, texture_seed, jitter).copy()
        stuff = [b]
    else:
        image = np.full((size, size), pack_rgb(np.asarray(background, np.uint8)))
    px = max(MIN_THING_PX, min(size, int(round(object_size * size))))
    sprite = draw_thing(rng, spec, px, jitter)
    lo, hi = max(0, (size - px) // 2 - size // 10), min(size - px, (size - px) // 2 + size // 10)
    y0, x0 = (int(t) for t in rng.integers(lo, hi + 1, 2))
    full = np.zeros((size, size), bool)
    full[y0:y0 + px, x0:x0 + px] = sprite.mask
    image[full] = sprite.palette.take(sprite.tone[sprite.mask])
    return Scene(
        image=unpack_rgb(image),
        thing_classes=[c],
        thing_masks=full[None],
        thing_sizes=[px / size],
        stuff_classes=stuff,
        stuff_masks=~full[None] if stuff else np.zeros((0, size, size), bool),
    )
