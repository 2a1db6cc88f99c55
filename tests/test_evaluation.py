"""Evaluation: all branches from shared per-image computations, the λ × threshold sweep, merging chunks."""
from __future__ import annotations

import math

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_core.clip.adapted import AdaptedClip
from ovseg_core.clip.models import load_clip
from ovseg_core.clip.mpt import MaskPrompts
from ovseg_core.clip.text import text_features
from ovseg_core.datasets.prepared import PreparedDataset, PreparedWriter
from ovseg_core.evaluation import BRANCHES, BranchResult, BranchSegmenter, SweepResult, evaluate_branches, sweep
from ovseg_core import inference
from ovseg_core.inference import segment
from ovseg_core.maskformer import build_model, preset_config
from ovseg_core.metrics import ConfusionMatrix

torch.set_num_threads(1)

CLASSES = ["sand", "water", "box", "ball", "sky"]
SEEN = [True, True, False, True, False]


def write_prepared(root, classes=CLASSES, seen=SEEN, sizes=((64, 64), (48, 80), (64, 64), (72, 56)), seed=0):
    """A tiny prepared set of random images and label maps (with ignore pixels)."""
    rng = np.random.default_rng(seed)
    (root / "raw").mkdir(parents=True)
    with PreparedWriter(root / "prepared", "toy", classes, seen, 255) as w:
        for i, (h, w_) in enumerate(sizes):
            path = root / "raw" / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w_, 3), dtype=np.uint8)).save(path)
            label = rng.integers(0, len(classes), (h, w_))
            label[:4] = 255
            w.add(f"img{i}", path, label)
    return PreparedDataset.load(root / "prepared")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def adapted():
    torch.manual_seed(0)
    bundle = load_clip("ovseg-tiny-vit")
    bundle.model.eval()
    bundle.model.logit_scale.data.fill_(math.log(100.0))  # OpenAI's scale: crops' small differences show in p_clip
    prompts = MaskPrompts.for_visual(bundle.model.visual, depth=2, init_std=0.5)
    return AdaptedClip("mpt", bundle, prompts)


@pytest.fixture(scope="module")
def segmenter(adapted):
    torch.manual_seed(1)
    # A soft class head and sharper masks than random init gives, so that thresholds and λ change the maps.
    net = preset_config("tiny", num_queries=6, logit_scale=3.0)
    model = build_model(net, torch.randn(3, adapted.bundle.embed_dim)).eval()
    with torch.no_grad():
        for p in model.mask_embedder.parameters():
            p.mul_(8)
    return BranchSegmenter.build(model, adapted, CLASSES, threshold=0.5)


def test_build_gives_both_branches_the_vild_vocabulary(segmenter, adapted):
    expected = text_features(adapted.bundle, CLASSES)
    assert torch.allclose(segmenter.model.class_predictor.text_features, expected, atol=1e-6)
    assert torch.equal(segmenter.clip.text_features, expected)
    assert segmenter.clip.logit_scale == pytest.approx(adapted.bundle.model.logit_scale.exp().item())
    crops, masks = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[:, :20] = True
    # the encoder is the adapted one: background patches get the mask prompts
    plain = AdaptedClip("original", adapted.bundle, None).encoder()(crops, masks)
    assert not torch.allclose(segmenter.clip.encode(crops, masks), plain, atol=1e-4)


