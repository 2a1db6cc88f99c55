"""The embedded world's classes: what each thing and stuff class is called and how it looks.

Every thing class has its own shape, base hue (neighbouring hues also differ in brightness) and
surface pattern, so that a tiny CLIP trained from scratch can tell them apart even under jitter.
Stuff classes are textured background regions with their own colour and texture.

The *base* vocabulary (`THINGS` + `STUFF`) is what the COCO-like training split and the default held-out sets
show. `EXTRA_THINGS` widen it: they appear in the web split (CLIP's pretraining data, as the web names far more
concepts than COCO) and in held-out sets with `vocabulary: wide`, never in the training split, its labels or its
captions, as most of ADE-847's and Pascal Context-459's classes are absent from COCO. The order of `CLASSES`
(base things, stuff, extra things) is the class order of every file the world writes; a set's classes are a
prefix of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal["thing", "stuff"]
Pattern = Literal["solid", "stripes", "dots", "checker"]


@dataclass(frozen=True)
class ThingSpec:
    name: str
    plural: str
    supercategory: str
    shape: str  # key into shapes.SHAPES
    hue: float  # degrees
    saturation: float
    value: float
    colour: str  # the colour word captions use
    pattern: Pattern
    pattern_angle: float  # degrees, pattern orientation in the object's own frame
    accent: Literal["dark", "light"]  # pattern colour: a darker or a paler shade of the base colour
    synonyms: tuple[str, ...] = ()
    kind: Kind = "thing"


@dataclass(frozen=True)
class StuffSpec:
    name: str
    supercategory: str
    rgb: tuple[int, int, int]
    texture: str  # key into textures.TEXTURES
    colour: str
    phrases: tuple[str, ...]  # prepositional phrases that mention it; "{n}" is the noun
    top_only: bool = False  # sky: only the top region of a horizontal layout
    synonyms: tuple[str, ...] = ()
    kind: Kind = "stuff"


ClassSpec = ThingSpec | StuffSpec

# Hues step by ~20 degrees; neighbours alternate in brightness and never share shape or pattern.
THINGS: tuple[ThingSpec, ...] = (
    ThingSpec("ball", "balls", "sports", "circle", 0, 0.85, 0.95, "red", "solid", 0, "dark"),
    ThingSpec("cup", "cups", "kitchen", "cup", 20, 0.85, 0.70, "brown", "checker", 0, "light"),
    ThingSpec("pizza", "pizzas", "food", "triangle", 40, 0.90, 0.97, "orange", "dots", 0, "dark"),
    ThingSpec("banana", "bananas", "food", "crescent", 58, 0.90, 0.85, "yellow", "solid", 0, "dark"),
    ThingSpec("apple", "apples", "food", "heart", 88, 0.85, 0.70, "green", "stripes", 90, "light"),
    ThingSpec("chair", "chairs", "furniture", "chair", 112, 0.80, 0.95, "green", "checker", 0, "dark"),
    ThingSpec("bird", "birds", "animal", "chevron", 138, 0.85, 0.60, "green", "solid", 0, "light"),
    ThingSpec("bottle", "bottles", "kitchen", "bottle", 160, 0.85, 0.92, "green", "stripes", 0, "dark"),
    ThingSpec("umbrella", "umbrellas", "accessory", "umbrella", 183, 0.90, 0.72, "blue", "dots", 0, "light"),
    ThingSpec("boat", "boats", "vehicle", "boat", 204, 0.85, 0.98, "blue", "checker", 45, "dark"),
    ThingSpec("car", "cars", "vehicle", "car", 226, 0.85, 0.75, "blue", "solid", 0, "light",
              synonyms=("automobile",)),
    ThingSpec("clock", "clocks", "indoor", "ring", 248, 0.70, 0.98, "blue", "stripes", 45, "dark"),
    ThingSpec("kite", "kites", "sports", "diamond", 272, 0.85, 0.72, "purple", "dots", 0, "light"),
    ThingSpec("cake", "cakes", "food", "square", 294, 0.75, 0.97, "purple", "stripes", 90, "dark"),
    ThingSpec("sign", "signs", "outdoor", "sign", 316, 0.85, 0.70, "pink", "checker", 0, "light"),
    ThingSpec("sheep", "sheep", "animal", "cloud", 338, 0.60, 0.98, "pink", "dots", 0, "dark"),
)

STUFF: tuple[StuffSpec, ...] = (
    StuffSpec("grass", "plant", (88, 140, 62), "grass", "green",
              ("on the {n}", "in the {n}", "on green {n}")),
    StuffSpec("sky", "sky", (142, 186, 232), "sky", "blue",
              ("under the {n}", "under a blue {n}", "against the {n}"), top_only=True),
    StuffSpec("water", "water", (44, 92, 150), "water", "blue",
              ("on the {n}", "in the {n}", "near the {n}")),
    StuffSpec("sand", "ground", (214, 190, 140), "sand", "yellow",
              ("on the {n}", "in the {n}", "on the warm {n}")),
    StuffSpec("snow", "ground", (236, 238, 246), "snow", "white",
              ("in the {n}", "on the white {n}", "on fresh {n}")),
    StuffSpec("wall", "wall", (160, 84, 66), "brick", "red",
              ("in front of a {n}", "by the {n}", "against a brick {n}"), synonyms=("brick wall",)),
    StuffSpec("road", "ground", (78, 78, 84), "road", "gray",
              ("on the {n}", "on a gray {n}", "beside the {n}"), synonyms=("street",)),
    StuffSpec("dirt", "ground", (122, 86, 56), "dirt", "brown",
              ("on the {n}", "in the brown {n}", "on dry {n}"), synonyms=("earth", "soil")),
)

# Each sits between two base hues, and is darker than every base thing (value 0.38 vs >= 0.60), so that no
# colour overlaps under jitter; their patterns are pale, and their shapes are their own.
EXTRA_THINGS: tuple[ThingSpec, ...] = (
    ThingSpec("fish", "fish", "animal", "fish", 10, 0.80, 0.38, "red", "stripes", 90, "light"),
    ThingSpec("tree", "trees", "plant", "tree", 100, 0.80, 0.38, "green", "dots", 0, "light"),
    ThingSpec("house", "houses", "building", "house", 149, 0.75, 0.38, "green", "checker", 45, "light"),
    ThingSpec("hat", "hats", "accessory", "hat", 194, 0.80, 0.38, "blue", "stripes", 0, "light"),
    ThingSpec("lamp", "lamps", "indoor", "lamp", 237, 0.80, 0.38, "blue", "dots", 0, "light"),
    ThingSpec("key", "keys", "indoor", "key", 283, 0.80, 0.38, "purple", "solid", 0, "light"),
    ThingSpec("bell", "bells", "indoor", "bell", 305, 0.80, 0.38, "purple", "checker", 0, "light"),
    ThingSpec("mushroom", "mushrooms", "food", "mushroom", 349, 0.75, 0.38, "red", "stripes", 45, "light"),
)

BASE_CLASSES: tuple[ClassSpec, ...] = THINGS + STUFF
CLASSES: tuple[ClassSpec, ...] = BASE_CLASSES + EXTRA_THINGS
CLASS_INDEX: dict[str, int] = {c.name: i for i, c in enumerate(CLASSES)}
NUM_THINGS = len(THINGS)
Vocabulary = Literal["base", "wide"]
VOCABULARIES: tuple[str, ...] = get_args(Vocabulary)


def vocabulary_classes(vocabulary: Vocabulary) -> tuple[ClassSpec, ...]:
    """The classes a split with this vocabulary shows and labels, in label order (a prefix of CLASSES)."""
    return BASE_CLASSES if vocabulary == "base" else CLASSES


def thing_classes(vocabulary: Vocabulary) -> list[int]:
    """Indices into CLASSES of the things a split with this vocabulary draws from."""
    extra = range(len(BASE_CLASSES), len(CLASSES)) if vocabulary == "wide" else range(0)
    return [*range(NUM_THINGS), *extra]

# Four things and two stuff classes of varied look that the segmenter never sees labelled.
DEFAULT_UNSEEN: tuple[str, ...] = ("pizza", "umbrella", "clock", "sheep", "sand", "snow")


def class_index(name: str) -> int:
    try:
        return CLASS_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown world class {name!r}; known: {', '.join(CLASS_INDEX)}") from None


def coco_category_id(index: int) -> int:
    """COCO-style id: 1 + position in the full class list, so ids stay stable whichever classes are unseen."""
    return index + 1
