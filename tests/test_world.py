"""The embedded world generator: determinism, official formats, masks, captions, tags, config errors."""
from __future__ import annotations

import colorsys
import csv
import io
import json
from pathlib import Path

import nltk
import numpy as np
import pytest
import webdataset as wds
from nltk.corpus.reader import TaggedCorpusReader
from nltk.tokenize import TreebankWordTokenizer
from PIL import Image
from pycocotools.coco import COCO

from ovseg_core.errors import DataError
from ovseg_core.world import (BASE_CLASSES, CLASSES, EXTRA_THINGS, NUM_THINGS, STUFF, THINGS, WorldConfig,
                              class_index, coco_category_id, generate_world, render_scene, render_single_object,
                              scene_rng, seen_flags, split_scene)
from ovseg_core.world.captions import WORD_TAGS
from ovseg_core.world.config import SceneParams
from ovseg_core.world.render import draw_thing
from ovseg_core.world.textures import pack_rgb, unpack_rgb

SMALL = {
    "seed": 7,
    "web_images": 24,
    "coco_images": 40,
    "captions_per_image": 3,
    "eval_sets": {
        "world-eval": {"images": 60},
        "world-shift": {"images": 12, "image_size": 80, "things": [3, 6], "thing_size": [0.15, 0.35],
                        "partial": 0.4, "angled": 0.7, "stuff_weights": {"sand": 3, "snow": 3, "road": 1}},
        "world-wide": {"images": 30, "vocabulary": "wide"},
    },
}
K = len(BASE_CLASSES)  # the classes of the training split and of the base-vocabulary sets
EXTRA = {len(BASE_CLASSES) + i for i in range(len(EXTRA_THINGS))}


@pytest.fixture(scope="module")
def cfg() -> WorldConfig:
    return WorldConfig.from_dict(SMALL, source="test params")


@pytest.fixture(scope="module")
def world(tmp_path_factory, cfg) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("w") / "world"
    return out, generate_world(out, cfg)


def _web_captions(root: Path) -> dict[str, list[str]]:
    """{key: captions} of the web shards, in shard order."""
    return {s["__key__"]: s["txt"].decode().splitlines()
            for s in wds.WebDataset(sorted(str(p) for p in (root / "web").glob("*.tar")), shardshuffle=False)}


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern))}


def test_same_seed_same_bytes_other_seed_differs(world, cfg, tmp_path):
    root, _ = world
    again = tmp_path / "again"
    (again / "stale").mkdir(parents=True)  # the output directory is replaced whole
    generate_world(again, cfg)
    assert not (again / "stale").exists()
    for pattern in ("*.json", "*.png", "*.jpg", "*.csv", "*.txt", "*.tar"):
        a, b = _files(root, pattern), _files(again, pattern)
        assert a and a == b, pattern
    other = tmp_path / "other"
    generate_world(other, WorldConfig.from_dict({**SMALL, "seed": 8}))
    assert _files(root, "*.png") != _files(other, "*.png")
    assert _files(root, "*.tar") != _files(other, "*.tar")