@pytest.mark.parametrize("threshold,seen_lambda", [(0.5, False), (0.5, True), (0.998, True), (1.0, False)])
def test_every_branch_equals_segment_run_alone(segmenter, dataset, threshold, seen_lambda):
    """0.998 drops some masks on some images; 1.0 leaves no crop at all (segment's fallback to MaskFormer)."""
    s = replace(segmenter, clip=replace(segmenter.clip, threshold=threshold))
    lam = 0.65
    result = evaluate_branches(s, dataset, lam, seen_lambda=seen_lambda, keep_examples=len(dataset))
    seen = torch.tensor(dataset.seen) if seen_lambda else None
    expected = {b: ConfusionMatrix(dataset.num_classes, dataset.ignore_label) for b in BRANCHES}
    kept = []
    for i, (sample, image, gt) in enumerate(dataset):
        direct = {"maskformer": segment(s.model, image),
                  "clip": segment(s.model, image, clip=s.clip, lam=1.0),
                  "ensemble": segment(s.model, image, clip=s.clip, lam=lam, seen=seen)}
        kept.append(len(direct["ensemble"].mask_indices))
        example = result.examples[i]
        assert example.id == sample.id and np.array_equal(example.label, gt)
        for b, seg in direct.items():
            assert np.array_equal(example.predictions[b], seg.labels.numpy()), (b, sample.id)
            expected[b].update(seg.labels, gt)
    for b in BRANCHES:
        assert np.array_equal(result.confusion[b], expected[b].matrix), b
    assert result.images == len(dataset) and set(result.seconds) >= set(BRANCHES)
    assert result.images_per_s() < min(result.images_per_s(b) for b in BRANCHES)
    if threshold == 0.998:
        assert min(kept) < 6 and max(kept) > 0  # partly dropped masks are exercised
    if threshold == 1.0:  # nothing survives: CLIP-only and ensemble fall back to MaskFormer
        assert np.array_equal(result.confusion["clip"], result.confusion["maskformer"])
    else:  # the branches really differ on these random models
        assert not np.array_equal(result.confusion["clip"], result.confusion["maskformer"])


def test_chunks_merge_to_the_whole(segmenter, dataset):
    whole = evaluate_branches(segmenter, dataset, 0.7, keep_examples=3)
    parts = [evaluate_branches(segmenter, dataset, 0.7, indices=r, keep_examples=3) for r in (range(2, 4), range(0, 2))]
    merged = BranchResult.merge(parts)
    assert merged.images == whole.images
    for b in BRANCHES:
        assert np.array_equal(merged.confusion[b], whole.confusion[b])
    assert [e.index for e in merged.examples] == [0, 1, 2]
    metrics = merged.metrics(dataset.classes, dataset.seen)
    assert metrics["ensemble"].miou == whole.metrics(dataset.classes, dataset.seen)["ensemble"].miou


def test_equal_sized_images_share_a_forward_pass_with_each_images_own_results(segmenter, dataset, monkeypatch):
    """batch_images 4 over sizes 64x64, 48x80, 64x64, 72x56: three MaskFormer passes (images 0 and 2 together)
    instead of four; every image's maps equal one image at a time up to float rounding, in index order."""
    passes = []
    real_run = inference._run
    monkeypatch.setattr(inference, "_run", lambda model, images: passes.append(len(images)) or real_run(model, images))
    one = evaluate_branches(segmenter, dataset, 0.7, keep_examples=4, batch_images=1)
    assert passes == [1, 1, 1, 1]
    passes.clear()
    batched = evaluate_branches(segmenter, dataset, 0.7, keep_examples=4, batch_images=4)
    assert sorted(passes) == [1, 1, 2]
    assert [e.index for e in batched.examples] == [0, 1, 2, 3]
    for a, b in zip(one.examples, batched.examples):
        for branch in BRANCHES:
            assert (a.predictions[branch] == b.predictions[branch]).mean() >= 0.999, (a.index, branch)
    passes.clear()
    grid = sweep(segmenter, dataset, [0.0, 0.7], [0.5], batch_images=4)
    assert sorted(passes) == [1, 1, 2] and grid.images == 4


