"""Generate the whole embedded world on disk, in the official formats.

Layout under the output directory::

    web/{shard:05d}.tar, web/{shard:05d}_stats.json               contrastive pretraining (img2dataset's WebDataset)
    coco/train2017/{id:012d}.jpg                                  segmentation training images
    coco/annotations/instances_train2017.json                     seen things, RLE
    coco/annotations/stuff_train2017.json                         seen stuff, RLE
    coco/annotations/captions_train2017.json                      captions naming seen and unseen nouns
    eval/<set>/ADEChallengeData2016/{images,annotations}/validation/ADE_val_{i:08d}.{jpg,png}
    eval/<set>/ADEChallengeData2016/objectInfo{K}.{txt,csv}       the set's vocabulary, label = Idx (ADE's two formats)
    pos_tagged_captions.txt                                       word/TAG captions (web, then coco; the first 30,000)
    world.json                                                    manifest

Every scene is seeded from (seed, split, index), so any one image can be regenerated alone with
`split_scene`.
"""
from __future__ import annotations

import contextlib
import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..archive import reproducible_tar_writer
from ..atomic import atomic_dir, write_json, write_text
from ..progress import Progress
from .captions import make_captions
from .config import WorldConfig
from .render import Scene, render_scene
from .spec import BASE_CLASSES, CLASSES, NUM_THINGS, class_index, coco_category_id, vocabulary_classes
from .writers import (ADE_DIR, coco_categories, coco_image, jpeg_bytes, png_bytes, rle_annotations,
                      tagged_line, write_coco_json, write_new_file, write_object_info)

GENERATOR_VERSION = "1.2"  # 1.2: extra things in the web split and wide-vocabulary eval sets; 1.1: web as WebDataset
TAGGED_CAPTIONS = "pos_tagged_captions.txt"
# The tagged captions train the nouns tagger (`trained:<file>`), the world's stand-in for a treebank: a corpus of
# fixed size. Every caption of a COCO-sized split (600K sentences) made each mining process spend minutes and
# hundreds of MB training it; the default world's 23,500 all fit.
TAGGED_SENTENCES = 30_000
MANIFEST = "world.json"
WEB_SHARD_SIZE = 1000  # images per web shard (img2dataset's number_sample_per_shard; its default is 10,000)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def split_scene(cfg: WorldConfig, split: str, index: int) -> Scene:
    """Scene `index` (0-based) of split 'web', 'coco' or 'eval/<set name>', exactly as generate_world writes it."""
    rng = scene_rng(cfg.seed, split, index)
    if split in ("web", "coco"):
        scene = render_scene(rng, cfg.image_size, cfg.scene, cfg.seed,
                             cfg.web_vocabulary if split == "web" else "base")
        if split == "web":
            make_captions(rng, scene, cfg.web_captions_per_image, all_stuff=True)
        else:
            make_captions(rng, scene, cfg.captions_per_image, all_stuff=False)
        return scene
    name = split.removeprefix("eval/")
    if not split.startswith("eval/") or name not in cfg.eval_sets:
        raise KeyError(f"unknown split {split!r}; known: web, coco, " + ", ".join(f"eval/{n}" for n in cfg.eval_sets))
    es = cfg.eval_sets[name]
    return render_scene(rng, cfg.eval_size(name), es, cfg.seed, es.vocabulary)


def seen_flags(cfg: WorldConfig) -> list[bool]:
    """Per class of CLASSES: labelled in the training split (the extra things never are)."""
    unseen = {class_index(n) for n in cfg.unseen}
    return [i < len(BASE_CLASSES) and i not in unseen for i in range(len(CLASSES))]


def ade_name(index: int) -> str:
    return f"ADE_val_{index + 1:08d}"


