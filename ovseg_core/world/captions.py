"""Template captions with Penn Treebank tags.

Captions are built as (word, tag) tokens, so every caption comes with its POS tags for free: the
templates know what each slot is. Every caption names all objects of its scene (plurals for
repeated classes: "two kites"); stuff is named as prepositional phrases ("on the grass") or nouns.
The caption text is the tokens joined so that NLTK's Treebank tokenizer gives the tokens back.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .render import Scene
from .spec import CLASSES, StuffSpec, ThingSpec

Token = tuple[str, str]

# Tags of the templates' fixed words (PTB: "to/TO", "front/NN", "brick" as a noun modifier is NN).
WORD_TAGS: dict[str, str] = {
    "a": "DT", "an": "DT", "the": "DT", "some": "DT", "several": "JJ",
    "on": "IN", "in": "IN", "under": "IN", "against": "IN", "near": "IN", "by": "IN", "beside": "IN",
    "of": "IN", "with": "IN", "above": "IN", "below": "IN", "to": "TO", "front": "NN", "left": "NN",
    "right": "NN", "and": "CC", "there": "EX", "is": "VBZ", "are": "VBP", "can": "MD", "be": "VB",
    "seen": "VBN", "picture": "NN", "photo": "NN", "image": "NN", "scene": "NN", "brick": "NN",
    "green": "JJ", "blue": "JJ", "white": "JJ", "warm": "JJ", "fresh": "JJ", "brown": "JJ", "dry": "JJ",
    "gray": "JJ", "red": "JJ", "orange": "JJ", "yellow": "JJ", "purple": "JJ", "pink": "JJ",
    "small": "JJ", "little": "JJ", "big": "JJ", "large": "JJ",
    "two": "CD", "three": "CD", "four": "CD", "five": "CD", "six": "CD", "seven": "CD", "eight": "CD",
    ",": ",", ".": ".",
}
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.random() * len(options))]  # ~20x cheaper than rng.choice on a list


def _words(text: str) -> list[Token]:
    return [(w, WORD_TAGS[w]) for w in text.split()]


def _with_article(tokens: list[Token]) -> list[Token]:
    """Turn a leading 'a' into 'an' before a vowel."""
    if tokens and tokens[0][0] == "a" and len(tokens) > 1 and tokens[1][0][0] in "aeiou":
        return [("an", "DT")] + tokens[1:]
    return tokens


def _thing_np(rng: np.random.Generator, spec: ThingSpec, sizes: list[float]) -> list[Token]:
    adjs: list[Token] = []
    if len(sizes) == 1 and rng.random() < 0.25 and not 0.3 <= sizes[0] <= 0.45:
        adjs.append((_pick(rng, ("small", "little") if sizes[0] < 0.3 else ("big", "large")), "JJ"))
    if rng.random() < 0.35:
        adjs.append((spec.colour, "JJ"))
    if len(sizes) == 1:
        det = "a" if rng.random() < 0.85 else "the"
        return _with_article([(det, "DT")] + adjs + [(spec.name, "NN")])
    count = len(sizes)
    lead = ("several", "JJ") if rng.random() < 0.12 else (NUMBERS[count - 2], "CD")
    return [lead] + adjs + [(spec.plural, "NNS")]


def _join(parts: list[list[Token]]) -> list[Token]:
    """'x', 'x and y', 'x, y and z'."""
    out: list[Token] = []
    for i, p in enumerate(parts):
        if i > 0:
            out.append(("and", "CC") if i == len(parts) - 1 else (",", ","))
        out.extend(p)
    return out


def _stuff_pp(rng: np.random.Generator, spec: StuffSpec) -> list[Token]:
    phrase = _pick(rng, spec.phrases)
    return [(spec.name, "NN") if w == "{n}" else (w, WORD_TAGS[w]) for w in phrase.split()]


def _stuff_np(rng: np.random.Generator, spec: StuffSpec) -> list[Token]:
    det = _pick(rng, ("the", "some") if spec.name not in ("wall", "road") else ("a", "the"))
    return [(det, "DT"), (spec.name, "NN")]


def _relation(scene: Scene, i: int, j: int) -> list[Token]:
    (yi, xi), (yj, xj) = scene.centroid(i), scene.centroid(j)
    dy, dx = yi - yj, xi - xj
    if abs(dx) >= abs(dy):
        return _words("to the left of" if dx < 0 else "to the right of")
    return _words("above" if dy < 0 else "below")


def caption_tokens(rng: np.random.Generator, scene: Scene, all_stuff: bool) -> list[Token]:
    """One caption: all objects, and all stuff (`all_stuff`) or a random non-empty subset of it."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(scene.thing_classes):
        groups.setdefault(c, []).append(i)
    order = list(groups)
    rng.shuffle(order)
    nps = [_thing_np(rng, CLASSES[c], [scene.thing_sizes[i] for i in groups[c]]) for c in order]

    stuff = list(scene.stuff_classes)
    if not all_stuff and len(stuff) > 1:
        stuff = [stuff[k] for k in sorted(rng.permutation(len(stuff))[:1 + int(rng.random() * len(stuff))])]
    rng.shuffle(stuff)
    stuff.sort(key=lambda c: CLASSES[c].top_only)  # "on the grass under the sky", not the reverse
    pps = [t for c in stuff for t in _stuff_pp(rng, CLASSES[c])]

    plural = len(scene.thing_classes) > 1
    first_plural = len(groups[order[0]]) > 1 if order else False
    templates = ["plain", "there", "picture", "copula", "fronted", "seen", "scene"]
    if len(order) == 2 and all(len(groups[c]) == 1 for c in order):
        templates += ["relation", "relation"]
    if not order:  # no object could be placed (possible only with partial objects in a crowded scene)
        templates = ["scene"]
    kind = _pick(rng, templates)
    things = _join(nps)
    if kind == "plain":
        out = things + pps
    elif kind == "there":
        out = _words("there are" if first_plural else "there is") + things + pps
    elif kind == "picture":
        out = _with_article([("a", "DT"), (_pick(rng, ("picture", "photo", "image")), "NN")]) + \
            _words("of") + things + pps
    elif kind == "copula":
        out = things + (_words("are" if plural else "is") + pps if pps else [])
    elif kind == "fronted":
        out = pps + ([(",", ",")] if pps else []) + _words("there are" if first_plural else "there is") + things
    elif kind == "seen":
        out = things + _words("can be seen") + pps
    elif kind == "scene":
        out = _words("a scene with") + _join(nps + [_stuff_np(rng, CLASSES[c]) for c in stuff])
    else:  # relation between the two objects
        i, j = groups[order[0]][0], groups[order[1]][0]
        out = nps[0] + _words("is") + _relation(scene, i, j) + nps[1] + pps
    out = out + [(".", ".")]
    return [(out[0][0][0].upper() + out[0][0][1:], out[0][1])] + out[1:]


def detokenize(tokens: list[Token]) -> str:
    """Join tokens into text, attaching punctuation to the previous word."""
    text = ""
    for w, _ in tokens:
        text += w if (w in ",." or not text) else " " + w
    return text


def make_captions(rng: np.random.Generator, scene: Scene, n: int, all_stuff: bool) -> None:
    """Add `n` captions (distinct where the templates allow) and their tags to the scene."""
    seen: set[str] = set()
    for _ in range(4 * n):
        tokens = caption_tokens(rng, scene, all_stuff)
        text = detokenize(tokens)
        if text in seen:
            continue
        seen.add(text)
        scene.captions.append(text)
        scene.tagged.append(tokens)
        if len(scene.captions) == n:
            return
    while len(scene.captions) < n:  # tiny scenes may have fewer distinct wordings than asked
        tokens = caption_tokens(rng, scene, all_stuff)
        scene.captions.append(detokenize(tokens))
        scene.tagged.append(tokens)
