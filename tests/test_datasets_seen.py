"""Seen / unseen flags by concept (`ovseg_core.datasets.concepts`) on the paper's protocol: COCO-Stuff-171's
training classes against each benchmark's classes. Expectations come from the data sets' own lists: COCO's 80
categories include all 20 of VOC's (VOC spells six of them otherwise); COCO-Stuff-171 drops 11 never-annotated
COCO ids, plate among them; ADE's class lists are WordNet synsets."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg_core.datasets.class_names import (ADE20K_150, COCO_STUFF_182, COCO_STUFF_UNUSED, PASCAL_CONTEXT_59,
                                             VOC_20)
from ovseg_core.datasets.classes import ClassList
from ovseg_core.datasets.concepts import SeenMatch, WORDNET_SENSES, normalise_name, seen_split
from ovseg_core.datasets.prepared import SEEN_FILE
from ovseg_core.datasets.registry import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
COCO_171 = [n for v, n in enumerate(COCO_STUFF_182) if v not in COCO_STUFF_UNUSED]
# VOC's spelling → COCO's category name, for the six VOC classes spelled otherwise.
VOC_SPELLINGS = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
                 "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}


def split(names, separator: str | None = None, vocabulary=COCO_171) -> dict[str, SeenMatch]:
    classes = ClassList.from_names(names, separator)
    return dict(zip(classes.names, classes.seen_split(vocabulary)))


def test_every_voc_class_is_a_coco_class():
    voc = split(VOC_20)
    assert {n: voc[n].train_class for n in VOC_SPELLINGS} == VOC_SPELLINGS
    assert all(m.seen for m in voc.values())
    assert all(voc[n].train_class == n for n in VOC_20 if n not in VOC_SPELLINGS)


def test_pascal_context_59_against_coco_stuff():
    pc = split(PASCAL_CONTEXT_59)
    renamed = {n: c for n, c in VOC_SPELLINGS.items() if n != "diningtable"}  # PC-59 calls it "table"
    assert {n: pc[n].train_class for n in renamed} == renamed
    assert pc["table"].train_class == "table" and pc["shelves"].train_class == "shelf"
    assert pc["sidewalk"].train_class == "pavement"  # ADE's "sidewalk, pavement" is one class
    assert not pc["plate"].seen  # COCO's plate (id 45) is one of the 11 ids COCO-Stuff-171 drops


def test_ade150_against_coco_stuff():
    ade = split(ADE20K_150, ",")
    # words of a class name are no synonyms: none of these is a COCO-Stuff class
    for name in ("pool table", "coffee table", "screen door", "swivel chair", "palm", "dirt track"):
        assert not ade[name].seen, name
    # a synonym spelled like a COCO class can mean another thing: ADE's buffet is a sideboard
    assert ade["counter"].seen and not ade["buffet"].seen
    assert ade["minibike"].train_class == "motorcycle" and ade["toilet"].train_class == "toilet"
    assert ade["wardrobe"].seen is False  # WordNet's "closet" is also a cupboard, but ADE's class is a wardrobe
    assert ade["sofa"].train_class == "couch" and ade["airplane"].train_class == "airplane"


def test_rules_and_their_order():
    assert split(["Wall-Other"], vocabulary=["wall-brick", "wall-other"])["Wall-Other"] == SeenMatch(
        True, "wall-other", "spelling")
    assert split(["pizza"], vocabulary=["pizza pie"])["pizza"].rule == "wordnet pizza.n.01"
    # "mouse" alone is the rodent in WordNet; a segmentation vocabulary means the computer mouse
    assert split(["mouse"], vocabulary=["computer mouse"])["mouse"] == SeenMatch(
        True, "computer mouse", "wordnet mouse.n.04")
    assert split(["motorbike"], vocabulary=["motorcycle"])["motorbike"].rule == "table"
    assert not split(["sand"], vocabulary=["dirt", "snow", "beach"])["sand"].seen
    assert [m.seen for m in seen_split([("sand",), ("snow",)], None)] == [True, True]  # a training set


def test_wordnet_senses_name_real_synsets():
    from nltk.corpus import wordnet

    for name, synset in WORDNET_SENSES.items():
        s = wordnet.synset(synset)
        assert s.pos() == "n"
        if " " not in name and "-" not in name:  # one-word names are a lemma of their sense
            assert normalise_name(name) in {lemma.lower() for lemma in s.lemma_names()}, name


def test_prepared_set_records_its_seen_split(tmp_path):
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(voc / "JPEGImages" / "a.jpg")
    Image.fromarray(np.array([[1, 18], [20, 0]], dtype=np.uint8)).save(voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    ds = prepare_dataset("voc-20", tmp_path / "voc", tmp_path / "out", "val", train_vocabulary=["airplane", "couch"])
    with open(ds.root / SEEN_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == list(VOC_20)
    seen = {r["class"]: (r["train_class"], r["rule"]) for r in rows if r["seen"] == "True"}
    assert seen == {"aeroplane": ("airplane", "wordnet airplane.n.01"), "sofa": ("couch", "wordnet sofa.n.01")}
    assert ds.seen == [r["seen"] == "True" for r in rows]


def test_missing_wordnet_is_an_error_saying_how_to_install_it(tmp_path):
    """In a fresh process whose NLTK data path holds no WordNet (the default path is relative to the working
    directory, here an empty one)."""
    code = ("import nltk\n"
            "from ovseg_core.datasets.concepts import seen_split\n"
            f"nltk.data.path[:] = [{str(tmp_path)!r}]\n"
            "seen_split([('cat',)], ['dog'])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode != 0
    assert "DataError" in result.stderr and "bash scripts/install_nltk_data.sh" in result.stderr