def test_sweep_cells_equal_direct_evaluations(segmenter, dataset):
    lambdas, thresholds = [0.0, 0.35, 1.0], [0.1, 0.9]
    grid = sweep(segmenter, dataset, lambdas, thresholds, seen_lambda=True)
    assert grid.confusion.shape == (2, 3, 5, 5) and grid.images == len(dataset)
    for t in thresholds:
        s = replace(segmenter, clip=replace(segmenter.clip, threshold=t))
        direct = evaluate_branches(s, dataset, 0.35, seen_lambda=True)
        assert np.array_equal(grid.cell(0.35, t), direct.confusion["ensemble"])
        clip_only = evaluate_branches(s, dataset, 1.0)  # without seen flags, the ensemble at λ = 1 is CLIP alone
        assert np.array_equal(clip_only.confusion["ensemble"], clip_only.confusion["clip"])
    assert any(not np.array_equal(grid.cell(lam, 0.1), grid.cell(lam, 0.9)) for lam in lambdas)  # thresholds matter
    assert any(not np.array_equal(grid.cell(0.0, t), grid.cell(1.0, t)) for t in thresholds)  # and λ does
    rows = grid.rows(dataset.classes, dataset.seen)
    assert [(r["threshold"], r["lambda"]) for r in rows] == [(t, lam) for t in thresholds for lam in lambdas]

    halves = [sweep(segmenter, dataset, lambdas, thresholds, seen_lambda=True, indices=r)
              for r in (range(0, 1), range(1, 4))]
    assert np.array_equal(SweepResult.merge(halves).confusion, grid.confusion)
    with pytest.raises(ValueError):
        sweep(segmenter, dataset, [0.5, 0.5], thresholds)


def test_vocabulary_must_match_the_dataset(segmenter, tmp_path):
    other = write_prepared(tmp_path, classes=["a", "b"], seen=[True, False], sizes=((32, 32),))
    with pytest.raises(ValueError, match="2"):
        evaluate_branches(segmenter, other, 0.5)


# -- the evaluate and sweep stages ------------------------------------------------------------------

@pytest.fixture()
def stage_repo(tmp_path, monkeypatch, adapted, segmenter):
    """A working directory with the models and a prepared set where the pipeline would put them, and
    the params the stages read (relative paths, as in params.yaml)."""
    from ovseg_core.clip.adapted import write_adapted
    from ovseg_core.clip.models import save_clip
    from ovseg_core.clip.mpt import save_prompts
    from ovseg_core.maskformer import save_model

    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path / "data" / "toy")
    save_clip(adapted.bundle, "models/pretrain_clip/clip.pt")
    save_prompts(adapted.prompts, "models/adapt_clip/mpt/prompts.pt", "ovseg-tiny-vit")
    write_adapted("models/adapt_clip/mpt", "mpt", "ovseg-tiny-vit", "models/pretrain_clip/clip.pt",
                  "models/adapt_clip/mpt/prompts.pt")
    save_model("models/train_maskformer/model.pt", segmenter.model)
    common = {"proposal_net": "models/train_maskformer/model.pt", "clip_arch": "ovseg-tiny-vit", "device": "cpu",
              "prepared": "data", "datasets": {"toy": {"root": "data/toy/prepared", "lambda": 0.6}},
              "lambda": 0.7, "mask_threshold": 0.5, "seen_lambda": False, "size": None, "mode": "resize",
              "chunk_images": 3, "examples": 2, "metrics": "metrics/evaluate", "plots": "plots/evaluate",
              "predictions": "eval"}
    return {
        "prefect": {"max_workers": 2},  # one torch thread per unit
        # the library's default fp32 is the reference these tests compare with (bf16: tests/test_precision.py);
        # `auto` would pick bf16 on CPUs with native bf16 and flip a few pixels
        "compute": {"precision": "fp32"},
        "evaluate": {"common": common, "variants": {"original": {"clip": "models/pretrain_clip/clip.pt"},
                                                    "mpt": {"clip": "models/adapt_clip/mpt"}}},
        "sweep": {"proposal_net": "models/train_maskformer/model.pt", "clip": "models/adapt_clip/mpt",
                  "clip_arch": "ovseg-tiny-vit", "variant": "mpt", "dataset": "data/toy/prepared", "device": "cpu",
                  "lambdas": [0.0, 0.5, 1.0], "thresholds": [0.4, 0.6], "seen_lambda": False, "select": "mIoU",
                  "size": None, "mode": "resize", "chunk_images": 3, "metrics": "metrics/sweep.json",
                  "plots": "plots/sweep"},
    }


