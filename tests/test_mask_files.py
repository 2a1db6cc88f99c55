"""Bring your own masks: a COCO RLE JSON (SAM's export format), written with pycocotools, read in each of its
layouts, mined instead of MaskFormer proposals, and segmented with by `ovseg segment --masks`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ovseg_core.cli import main
from ovseg_core.crops import mask_boxes
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.errors import DataError
from ovseg_core.mask_files import MaskFile
from ovseg_core.shards import INDEX_FILE
from stages.common import StageContext, run_stage
from test_segment_cli import images, run_dir  # noqa: F401 - the segment CLI's fixtures

VARIANT = "file-nouns"


def rle(mask: np.ndarray) -> dict:
    """A mask as SAM's exporter writes it: pycocotools' compressed RLE with the counts as text."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def sam_annotation(mask: np.ndarray, iou: float) -> dict:
    return {"segmentation": rle(mask), "area": int(mask.sum()), "predicted_iou": iou, "stability_score": 0.9}


def blocks(height: int, width: int) -> list[np.ndarray]:
    """Three masks that leave the bottom-right corner uncovered."""
    masks = [np.zeros((height, width), bool) for _ in range(3)]
    masks[0][: height // 2] = True
    masks[1][height // 2:, : width // 2] = True
    masks[2][height // 2: 3 * height // 4, width // 2: 3 * width // 4] = True
    return masks


def test_layouts_decode_to_the_masks_written(tmp_path):
    masks = blocks(20, 30)
    ious = [0.7, 0.95, 0.8]  # best first: masks 1, 2, 0
    anns = [sam_annotation(m, iou) for m, iou in zip(masks, ious)]
    uncompressed = dict(anns[2], segmentation={"size": [20, 30], "counts": _runs(masks[2])})
    layouts = {
        "coco": {"images": [{"id": 7, "file_name": "scene.jpg"}],
                 "annotations": [dict(a, image_id=7) for a in anns[:2]] + [dict(uncompressed, image_id=7)]},
        "results": [dict(a, file_name="scene.jpg") for a in anns],
        "per-image": {"scene": anns},
        "numeric": [dict(a, image_id=7) for a in anns],  # COCO ids match zero-padded stems
    }
    for name, data in layouts.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        found = MaskFile.load(path).masks(["scene.jpg", "000000000007", "scene"], 20, 30)
        assert found.dtype == bool and found.shape == (3, 20, 30), name
        assert all(np.array_equal(f, masks[i]) for f, i in zip(found, (1, 2, 0))), name
        assert np.array_equal(MaskFile.load(path).masks(["scene.jpg", "7", "scene"], 20, 30, limit=1), masks[1:2])


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def test_bad_masks_name_the_file_and_the_image(tmp_path):
    path = tmp_path / "sam.json"
    path.write_text(json.dumps({"scene.jpg": [sam_annotation(np.ones((20, 30), bool), 0.9)]}))
    with pytest.raises(DataError, match=r"sam\.json: image scene\.jpg: mask 0 is an RLE of size 30x20 .* 31x20"):
        MaskFile.load(path).masks(["scene.jpg"], 20, 31)
    with pytest.raises(DataError, match=r"sam\.json: no masks for image other\.jpg"):
        MaskFile.load(path).masks(["other.jpg"], 20, 30)
    path.write_text(json.dumps([{"image_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}]))
    with pytest.raises(DataError, match=r"sam\.json: \[0\]: segmentation must be an RLE"):
        MaskFile.load(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="sam.json"):
        MaskFile.load(path)


def write_dataset_masks(dataset: PreparedDataset, path: Path, resize: str | None = None) -> dict[str, list]:
    """SAM-style masks for every image of `dataset`: its ground-truth segments, in the per-image layout keyed
    by file name (`resize`: one image's masks one pixel too wide)."""
    data, masks = {}, {}
    for i, sample in enumerate(dataset.samples):
        label = dataset.load_label(i)
        segs = [label == c for c in np.unique(label) if c != dataset.ignore_label]
        if resize == sample.id:
            segs = [np.pad(s, ((0, 0), (0, 1))) for s in segs]
        masks[sample.id] = segs
        data[dataset.image_path(i).name] = [sam_annotation(s, 1.0 - 0.01 * k) for k, s in enumerate(segs)]
    path.write_text(json.dumps(data))
    return masks


def test_mining_from_a_mask_file(tiny_world, mine_params, tmp_path):
    dataset = PreparedDataset.load(tiny_world.coco)
    masks = write_dataset_masks(dataset, tmp_path / "sam.json")
    params = mine_params(tmp_path, top_proposals=4)
    params["mine"]["variants"] = {VARIANT: {"masks": "file", "mask_file": str(tmp_path / "sam.json"),
                                            "categories": "nouns"}}
    threads = torch.get_num_threads()
    try:
        summary = run_stage("mine", StageContext("mine", params, VARIANT))
    finally:
        torch.set_num_threads(threads)
    rows = pq.read_table(tmp_path / "mined" / VARIANT / INDEX_FILE).to_pylist()
    assert summary["pairs"] == len(rows) > 0
    for row in rows:  # every pair's box is the box of the file's mask it names (best first, top 4)
        assert row["proposal_index"] < 4 and json.loads(row["extra"])["mask_source"] == "file"
        mask = torch.from_numpy(masks[row["image_id"]][row["proposal_index"]])
        assert mask_boxes(mask[None])[0].tolist() == row["bbox"]
    fingerprint = json.loads((tmp_path / "work" / VARIANT / "fingerprint.json").read_text())
    assert "mask_file" in fingerprint["files"]


def test_mining_refuses_a_mask_file_of_other_images_or_sizes(tiny_world, mine_params, tmp_path):
    dataset = PreparedDataset.load(tiny_world.coco)
    bad = dataset.samples[1].id
    write_dataset_masks(dataset, tmp_path / "sam.json", resize=bad)
    params = mine_params(tmp_path)
    params["mine"]["variants"] = {VARIANT: {"masks": "file", "mask_file": str(tmp_path / "sam.json"),
                                            "categories": "nouns"}}
    threads = torch.get_num_threads()
    try:
        with pytest.raises(DataError, match=rf"sam\.json: image {dataset.image_path(1).name}: .*RLE of size"):
            run_stage("mine", StageContext("mine", params, VARIANT))
        other = tmp_path / "other.json"  # another file (the stage's process keeps its miner per settings)
        other.write_text(json.dumps({"other.jpg": []}))
        params["mine"]["variants"][VARIANT]["mask_file"] = str(other)
        with pytest.raises(DataError, match=rf"other\.json: no masks for {len(dataset)} of the {len(dataset)} images"):
            run_stage("mine", StageContext("mine", params, VARIANT))
    finally:
        torch.set_num_threads(threads)


def test_segment_with_masks_from_a_file(run_dir, images, tmp_path, capsys):  # noqa: F811 - fixtures
    square, panorama = images
    sizes = {p: Image.open(p).size for p in images}
    data = {p.name: [sam_annotation(m, 0.9) for m in blocks(sizes[p][1], sizes[p][0])] for p in images}
    data[panorama.name][0]["segmentation"] = rle(np.ones((10, 10), bool))  # wrong size for its image
    masks_json = tmp_path / "sam.json"
    masks_json.write_text(json.dumps(data))
    out = tmp_path / "out"
    code = main(["segment", str(square), str(panorama), "--classes", "sky, kite, grass", "--model", str(run_dir),
                 "--masks", str(masks_json), "--out", str(out), "--device", "cpu", "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 1 and f"{masks_json}: image {panorama.name}: mask 0 is an RLE of size 10x10" in err
    assert sorted(p.name for p in out.iterdir()) == ["square.json", "square.labels.png", "square.overlay.png"]
    labels = np.asarray(Image.open(out / "square.labels.png"))
    record = json.loads((out / "square.json").read_text())
    assert record["mode"] == "masks"
    height, width = labels.shape
    for mask in blocks(height, width):  # one class per given mask, nothing outside them
        assert len(np.unique(labels[mask])) == 1 and labels[mask][0] < 3
    covered = np.any(blocks(height, width), axis=0)
    assert (labels[~covered] == 255).all()
    assert sum(c["pixel_share"] for c in record["per_class"]) == pytest.approx(covered.mean())


def test_segment_with_masks_needs_no_proposal_network(run_dir, images, tmp_path, capsys):  # noqa: F811 - fixtures
    """With `--masks` only CLIP labels the regions: a CLIP alone (`--clip`) is enough, no MaskFormer is loaded, and
    the labels are those of the same CLIP run beside a proposal network."""
    square, _ = images
    width, height = Image.open(square).size
    masks_json = tmp_path / "sam.json"
    masks_json.write_text(json.dumps({square.name: [sam_annotation(m, 0.9) for m in blocks(height, width)]}))
    args = ["segment", str(square), "--classes", "sky, kite, grass", "--masks", str(masks_json), "--device", "cpu",
            "--precision", "fp32"]
    assert main([*args, "--model", str(run_dir), "--out", str(tmp_path / "with-run")]) == 0
    clip_only = ["--clip", str(run_dir / "adapt_clip" / "ft-mpt"), "--model", str(tmp_path / "no-such-run")]
    assert main([*args, *clip_only, "--out", str(tmp_path / "clip-only")]) == 0
    assert f"models: masks from {masks_json} + CLIP" in capsys.readouterr().out
    record = json.loads((tmp_path / "clip-only" / "square.json").read_text())
    assert record["models"]["maskformer"] is None
    with_run, clip_only_labels = (np.asarray(Image.open(tmp_path / d / "square.labels.png")) for d in ("with-run", "clip-only"))
    assert np.array_equal(with_run, clip_only_labels)
    bf16 = [*args[:-1], "bf16", *clip_only, "--out", str(tmp_path / "bf16")]  # CPU autocast: softmax stays bf16
    assert main(bf16) == 0
    assert (np.asarray(Image.open(tmp_path / "bf16" / "square.labels.png")) == with_run).mean() > 0.9
