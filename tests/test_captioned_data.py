"""Mine your own captioned images: world images with their captions written as an img2dataset WebDataset and as
a folder with sidecar .txt captions, prepared by the two readers and mined by the `mine` stage with a proposal
network, no segmentation labels; the index and the dataset card must count what was mined."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from ovseg_core.archive import read_bytes
from ovseg_core.datasets.prepared import PreparedDataset, load_rgb
from ovseg_core.datasets.registry import prepare_dataset
from ovseg_core.errors import DataError
from ovseg_core.maskformer.model import load_model
from ovseg_core.shards import CARD_FILE, INDEX_FILE, SIZES_FILE
from stages.common import StageContext, run_stage

VARIANT = "proposals-nouns"
SHARD_SIZE = 16


def world_images(tiny_world) -> list[tuple[Path, list[str]]]:
    """(image file, captions) of the tiny world's captioned images (its COCO and web splits)."""
    out = []
    for root in (tiny_world.coco, tiny_world.web):
        dataset = PreparedDataset.load(root)
        captions = dataset.captions()
        out += [(dataset.image_path(i), captions[s.id]) for i, s in enumerate(dataset.samples)]
    return out


def write_img2dataset(images: list[tuple[Path, list[str]]], root: Path, uncaptioned: int | None = None) -> Path:
    """Shards as img2dataset writes them: <key>.jpg + .txt + .json per sample, NNNNN_stats.json beside each tar
    (`uncaptioned`: that sample has neither a .txt nor a caption in its .json)."""
    root.mkdir(parents=True)
    for shard, start in enumerate(range(0, len(images), SHARD_SIZE)):
        batch = images[start:start + SHARD_SIZE]
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for k, (image, captions) in enumerate(batch):
                key = f"{shard:05d}{k:04d}"
                caption = None if start + k == uncaptioned else captions[0]
                sample = {"__key__": key, "jpg": read_bytes(image),
                          "json": json.dumps({"caption": caption, "key": key, "status": "success",
                                              "url": f"https://example.org/{image.name}"}).encode()}
                if caption is not None:
                    sample["txt"] = caption.encode()
                sink.write(sample)
        stats = {"count": len(batch), "successes": len(batch), "failed_to_download": 0}
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return root


def write_folder(images: list[tuple[Path, list[str]]], root: Path) -> Path:
    """img.jpg + img.txt (every caption, one a line), half of them in a sub-folder."""
    for k, (image, captions) in enumerate(images):
        where = root / ("holiday" if k % 2 else "") / f"photo {k}{image.suffix}"
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(read_bytes(image))
        where.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    return root


def mine(mine_params, dataset: Path, base: Path) -> tuple[dict, Path, list[str]]:
    """Mine `dataset`; the stage's summary, its out, and the classes its proposal network was trained on."""
    params = mine_params(base, images_per_unit=10)
    params["mine"]["dataset"] = str(dataset)
    params["mine"]["variants"] = {VARIANT: {"masks": "proposals", "categories": "nouns"}}
    threads = torch.get_num_threads()
    try:
        summary = run_stage("mine", StageContext("mine", params, VARIANT))
    finally:
        torch.set_num_threads(threads)
    return summary, base / "mined" / VARIANT, load_model(params["mine"]["proposal_net"])[1]["classes"]


def check_mined(summary: dict, out: Path, dataset: PreparedDataset, trained_classes: list[str]) -> list[dict]:
    rows = pq.read_table(out / INDEX_FILE).to_pylist()
    # a caption-only set has no classes of its own: the nouns are compared with what the proposal network learnt
    nouns = {r["noun"] for r in rows}
    assert dataset.classes == []
    assert summary["training_classes_mined"] == len(nouns & set(trained_classes)) > 0
    assert summary["nouns_outside_training_vocabulary"] == len(nouns - set(trained_classes))
    captions = dataset.captions()
    assert summary["pairs"] == len(rows) == sum(json.loads((out / SIZES_FILE).read_text()).values()) > 0
    assert summary["images"] == len({r["image_id"] for r in rows})
    assert {r["image_id"] for r in rows} <= {s.id for s in dataset.samples}
    assert all(r["caption"] == captions[r["image_id"]][0] for r in rows)  # num_captions 1: the first caption
    card = (out / CARD_FILE).read_text()
    assert f"| pairs | {len(rows)} |" in card and f"| images | {summary['images']} |" in card
    return rows