def test_evaluate_stage_writes_metrics_plots_and_predictions(stage_repo, segmenter, adapted):
    import csv
    import json
    from pathlib import Path

    from stages.common import StageContext
    from stages.evaluate import run

    summary = run(StageContext("evaluate", stage_repo, "mpt"))
    metrics = json.loads(Path("metrics/evaluate/details/mpt.json").read_text())
    headline = json.loads(Path("metrics/evaluate/mpt.json").read_text())  # what `dvc metrics show` compares
    assert headline == {"toy": {k: metrics["toy"]["ensemble"][k] for k in ("mIoU", "hIoU")}}
    assert set(metrics) == {"toy"} and set(metrics["toy"]) == set(BRANCHES)  # scores only: they reproduce
    assert summary["toy_images_per_s"] == summary["images_per_s"]["toy"]["all"] > 0  # the run's own figures
    # the stage's numbers are the library's on the same models and set (chunks of 3 + 1 merged)
    dataset = PreparedDataset.load("data/toy/prepared")
    whole = evaluate_branches(segmenter, dataset, 0.6)
    direct, errors = whole.metrics(dataset.classes, dataset.seen), whole.standard_errors(dataset.seen)
    for b in BRANCHES:
        expected = {**direct[b].to_dict(), **{f"{k}_se": v for k, v in errors[b].items()}, "images": len(dataset)}
        assert {k: metrics["toy"][b][k] for k in expected} == expected  # chunks merged in image order
    assert metrics["toy"]["ensemble"]["mIoU_se"] > 0
    per_class = list(csv.DictReader(open("plots/evaluate/mpt/per-class/toy.csv")))
    assert [r["class"] for r in per_class] == CLASSES and set(per_class[0]) == {"class", "seen", *BRANCHES}
    confusion = list(csv.DictReader(open("plots/evaluate/mpt/confusion/toy.csv")))
    assert set(confusion[0]) == {"actual", "predicted"} and len(confusion) > 0
    index = json.loads(Path("eval/mpt/toy/index.json").read_text())
    assert index["lambda"] == 0.6 and [s["id"] for s in index["samples"]] == ["img0", "img1"]
    first = index["samples"][0]
    assert np.array_equal(np.asarray(Image.open(Path("eval/mpt/toy") / first["label"])), dataset.load_label(0))
    assert set(first["predictions"]) == set(BRANCHES)

    run(StageContext("evaluate", stage_repo, "original"))  # the plain pretrained checkpoint as a variant
    original = json.loads(Path("metrics/evaluate/details/original.json").read_text())
    assert original["toy"]["maskformer"] == metrics["toy"]["maskformer"]


def test_sweep_stage_writes_the_grid_and_the_best_cell(stage_repo, segmenter):
    import csv
    import json
    from pathlib import Path

    from stages.common import StageContext
    from stages.sweep import run

    run(StageContext("sweep", stage_repo))
    grid = list(csv.DictReader(open("plots/sweep/grid.csv")))
    assert len(grid) == 6
    best = json.loads(Path("metrics/details/sweep.json").read_text())
    top = max(grid, key=lambda r: float(r["mIoU"]))
    assert best["best_mIoU"] == pytest.approx(float(top["mIoU"]))
    dataset = PreparedDataset.load("data/toy/prepared")
    s = replace(segmenter, clip=replace(segmenter.clip, threshold=best["best_threshold"]))
    direct = evaluate_branches(s, dataset, best["best_lambda"]).metrics(dataset.classes, dataset.seen)["ensemble"]
    assert best["best_mIoU"] == direct.to_dict()["mIoU"]
    assert [(float(r["threshold"]), float(r["lambda"])) for r in grid] == [(t, lam) for t in (0.4, 0.6)
                                                                            for lam in (0.0, 0.5, 1.0)]
    with Image.open("plots/sweep/heatmap.png") as im:
        assert im.format == "PNG" and im.width > 200