def test_counts_and_layout(world, cfg):
    root, result = world
    assert result["web_images"] == 24 and result["coco_images"] == 40 and result["scenes"] == 24 + 40 + 60 + 12 + 30
    # the web split as img2dataset writes it: one shard here (1,000 images per shard), read by webdataset
    assert sorted(p.name for p in (root / "web").iterdir()) == ["00000.tar", "00000_stats.json"]
    assert json.loads((root / "web/00000_stats.json").read_text())["successes"] == 24
    samples = list(wds.WebDataset(str(root / "web/00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in range(1, 25)]
    assert all(len(s["txt"].decode().splitlines()) == cfg.web_captions_per_image for s in samples)
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (cfg.image_size, cfg.image_size)
    assert (root / "coco/train2017/000000000040.jpg").exists()
    shift = root / "eval/world-shift/ADEChallengeData2016"
    assert Image.open(shift / "images/validation/ADE_val_00000001.jpg").size == (80, 80)
    manifest = json.loads((root / "world.json").read_text())
    assert manifest["seed"] == 7 and manifest["config"]["coco_images"] == 40
    assert [c["name"] for c in manifest["classes"]] == [c.name for c in CLASSES]
    assert {c["name"] for c in manifest["classes"] if not c["seen"]} == set(cfg.unseen) | {t.name for t in EXTRA_THINGS}
    assert [c["name"] for c in manifest["classes"] if c["vocabulary"] == "wide"] == [t.name for t in EXTRA_THINGS]


def test_extra_things_appear_in_the_web_split_and_wide_sets_only(world, cfg):
    """The extra things are CLIP's pretraining data and the wide set's, never the training split's; switching the
    web split to the base vocabulary changes neither the training split nor any held-out set."""
    web = [split_scene(cfg, "web", i) for i in range(cfg.web_images)]
    coco = [split_scene(cfg, "coco", i) for i in range(cfg.coco_images)]
    assert EXTRA & {c for s in web for c in s.thing_classes}
    assert not EXTRA & {c for s in coco for c in s.thing_classes}
    extra_names = {t.name for t in EXTRA_THINGS}
    assert not any(extra_names & set(caption.lower().rstrip(".").split()) for s in coco for caption in s.captions)
    assert any(extra_names & set(caption.lower().rstrip(".").split()) for s in web for caption in s.captions)
    base_web = WorldConfig.from_dict({**SMALL, "web_vocabulary": "base"})
    assert not EXTRA & {c for i in range(cfg.web_images) for c in split_scene(base_web, "web", i).thing_classes}
    for split, n in (("coco", 5), ("eval/world-eval", 5), ("eval/world-wide", 5)):
        for i in range(n):
            np.testing.assert_array_equal(split_scene(cfg, split, i).image, split_scene(base_web, split, i).image)


def test_coco_masks_equal_the_rendered_masks(world, cfg):
    root, _ = world
    ann_dir = root / "coco/annotations"
    seen = seen_flags(cfg)
    things, stuff = COCO(str(ann_dir / "instances_train2017.json")), COCO(str(ann_dir / "stuff_train2017.json"))
    assert len(things.getImgIds()) == 40 and things.getAnnIds() and stuff.getAnnIds()
    for image_id in things.getImgIds():
        scene = split_scene(cfg, "coco", image_id - 1)
        for api, classes, masks in ((things, scene.thing_classes, scene.thing_masks),
                                    (stuff, scene.stuff_classes, scene.stuff_masks)):
            anns = api.loadAnns(api.getAnnIds(imgIds=[image_id]))
            expected = [(c, m) for c, m in zip(classes, masks) if seen[c]]
            assert len(anns) == len(expected)
            for ann, (c, mask) in zip(anns, expected):
                assert ann["category_id"] == coco_category_id(c) and ann["iscrowd"] == 0
                np.testing.assert_array_equal(api.annToMask(ann).astype(bool), mask)
                assert ann["area"] == mask.sum()
                ys, xs = np.nonzero(mask)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_coco_categories_are_exactly_the_seen_classes(world, cfg):
    root, _ = world
    seen = seen_flags(cfg)
    unseen_things = 0
    for name, kinds in (("instances", range(NUM_THINGS)), ("stuff", range(NUM_THINGS, K))):
        data = json.loads((root / f"coco/annotations/{name}_train2017.json").read_text())
        assert sorted(c["id"] for c in data["categories"]) == [coco_category_id(i) for i in kinds if seen[i]]
        assert all(c["name"] == CLASSES[c["id"] - 1].name and c["supercategory"] for c in data["categories"])
        ids = {c["id"] for c in data["categories"]}
        assert all(a["category_id"] in ids for a in data["annotations"])
    for i in range(cfg.coco_images):  # unseen objects are in the images, only unlabelled
        unseen_things += sum(not seen[c] for c in split_scene(cfg, "coco", i).thing_classes)
    assert unseen_things > 0


def _mentions(caption: str, name: str) -> bool:
    spec = CLASSES[class_index(name)]
    words = set(TreebankWordTokenizer().tokenize(caption.lower()))
    return name in words or getattr(spec, "plural", name) in words


def test_captions(world, cfg):
    root, _ = world
    coco = COCO(str(root / "coco/annotations/captions_train2017.json"))
    unseen_mentioned = set()
    for image_id in coco.getImgIds():
        caps = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]
        assert len(caps) >= 3
        scene = split_scene(cfg, "coco", image_id - 1)
        assert caps == scene.captions
        for cap in caps:
            assert all(_mentions(cap, CLASSES[c].name) for c in scene.thing_classes), cap
            assert any(_mentions(cap, CLASSES[c].name) for c in scene.stuff_classes), cap
            unseen_mentioned |= {n for n in cfg.unseen if _mentions(cap, n)}
    assert unseen_mentioned, "captions must name unseen classes too"
    web = _web_captions(root)
    assert list(web) == [f"{i:012d}" for i in range(1, cfg.web_images + 1)]
    for key, caps in web.items():
        scene = split_scene(cfg, "web", int(key) - 1)
        assert len(caps) == cfg.web_captions_per_image
        for cap in caps:  # the web split names every class present
            assert all(_mentions(cap, n) for n in scene.class_names()), (cap, scene.class_names())


def test_tagged_captions_parse_with_nltk(world, monkeypatch):
    root, _ = world
    # NLTK 3.10 reads corpora only under its data path; adding the directory is its documented opt-in
    monkeypatch.setattr(nltk.data, "path", nltk.data.path + [str(root)])
    reader = TaggedCorpusReader(str(root), ["pos_tagged_captions.txt"])
    sents = reader.tagged_sents()
    captions = [c for caps in _web_captions(root).values() for c in caps]
    captions += [a["caption"] for a in
                 json.loads((root / "coco/annotations/captions_train2017.json").read_text())["annotations"]]
    assert len(sents) == len(captions)
    tokenizer = TreebankWordTokenizer()
    nouns = {c.name for c in CLASSES} | {t.plural for t in THINGS}
    for sent, caption in zip(sents, captions):
        assert [w for w, _ in sent] == tokenizer.tokenize(caption)
        for w, tag in sent:
            assert tag == WORD_TAGS.get(w.lower()) or (w.lower() in nouns and tag in ("NN", "NNS")), (w, tag)


def test_ade_eval_sets(world, cfg):
    root, _ = world
    for name in ("world-eval", "world-shift", "world-wide"):
        classes = BASE_CLASSES if name != "world-wide" else CLASSES
        K = len(classes)
        ade = root / "eval" / name / "ADEChallengeData2016"
        with open(ade / f"objectInfo{K}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        with open(ade / f"objectInfo{K}.txt", newline="") as f:
            txt_rows = list(csv.DictReader(f, delimiter="\t"))
        # the challenge's .txt: synonyms split by ", "; the sceneparsing .csv: every word split by ";"
        assert list(txt_rows[0]) == list(rows[0]) == ["Idx", "Ratio", "Train", "Val", "Name"]
        assert [r["Name"].split(", ") for r in txt_rows] == [[c.name, *c.synonyms] for c in classes]
        assert [r["Name"] for r in rows] == [";".join(" ".join([c.name, *c.synonyms]).split()) for c in classes]
        assert "wall;brick;wall" in {r["Name"] for r in rows}  # a two-word synonym, as the real file writes them
        assert [(r["Idx"], r["Ratio"], r["Train"], r["Val"]) for r in rows] == [
            (r["Idx"], r["Ratio"], r["Train"], r["Val"]) for r in txt_rows]
        assert [int(r["Idx"]) for r in rows] == list(range(1, K + 1))
        n = cfg.eval_sets[name].images
        values = set()
        for i in range(n):
            label = np.asarray(Image.open(ade / f"annotations/validation/ADE_val_{i + 1:08d}.png"))
            assert label.dtype == np.uint8 and label.max() <= K
            np.testing.assert_array_equal(label, split_scene(cfg, f"eval/{name}", i).label_map())
            values |= set(np.unique(label).tolist())
        assert sum(int(r["Val"]) > 0 for r in rows) == len(values - {0})
        if name == "world-eval":  # 60 scenes are enough for every class, seen and unseen
            assert values - {0} == set(range(1, K + 1))
        elif name == "world-wide":  # extra things among the labels
            assert {v - 1 for v in values} & EXTRA
        else:  # the shift set's stuff mix is its stuff_weights
            assert {v - 1 - NUM_THINGS for v in values if v > NUM_THINGS} <= {
                s for s, spec in enumerate(STUFF) if spec.name in ("sand", "snow", "road")}


def test_readers_take_the_world_as_real_data(world, cfg, tmp_path):
    """The world's ADE class files pass the reader's checks of the official formats; the seen flags the
    reader derives from the COCO split's categories are the world's own."""
    from ovseg_core.datasets.prepared import SEEN_FILE
    from ovseg_core.datasets.registry import prepare_dataset

    root, _ = world
    coco = prepare_dataset("coco-stuff-171-json", root / "coco", tmp_path / "coco", "train2017")
    ds = prepare_dataset("ade20k-150", root / "eval" / "world-eval", tmp_path / "eval", "validation",
                         train_vocabulary=coco.classes)
    assert ds.classes == [c.name for c in BASE_CLASSES]
    assert ds.source["synonyms"] == [[c.name, *c.synonyms] for c in BASE_CLASSES]
    assert len(ds.source["class_files"]) == 2  # objectInfo{K}.txt names the classes, the .csv is checked
    assert ds.seen == seen_flags(cfg)[:K]
    with open(ds.root / SEEN_FILE, newline="") as f:
        assert [r["seen"] == "True" for r in csv.DictReader(f)] == seen_flags(cfg)[:K]
    wide = prepare_dataset("ade20k-150", root / "eval" / "world-wide", tmp_path / "wide", "validation",
                           train_vocabulary=coco.classes)
    assert wide.classes == [c.name for c in CLASSES] and wide.seen == seen_flags(cfg)  # the extra things: unseen


def test_scene_masks_partition_the_image():
    params = SceneParams(things=(3, 6), partial=0.5, angled=0.5)
    for i in range(40):
        scene = render_scene(scene_rng(0, "t", i), 64, params)
        masks = np.concatenate([scene.thing_masks, scene.stuff_masks])
        assert (masks.sum(0) == 1).all()  # visible masks never overlap and cover every pixel
        assert all(m.any() for m in scene.thing_masks)
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert all(c < NUM_THINGS for c in scene.thing_classes)
        assert all(c >= NUM_THINGS for c in scene.stuff_classes)
        sky = class_index("sky")
        if sky in scene.stuff_classes:  # the sky is the top band
            assert scene.stuff_classes[0] == sky


def test_single_object():
    rng = np.random.default_rng(0)
    s = render_single_object(rng, "kite", 64, background="grass")
    assert s.thing_classes == [class_index("kite")] and s.stuff_classes == [class_index("grass")]
    assert s.thing_masks[0].sum() > 100 and not (s.thing_masks[0] & s.stuff_masks[0]).any()
    plain = render_single_object(rng, "ball", 48, background=(10, 20, 30), object_size=0.5)
    assert (plain.image[~plain.thing_masks[0]] == (10, 20, 30)).all()
    with pytest.raises(ValueError):
        render_single_object(rng, "grass")


def test_jitter_never_makes_thing_colours_overlap():
    """Body colours of neighbouring classes stay apart in hue or brightness even at the largest jitter."""
    rng = np.random.default_rng(0)
    hsv = {}
    for spec in THINGS + EXTRA_THINGS:
        body = [draw_thing(rng, spec, 24, jitter=1.5).palette[:1] for _ in range(200)]
        rgb = unpack_rgb(np.concatenate(body)).astype(float) / 255
        hsv[spec.name] = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    names = [t.name for t in THINGS + EXTRA_THINGS]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ha, hb = hsv[a][:, 0] * 360, hsv[b][:, 0] * 360
            gap = np.abs((ha[:, None] - hb[None, :] + 180) % 360 - 180).min()
            vgap = max(hsv[b][:, 2].min() - hsv[a][:, 2].max(), hsv[a][:, 2].min() - hsv[b][:, 2].max())
            assert gap > 2.0 or vgap > 0.02, (a, b)


def test_pack_roundtrip():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_rgb(pack_rgb(rgb)), rgb)


@pytest.mark.parametrize("bad, words", [
    ({"sed": 1}, ["sed", "world"]),
    ({"eval_sets": {"x": {"imgs": 3}}}, ["imgs", "world.eval_sets.x"]),
    ({"scene": {"things": [0, 3]}}, ["things"]),
    ({"unseen": ["unicorn"]}, ["unicorn"]),
    ({"unseen": ["fish"]}, ["fish", "extra things"]),
    ({"eval_sets": {"x": {"vocabulary": "huge"}}}, ["world.eval_sets.x.vocabulary", "huge"]),
    ({"coco_images": "many"}, ["coco_images", "integer"]),
    ({"captions_per_image": 2}, ["captions_per_image"]),
])
def test_bad_config_raises_clear_error(bad, words):
    with pytest.raises(DataError) as err:
        WorldConfig.from_dict(bad, source="params.yaml")
    assert "params.yaml" in str(err.value) and all(w in str(err.value) for w in words)


def test_config_roundtrip():
    cfg = WorldConfig.from_dict(SMALL)
    again = WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and cfg.eval_size("world-shift") == 80 and cfg.eval_size("world-eval") == 64


def test_the_tagger_corpus_keeps_its_size_when_the_coco_split_grows(world, cfg, tmp_path):
    """The POS-tagged captions (the nouns tagger's training set) hold every caption up to a fixed count, web ones
    first: a larger COCO split adds none once the count is reached."""
    root, _ = world
    full = (root / "pos_tagged_captions.txt").read_text().splitlines()
    web = cfg.web_images * cfg.web_captions_per_image
    assert len(full) == web + cfg.coco_images * cfg.captions_per_image  # under the cap: all of them
    cap = web + 3
    small, large = tmp_path / "small", tmp_path / "large"
    generate_world(small, cfg, tagged_sentences=cap)
    generate_world(large, WorldConfig.from_dict({**SMALL, "coco_images": 2 * cfg.coco_images}), tagged_sentences=cap)
    tagged = [(d / "pos_tagged_captions.txt").read_text().splitlines() for d in (small, large)]
    assert tagged[0] == tagged[1] == full[:cap]