def test_img2dataset_shards_prepare_and_mine(tiny_world, mine_params, tmp_path):
    images = world_images(tiny_world)
    root = write_img2dataset(images, tmp_path / "shards", uncaptioned=3)
    prepared = prepare_dataset("webdataset-captions", root, tmp_path / "prepared" / "mine", "train",
                               dataset_name="my-shards")
    assert len(prepared) == len(images) - 1 and prepared.classes == []
    assert [s["reason"] for s in prepared.skipped] == ["image without a caption"]
    assert prepared.skipped[0]["path"].endswith("00000.tar/000000003.jpg")
    assert prepared.captions()["000010002"] == [images[SHARD_SIZE + 2][1][0]]
    assert prepared.samples[0].image.endswith("shards/00000.tar/000000000.jpg")  # the images stay in the shards
    np.testing.assert_array_equal(prepared.load_image(0), load_rgb(images[0][0]))
    summary, out, trained = mine(mine_params, prepared.root, tmp_path)
    check_mined(summary, out, prepared, trained)


def test_caption_folder_prepares_and_mines(tiny_world, mine_params, tmp_path):
    images = world_images(tiny_world)
    root = write_folder(images, tmp_path / "photos")
    (root / "notes.jpg").write_bytes(read_bytes(images[0][0]))  # an image without a caption: skipped
    params = {"prepare": {  # through the prepare stage, as the README's walkthrough does
        "out": str(tmp_path / "prepared"),
        "train": {"name": "world-coco", "reader": "coco-stuff-171-json", "root": str(tiny_world.root / "coco"),
                  "split": "train2017"},
        "captioned": {"my-photos": {"reader": "caption-folder", "root": str(root)}}}}
    summary = run_stage("prepare", StageContext("prepare", params))
    assert summary["my-photos_images"] == len(images) and summary["my-photos_skipped"] == 1
    prepared = PreparedDataset.load(tmp_path / "prepared" / "my-photos")
    assert len(prepared) == len(images) and [s["reason"] for s in prepared.skipped] == ["image without a caption"]
    assert prepared.captions()["holiday__photo_1"] == images[1][1]  # every line is a caption
    summary, out, trained = mine(mine_params, prepared.root, tmp_path)
    check_mined(summary, out, prepared, trained)


def test_captions_without_images_name_the_file(tiny_world, tmp_path):
    images = world_images(tiny_world)[:3]
    folder = write_folder(images, tmp_path / "photos")
    (folder / "holiday" / "photo 1.jpg").unlink()
    with pytest.raises(DataError, match=r"holiday/photo 1\.txt: caption file without an image"):
        prepare_dataset("caption-folder", folder, tmp_path / "out", "train")

    shards = write_img2dataset(images, tmp_path / "shards")
    with wds.TarWriter(str(shards / "00001.tar")) as sink:  # a caption whose image is not in the shard
        sink.write({"__key__": "000010000", "txt": b"a kite"})
    with pytest.raises(DataError, match=r"00001\.tar/000010000\.txt: caption without an image"):
        prepare_dataset("webdataset-captions", shards, tmp_path / "out", "train")

    (shards / "00001.tar").unlink()
    (shards / "00000_stats.json").write_text(json.dumps({"successes": 4}))
    with pytest.raises(DataError, match=r"00000\.tar: holds 3 images but 00000_stats\.json counts 4"):
        prepare_dataset("webdataset-captions", shards, tmp_path / "out", "train")
    assert not (tmp_path / "out").exists()
