"""When an evaluation class counts as *seen*: when it names the same concept as a training class.

Spelling alone is not enough: VOC's "aeroplane" is COCO's "airplane", Pascal Context's "sofa" is COCO's
"couch". Three tests decide, in this order (the first that matches wins):

1. `SAME_CONCEPT` / `DISTINCT_CONCEPTS`: maintained tables for the benchmark vocabularies (COCO-Stuff-171
   against VOC-20, Pascal Context and ADE20K) where the other tests give the wrong answer.
2. Spelling: a synonym of the class is a training class name, ignoring case, spaces and punctuation and
   COCO-Stuff's "-other" / "-merged" / "-stuff" suffixes ("pottedplant" = "potted plant", "wall-other" = "wall").
3. WordNet: both name the same noun synset. A class with synonyms (ADE lists WordNet synsets) is the sense of
   its first name holding most of the others ("toilet, can, commode" is the fixture, not the room); a single
   name is its most frequent sense ("aeroplane" and "airplane" are one synset; "shelves" is "shelf"), or the
   sense `WORDNET_SENSES` gives where the most frequent one is another meaning (COCO's "table" is furniture).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import DataError
from ..nouns import INSTALL_OFFLINE_COMMAND, NounConfig, use_nltk_data, wordnet

# Names of one concept that neither spelling nor WordNet matches (WordNet's motorbike is a minibike).
SAME_CONCEPT: tuple[tuple[str, ...], ...] = (
    ("motorcycle", "motorbike"),  # COCO / VOC, Pascal Context, ADE ("minibike, motorbike")
    ("tv", "tvmonitor"),  # VOC's and Pascal Context's TV-or-monitor class is COCO's "tv"
    ("pavement", "sidewalk"),  # COCO-Stuff's pavement; ADE lists "sidewalk, pavement" as one class
    ("window-blind", "blind"),  # ADE's "blind, screen" (window blinds)
)
# (class name, training name): a synonym is spelled like the training class but means something else.
DISTINCT_CONCEPTS: tuple[tuple[str, str], ...] = (
    ("buffet", "counter"),  # ADE's "buffet, counter, sideboard" is a sideboard, COCO-Stuff's counter a counter top
)
# WordNet sense of names whose most frequent sense is not the object a segmentation data set means.
WORDNET_SENSES: dict[str, str] = {
    "table": "table.n.02",  # not a table of data
    "tv": "television_receiver.n.01",  # not broadcasting
    "mouse": "mouse.n.04",  # the computer mouse
    "toilet": "toilet.n.02",  # the fixture, not the room
    "light": "light.n.02",  # a light source, not radiation
    "plant": "plant.n.02",  # flora, not a factory
    "microwave": "microwave.n.02",  # the oven
    "kite": "kite.n.03",  # the plaything
    "branch": "branch.n.02",  # of a tree
    "cell phone": "cellular_telephone.n.01",  # compounds WordNet spells otherwise
    "sports ball": "ball.n.01",
    "window-blind": "window_blind.n.01",
}

_COCO_SUFFIXES = ("-other", "-merged", "-stuff")  # COCO-Stuff's catch-all and merged classes ("wall-other")


def normalise_name(name: str) -> str:
    """Case-insensitive, with underscores as spaces and COCO-Stuff suffixes dropped ("Wall-Other" → "wall")."""
    name = name.strip().lower().replace("_", " ")
    stripped = True
    while stripped:
        stripped = False
        for suffix in _COCO_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)].strip(), True
    return name


def spelling(name: str) -> str:
    """The letters and digits of a normalised name: "potted plant", "pottedplant" and "Potted-Plant" agree."""
    return re.sub(r"[^0-9a-z]", "", normalise_name(name))


@dataclass(frozen=True)
class SeenMatch:
    """Whether a class is seen, and why: the training class it matched and the test that matched it."""

    seen: bool
    train_class: str | None = None
    rule: str | None = None  # "table", "spelling" or "wordnet <synset>"

    def row(self, name: str) -> dict[str, Any]:
        return {"class": name, "seen": self.seen, "train_class": self.train_class or "", "rule": self.rule or ""}


_GROUP = {spelling(n): g for g, names in enumerate(SAME_CONCEPT) for n in names}
_DISTINCT = {(spelling(a), spelling(b)) for a, b in DISTINCT_CONCEPTS}


def match_concept(synonyms: Sequence[str], vocabulary: Sequence[str]) -> SeenMatch:
    """The first training class (in vocabulary order) that the class with these synonyms names, by the
    first test (table, spelling, WordNet) that matches any."""
    candidates = [t for t in vocabulary if (spelling(synonyms[0]), spelling(t)) not in _DISTINCT]
    names = {spelling(s) for s in synonyms}
    for train in candidates:
        group = _GROUP.get(spelling(train))
        if group is not None and any(_GROUP.get(n) == group for n in names):
            return SeenMatch(True, train, "table")
    for train in candidates:
        if spelling(train) in names:
            return SeenMatch(True, train, "spelling")
    concept = class_synset(tuple(synonyms))
    if concept is not None:
        for train in candidates:
            if class_synset((train,)) == concept:
                return SeenMatch(True, train, f"wordnet {concept}")
    return SeenMatch(False)


def seen_split(classes: Sequence[Sequence[str]], vocabulary: Sequence[str] | None) -> list[SeenMatch]:
    """One SeenMatch per class (each a list of synonyms); without a vocabulary (a training set) all are seen."""
    if vocabulary is None:
        return [SeenMatch(True, syns[0], "training class") for syns in classes]
    require_wordnet()  # the answer must not depend on whether WordNet happens to be installed
    return [match_concept(syns, vocabulary) for syns in classes]


def _wordnet_key(name: str) -> str:
    return normalise_name(name).replace(" ", "_")


def require_wordnet(nltk_data: str | None = NounConfig.nltk_data) -> None:
    """Load WordNet (searching `nltk_data` first), or raise DataError saying how to install it offline."""
    use_nltk_data(nltk_data)
    try:
        wordnet.ensure_loaded()
    except LookupError:
        raise DataError(f"{nltk_data or '~/nltk_data'}/corpora/wordnet",
                        "WordNet (used to decide which classes are seen) is not installed; install it offline "
                        f"with `{INSTALL_OFFLINE_COMMAND}`") from None


@functools.lru_cache(maxsize=None)
def class_synset(synonyms: tuple[str, ...]) -> str | None:
    """The WordNet noun synset a class names (see the module docstring), or None when WordNet lacks it."""
    for name in synonyms:
        key = _wordnet_key(name)
        if normalise_name(name) in WORDNET_SENSES:
            return WORDNET_SENSES[normalise_name(name)]
        senses = wordnet.synsets(key, pos=wordnet.NOUN)
        if senses:
            others = {_wordnet_key(s) for s in synonyms} - {key}
            best = max(senses, key=lambda s: len(others & {lemma.lower() for lemma in s.lemma_names()}))
            return best.name()  # max keeps the first (most frequent) sense among equals
    return None