def _write_web(root: Path, cfg: WorldConfig, tagged: list[str]) -> dict[str, int]:
    # As img2dataset downloads web image-text data: shards of <key>.jpg + <key>.txt (the captions, one per line) +
    # <key>.json, each with a _stats.json. `prepare` reads them with the webdataset-captions reader, as it would a
    # real download, and the images stay in the shards.
    root.mkdir(parents=True)
    captions = 0
    starts = range(0, cfg.web_images, WEB_SHARD_SIZE)
    with Progress(cfg.web_images, "world: web") as bar:
        for shard, start in enumerate(starts):
            keys = range(start + 1, min(start + WEB_SHARD_SIZE, cfg.web_images) + 1)
            with contextlib.closing(reproducible_tar_writer(root / f"{shard:05d}.tar")) as tar:
                for image_id in keys:
                    scene = split_scene(cfg, "web", image_id - 1)
                    key = f"{image_id:012d}"
                    meta = {"key": key, "caption": scene.captions[0], "status": "success",
                            "width": cfg.image_size, "height": cfg.image_size}
                    tar.write({"__key__": key, "jpg": jpeg_bytes(scene.image, cfg.jpeg_quality),
                               "txt": "\n".join(scene.captions).encode("utf-8"),
                               "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
                    tagged.extend(tagged_line(tokens) for tokens in scene.tagged)
                    captions += len(scene.captions)
                    bar.update()
            write_json(root / f"{shard:05d}_stats.json", {"count": len(keys), "successes": len(keys),
                                                          "failed_to_download": 0, "failed_to_resize": 0})
    return {"web_images": cfg.web_images, "web_shards": len(starts), "web_captions": captions}


def _write_coco(root: Path, cfg: WorldConfig, seen: list[bool], tagged: list[str],
                presence: np.ndarray) -> dict[str, int]:
    (root / "train2017").mkdir(parents=True)
    images, things, stuff, caps = [], [], [], []
    with Progress(cfg.coco_images, "world: coco") as bar:
        for i in range(cfg.coco_images):
            scene = split_scene(cfg, "coco", i)
            image_id = i + 1
            file_name = f"{image_id:012d}.jpg"
            write_new_file(root / "train2017" / file_name, jpeg_bytes(scene.image, cfg.jpeg_quality))
            images.append(coco_image(image_id, file_name, cfg.image_size))
            presence[np.unique(scene.thing_classes + scene.stuff_classes)] += 1
            keep = [k for k, c in enumerate(scene.thing_classes) if seen[c]]
            things += rle_annotations(scene.thing_masks[keep], len(things) + 1, image_id,
                                      [coco_category_id(scene.thing_classes[k]) for k in keep])
            keep = [k for k, c in enumerate(scene.stuff_classes) if seen[c]]
            stuff += rle_annotations(scene.stuff_masks[keep], len(stuff) + 1, image_id,
                                     [coco_category_id(scene.stuff_classes[k]) for k in keep])
            for text, tokens in zip(scene.captions, scene.tagged):
                caps.append({"id": len(caps) + 1, "image_id": image_id, "caption": text})
                tagged.append(tagged_line(tokens))
            bar.update()
    ann_dir = root / "annotations"
    ann_dir.mkdir()
    seen_things = [i for i in range(NUM_THINGS) if seen[i]]
    seen_stuff = [i for i in range(NUM_THINGS, len(BASE_CLASSES)) if seen[i]]
    write_coco_json(ann_dir / "instances_train2017.json", "ovseg embedded world: seen things", images, things,
                    coco_categories(seen_things))
    write_coco_json(ann_dir / "stuff_train2017.json", "ovseg embedded world: seen stuff", images, stuff,
                    coco_categories(seen_stuff))
    write_coco_json(ann_dir / "captions_train2017.json", "ovseg embedded world: captions", images, caps)
    return {"coco_images": len(images), "coco_thing_annotations": len(things),
            "coco_stuff_annotations": len(stuff), "coco_captions": len(caps)}


def _write_eval(root: Path, cfg: WorldConfig, name: str, coco_presence: np.ndarray
                ) -> dict[str, int]:
    ade = root / ADE_DIR
    img_dir, ann_dir = ade / "images" / "validation", ade / "annotations" / "validation"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    classes = vocabulary_classes(cfg.eval_sets[name].vocabulary)
    k = len(classes)
    pixels = np.zeros(k + 1, np.int64)
    present = np.zeros(k, np.int64)
    n = cfg.eval_sets[name].images
    with Progress(n, f"world: eval/{name}") as bar:
        for i in range(n):
            scene = split_scene(cfg, f"eval/{name}", i)
            write_new_file(img_dir / f"{ade_name(i)}.jpg", jpeg_bytes(scene.image, cfg.jpeg_quality))
            label = scene.label_map()
            write_new_file(ann_dir / f"{ade_name(i)}.png", png_bytes(label))
            counts = np.bincount(label.ravel(), minlength=k + 1)
            pixels += counts
            present += counts[1:] > 0
            bar.update()
    write_object_info(ade, classes, pixels[1:] / max(1, pixels.sum()), coco_presence, present)
    return {"images": n, "image_size": cfg.eval_size(name), "classes": k,
            "classes_present": int((present > 0).sum())}


def generate_world(out_dir: str | Path, cfg: WorldConfig, tagged_sentences: int = TAGGED_SENTENCES) -> dict[str, Any]:
    """Write the whole world to `out_dir` (replaced atomically); returns counts and timings."""
    cfg.validate()
    seen = seen_flags(cfg)
    times: dict[str, float] = {}
    counts: dict[str, Any] = {}
    tagged: list[str] = []
    coco_presence = np.zeros(len(CLASSES), np.int64)
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        t = time.perf_counter()
        counts.update(_write_web(tmp / "web", cfg, tagged))
        times["web_s"] = time.perf_counter() - t
        t = time.perf_counter()
        counts.update(_write_coco(tmp / "coco", cfg, seen, tagged, coco_presence))
        times["coco_s"] = time.perf_counter() - t
        t = time.perf_counter()
        counts["eval"] = {name: _write_eval(tmp / "eval" / name, cfg, name, coco_presence)
                          for name in cfg.eval_sets}
        times["eval_s"] = time.perf_counter() - t
        write_text(tmp / TAGGED_CAPTIONS, "\n".join(tagged[:tagged_sentences]) + "\n")
        write_json(tmp / MANIFEST, manifest(cfg, seen, counts))
    times["total_s"] = time.perf_counter() - start
    scenes = counts["web_images"] + counts["coco_images"] + sum(e["images"] for e in counts["eval"].values())
    return {**counts, "scenes": scenes, "seconds": times, "scenes_per_s": scenes / times["total_s"]}


def manifest(cfg: WorldConfig, seen: list[bool], counts: dict[str, Any]) -> dict[str, Any]:
    classes = []
    for i, spec in enumerate(CLASSES):
        entry = {"index": i, "name": spec.name, "kind": spec.kind, "vocabulary": "base" if i < len(BASE_CLASSES) else "wide",
                 "seen": seen[i], "synonyms": list(spec.synonyms),
                 "supercategory": spec.supercategory, "colour": spec.colour, "ade_label": i + 1,
                 "coco_id": coco_category_id(i) if seen[i] else None}
        if spec.kind == "thing":
            entry.update(plural=spec.plural, shape=spec.shape, pattern=spec.pattern)
        else:
            entry.update(texture=spec.texture)
        classes.append(entry)
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "classes": classes,
        "counts": counts,
        "files": {
            "web_shards": "web/{00000..}.tar",
            "coco_images": "coco/train2017",
            "coco_instances": "coco/annotations/instances_train2017.json",
            "coco_stuff": "coco/annotations/stuff_train2017.json",
            "coco_captions": "coco/annotations/captions_train2017.json",
            "eval": {name: f"eval/{name}/{ADE_DIR}" for name in cfg.eval_sets},
            "class_files": {name: [f"objectInfo{k}.txt", f"objectInfo{k}.csv"]
                            for name, es in cfg.eval_sets.items()
                            for k in [len(vocabulary_classes(es.vocabulary))]},
            "pos_tagged_captions": TAGGED_CAPTIONS,
        },
    }
