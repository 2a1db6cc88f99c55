"""Tests on models the pipeline's own stages trained (one file, so that the minutes-long fixture is built once per
test run, also under pytest-xdist): `ovseg segment`'s own label maps on held-out images of the embedded world,
named with their ground-truth class names (seen and unseen), must reach an accuracy floor; evaluation in bf16
stays within a bound of fp32.

The models come from the pipeline's own stages (world → prepare → pretrain_clip → train_maskformer),
run in-process from params.yaml with a smaller world and fewer steps, in a temporary working directory:
the same files, in the same models/ layout, as `dvc repro` writes (conftest's `trained_run`).

Floors, set from the figures measured on 2026-12-02 (2-core machine, 24 held-out images, 24 classes of
which 6 unseen, CLIP `original`): the CLI's mIoU was 15.5 (seen 20.7, unseen 0.0: with this little
pretraining CLIP does not yet name the unseen objects right; the full embedded run reaches 9.6 unseen),
the best constant answer (every pixel labelled with the most frequent class) 0.7. The floors leave room
for platform noise: mIoU at least FLOOR_MIOU and at least FLOOR_OVER_BASELINE times the constant answer.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from conftest import TRAINED_RUN_EVAL_IMAGES as EVAL_IMAGES
from ovseg_core.clip.adapted import load_adapted
from ovseg_core.compute import Placement
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.evaluation import BRANCHES, BranchSegmenter, evaluate_branches
from ovseg_core.maskformer.model import load_model
from ovseg_core.metrics import ConfusionMatrix
from scripts.bench_segment import cli_miou

# The bound for bf16 vs fp32 is 0.5 mIoU on the embedded evaluation (150 images; measured 0.00-0.04 with the
# committed fp32 models on the Intel machine); this test's set is the small trained run's (TRAINED_RUN_EVAL_IMAGES),
# where a few flipped pixels of a small class move mIoU more: 0.0 on an AMD EPYC (AVX512-BF16), 0.57 on an Intel
# Xeon (AMX) for the ensemble. A precision bug (a branch left in bf16 end to end, wrong autocast) moves it by points.
MAX_MIOU_GAP = 1.0
FLOOR_MIOU = 10.0
FLOOR_OVER_BASELINE = 5.0


def constant_answer_miou(dataset: PreparedDataset, count: int) -> float:
    """mIoU of labelling every pixel with the class that covers most pixels of these images."""
    labels = [dataset.load_label(i) for i in range(count)]
    valid = np.concatenate([lab[lab != dataset.ignore_label].ravel() for lab in labels])
    majority = int(np.bincount(valid, minlength=dataset.num_classes).argmax())
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_label)
    for lab in labels:
        cm.update(np.full_like(lab, majority), lab)
    return cm.metrics(dataset.classes, dataset.seen).miou


def test_cli_segments_held_out_images_with_their_class_names_above_the_floor(trained_run, tmp_path):
    prepared = trained_run / "data" / "prepared" / "eval" / "world-eval"
    dataset = PreparedDataset.load(prepared)
    assert not all(dataset.seen), "the vocabulary must include classes the proposal network never saw"
    result = cli_miou(trained_run / "models", prepared, EVAL_IMAGES, clip_variant="original")
    baseline = constant_answer_miou(dataset, EVAL_IMAGES)
    print(f"CLI on {EVAL_IMAGES} held-out images: mIoU {result['mIoU']:.1f} (seen {result['seen_mIoU']:.1f}, "
          f"unseen {result['unseen_mIoU']:.1f}), constant answer {baseline:.1f}, "
          f"{result['latency_s_median']:.3f} s/image median")
    assert result["images"] == EVAL_IMAGES and result["classes"] == dataset.num_classes
    assert result["mIoU"] >= FLOOR_MIOU
    assert result["mIoU"] >= FLOOR_OVER_BASELINE * baseline


def test_cli_writes_overlay_and_label_map_for_an_unseen_vocabulary(trained_run, tmp_path):
    from ovseg_core.cli import main, output_paths

    dataset = PreparedDataset.load(trained_run / "data" / "prepared" / "eval" / "world-eval")
    unseen = [c for c, s in zip(dataset.classes, dataset.seen) if not s]
    image = dataset.image_path(0)
    status = main(["segment", str(image), "--classes", ", ".join(unseen + ["grass", "sky"]),
                   "--model", str(trained_run / "models"), "--clip-variant", "original", "--out", str(tmp_path)])
    assert status == 0
    files = output_paths(tmp_path, image.stem)
    overlay, labels = Image.open(files["overlay"]), np.asarray(Image.open(files["labels"]))
    height, width = dataset.load_label(0).shape
    assert labels.shape == (height, width) and labels.max() < len(unseen) + 2
    assert overlay.width >= width and overlay.height >= height  # the image plus its legend


def test_bf16_evaluation_is_within_half_a_point_of_fp32(trained_run):
    dataset = PreparedDataset.load(trained_run / "data" / "prepared" / "eval" / "world-eval")
    scores = {}
    for precision in ("fp32", "bf16"):
        model, _ = load_model(trained_run / "models" / "train_maskformer" / "model.pt")
        adapted = load_adapted(trained_run / "models" / "pretrain_clip" / "clip.pt", "ovseg-tiny-vit")
        segmenter = BranchSegmenter.build(model, adapted, dataset.classes, 0.5, placement=Placement(torch.device("cpu"), precision))
        result = evaluate_branches(segmenter, dataset, 0.7)
        scores[precision] = {b: m.miou for b, m in result.metrics(dataset.classes, dataset.seen).items()}
    print("mIoU fp32 / bf16:", {b: (round(scores["fp32"][b], 2), round(scores["bf16"][b], 2)) for b in BRANCHES})
    assert scores["fp32"]["ensemble"] > 5  # trained models: the comparison is about real predictions
    for branch in BRANCHES:
        assert abs(scores["bf16"][branch] - scores["fp32"][branch]) <= MAX_MIOU_GAP, branch
