import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_core import progress
from ovseg_core.datasets.prepared import PreparedDataset, PreparedWriter
from ovseg_core.errors import DataError
from ovseg_core.metrics import (ConfusionMatrix, SegmentationMetrics, bootstrap_se, confusion_plot_rows,
                                 evaluate_dataset)

IGNORE = 255


def reference_scores(pairs, num_classes, seen, ignore=IGNORE):
    """Independent count with plain Python loops over every pixel, then the documented formulas."""
    tp, gt_px, pred_px = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for pred, gt in pairs:
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
            if g == ignore:
                continue
            gt_px[g] += 1
            pred_px[p] += 1
            tp[g] += p == g
    iou = {c: 100 * tp[c] / (gt_px[c] + pred_px[c] - tp[c]) for c in range(num_classes) if gt_px[c] + pred_px[c]}
    acc = {c: 100 * tp[c] / gt_px[c] for c in range(num_classes) if gt_px[c]}
    total = sum(gt_px)
    mean = lambda vals: sum(vals) / len(vals)  # noqa: E731
    s = mean([v for c, v in iou.items() if seen[c]])
    u = mean([v for c, v in iou.items() if not seen[c]])
    return {
        "iou": iou,
        "mIoU": mean(list(iou.values())),
        "fwIoU": sum(v * gt_px[c] / total for c, v in iou.items()),
        "pACC": 100 * sum(tp) / total,
        "mACC": mean(list(acc.values())),
        "seen_mIoU": s,
        "unseen_mIoU": u,
        "hIoU": 2 * s * u / (s + u),
    }


def random_pairs(rng, shapes):
    # K = 7: class 4 is in the ground truth but never predicted, class 5 is predicted but never in the
    # ground truth, class 6 occurs nowhere.
    pairs = []
    for shape in shapes:
        gt = rng.choice([0, 1, 2, 3, 4, IGNORE], size=shape, p=[0.25, 0.2, 0.15, 0.15, 0.1, 0.15])
        pred = np.where(rng.random(shape) < 0.6, np.where(gt == 4, 0, gt), rng.choice([0, 1, 2, 3, 5], size=shape))
        pred[pred == IGNORE] = 1
        pairs.append((pred, gt))
    return pairs


def test_matches_independent_pixel_count():
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(7)]
    seen = [True, True, False, True, False, False, True]
    pairs = random_pairs(rng, [(13, 17), (20, 9), (8, 8)])
    cm = ConfusionMatrix(7, IGNORE)
    for k, (pred, gt) in enumerate(pairs):
        # tensors and numpy arrays of any integer dtype are accepted alike
        cm.update(torch.from_numpy(pred) if k == 0 else pred.astype(np.int32), gt.astype(np.uint8))
    m = cm.metrics(names, seen)
    ref = reference_scores(pairs, 7, seen)
    for key in ("mIoU", "fwIoU", "pACC", "mACC", "seen_mIoU", "unseen_mIoU", "hIoU"):
        assert m.to_dict()[key] == pytest.approx(ref[key], abs=1e-4), key
    by_class = m.iou_by_class()
    assert by_class["c4"] == 0.0 and by_class["c5"] == 0.0  # GT-only and prediction-only count as 0
    assert by_class["c6"] is None  # absent from both: excluded
    assert {int(n[1:]): v for n, v in by_class.items() if v is not None} == pytest.approx(ref["iou"])


def test_hiou_on_hand_numbers():
    # class 0 (seen): TP 3, FN 1, FP 1 -> IoU 3/5 = 60; class 1 (unseen): TP 1, FN 1, FP 1 -> 100/3
    m = SegmentationMetrics.from_confusion(np.array([[3, 1], [1, 1]]), ["a", "b"], [True, False])
    assert m.seen_miou == pytest.approx(60.0)
    assert m.unseen_miou == pytest.approx(100 / 3)
    assert m.hiou == pytest.approx(2 * 60 * (100 / 3) / (60 + 100 / 3))  # = 300/7
    assert m.hiou == pytest.approx(300 / 7)
    assert m.miou == pytest.approx((60 + 100 / 3) / 2)
    assert m.pacc == pytest.approx(400 / 6)
    assert m.macc == pytest.approx((75 + 50) / 2)
    assert m.fwiou == pytest.approx(60 * 4 / 6 + (100 / 3) * 2 / 6)


def test_perfect_prediction_scores_100():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 5, size=(16, 16))
    gt[:3] = IGNORE
    cm = ConfusionMatrix(5, IGNORE)
    cm.update(np.where(gt == IGNORE, 0, gt), gt)
    d = cm.metrics(list("abcde"), [True, False, True, False, True]).to_dict()
    assert d == {k: 100.0 for k in d}


def test_constant_prediction_by_hand():
    # 8 px of class 0, 4 px of class 1, 2 px of class 2, 2 px ignored; class 3 occurs nowhere.
    gt = np.array([0] * 8 + [1] * 4 + [2] * 2 + [IGNORE] * 2).reshape(4, 4)
    cm = ConfusionMatrix(4, IGNORE)
    cm.update(np.ones((4, 4), np.int64), gt)
    m = cm.metrics(["a", "b", "c", "d"], [True, True, False, False])
    # IoU: a 0, b 4 / (4 + 14 - 4) = 2/7, c 0, d excluded
    assert m.iou_by_class() == pytest.approx({"a": 0.0, "b": 200 / 7, "c": 0.0, "d": None})
    assert m.miou == pytest.approx(200 / 7 / 3)
    assert m.pacc == pytest.approx(400 / 14)
    assert m.macc == pytest.approx(100 / 3)
    assert m.fwiou == pytest.approx(200 / 7 * 4 / 14)
    assert m.seen_miou == pytest.approx(100 / 7)
    assert m.unseen_miou == 0.0  # only c: d has no IoU and is left out
    assert m.hiou == 0.0
    assert m.acc_by_class() == pytest.approx({"a": 0.0, "b": 100.0, "c": 0.0, "d": None})


def test_absent_classes_excluded_and_undefined_scores_are_null():
    cm = ConfusionMatrix(3, IGNORE)
    cm.update(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64))
    m = cm.metrics(["a", "b", "c"], [True, False, False])
    assert m.miou == 100.0  # b and c occur nowhere: not averaged in as 0
    assert m.unseen_miou is None and m.hiou is None
    d = m.to_dict()
    assert set(d) == {"mIoU", "fwIoU", "pACC", "mACC", "seen_mIoU", "unseen_mIoU", "hIoU"}
    assert json.loads(json.dumps(d, allow_nan=False))["hIoU"] is None
    rows = m.per_class_rows()
    assert rows == [{"class": "a", "iou": 100.0, "seen": True}, {"class": "b", "iou": None, "seen": False},
                    {"class": "c", "iou": None, "seen": False}]
    json.dumps(rows, allow_nan=False)
    # A GT class that is never predicted counts as 0 and pulls the mean down.
    cm.update(np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64))
    assert cm.metrics(["a", "b", "c"], [True, False, False]).miou == pytest.approx((400 / 6 + 0) / 2)


@pytest.mark.parametrize(
    "pred, gt, match",
    [
        (np.zeros((4, 5), np.int64), np.zeros((5, 4), np.int64), "shape"),
        (np.zeros((2, 4, 4), np.int64), np.zeros((4, 4), np.int64), "2-D"),
        (np.full((4, 4), 3), np.zeros((4, 4), np.int64), r"\[3\] outside"),
        (np.full((4, 4), -1), np.zeros((4, 4), np.int64), r"\[-1\] outside"),
        (np.full((4, 4), IGNORE), np.full((4, 4), IGNORE), "outside"),  # predicted ignore is an error too
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int64), "integer"),
        (np.zeros((4, 4), np.int64), np.full((4, 4), 7), r"ground truth holds ids \[7\]"),
    ],
)
def test_bad_inputs_raise(pred, gt, match):
    cm = ConfusionMatrix(3, IGNORE)
    with pytest.raises(ValueError, match=match):
        cm.update(pred, gt)
    assert cm.matrix.sum() == 0


def test_bad_ground_truth_names_its_file(tmp_path):
    with pytest.raises(DataError, match="labels/x.png: ground truth holds ids"):
        ConfusionMatrix(3, IGNORE).update(np.zeros((2, 2), np.int64), np.full((2, 2), 9), source="labels/x.png")
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(3, 2)


def test_save_load_roundtrip(tmp_path):
    cm = ConfusionMatrix(4, IGNORE)
    cm.update(np.array([[0, 1], [3, 3]]), np.array([[0, 2], [3, IGNORE]]))
    path = tmp_path / "out" / "confusion.npy"
    cm.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["confusion.npy"]  # no temporary file left
    loaded = ConfusionMatrix.load(path, IGNORE)
    assert loaded.matrix.dtype == np.int64 and np.array_equal(loaded.matrix, cm.matrix)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(DataError, match="bad.npy"):
        ConfusionMatrix.load(bad, IGNORE)
    np.save(tmp_path / "float.npy", np.zeros((3, 3)))
    with pytest.raises(DataError, match="square non-negative int64"):
        ConfusionMatrix.load(tmp_path / "float.npy", IGNORE)
    with pytest.raises(DataError, match="missing"):
        ConfusionMatrix.load(tmp_path / "none.npy", IGNORE)


def test_confusion_plot_rows_exact_and_scaled():
    names = ["a", "b", "c"]
    small = np.array([[2, 1, 0], [0, 3, 0], [0, 0, 0]])
    rows = confusion_plot_rows(small, names)
    assert len(rows) == 6
    assert rows.count({"actual": "a", "predicted": "b"}) == 1
    assert rows.count({"actual": "b", "predicted": "b"}) == 3
    big = np.array([[600_000, 300_000, 5], [0, 99_995, 0], [0, 0, 0]])
    rows = confusion_plot_rows(big, names, max_rows=1000)
    assert len(rows) == 1000
    assert rows.count({"actual": "a", "predicted": "a"}) == 600
    assert rows.count({"actual": "a", "predicted": "b"}) == 300
    assert rows.count({"actual": "b", "predicted": "b"}) == 100
    assert rows.count({"actual": "a", "predicted": "c"}) == 0  # 0.005 of a row


def build_dataset(root, rng, n=4, size=(12, 10)):
    """Images whose red channel encodes the true class (40 * id), so a predictor can read it back."""
    classes, seen = ["sky", "grass", "dog", "cat", "kite"], [True, True, True, False, False]
    gts = []
    with PreparedWriter(root, "toy", classes, seen, IGNORE) as w:
        for i in range(n):
            gt = rng.choice([0, 1, 2, 3, IGNORE], size=size)
            image = np.zeros(size + (3,), np.uint8)
            image[..., 0] = np.where(gt == IGNORE, 0, gt * 40)
            path = root.parent / "raw" / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(image).save(path)
            w.add(f"img{i}", path, gt)
            gts.append(gt)
    return PreparedDataset.load(root), gts, seen


def test_evaluate_dataset(tmp_path):
    rng = np.random.default_rng(2)
    ds, gts, seen = build_dataset(tmp_path / "toy", rng)

    def predict(image):  # right everywhere except that every "dog" is called "cat"
        pred = image[..., 0].astype(np.int64) // 40
        pred[pred == 2] = 3
        return pred

    calls = []
    hook = lambda desc, done, total: calls.append((desc, done, total))  # noqa: E731
    progress.add_hook(hook)
    try:
        metrics, cm, ips = evaluate_dataset(ds, predict, progress_desc="eval toy")
    finally:
        progress.remove_hook(hook)
    assert calls[-1] == ("eval toy", 4, 4)
    assert ips > 0
    ref = reference_scores([(predict(ds.load_image(i)), g) for i, g in enumerate(gts)], 5, seen)
    assert metrics.to_dict() == pytest.approx({k: round(ref[k], 4) for k in metrics.to_dict()}, abs=1e-4)
    assert metrics.iou_by_class()["dog"] == 0.0 and metrics.iou_by_class()["kite"] is None
    assert cm.matrix.sum() == sum(int((g != IGNORE).sum()) for g in gts)


def test_evaluate_dataset_names_the_sample_on_bad_prediction(tmp_path):
    ds, _, _ = build_dataset(tmp_path / "toy", np.random.default_rng(3), n=2)
    with pytest.raises(ValueError, match="toy sample img0: prediction shape"):
        evaluate_dataset(ds, lambda image: np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="toy sample img0: prediction holds ids \\[5\\]"):
        evaluate_dataset(ds, lambda image: np.full(image.shape[:2], 5))


def test_bootstrap_standard_errors_match_scoring_each_resample_from_scratch():
    """Each resample's scores, computed by SegmentationMetrics from the summed confusion matrices of the drawn
    images, give the same standard deviations as bootstrap_se's vectorised sums."""
    rng = np.random.default_rng(5)
    k, n, draws, seen = 4, 12, 50, [True, True, False, False]
    cm, single = ConfusionMatrix(k, 255, keep_images=True), []
    for _ in range(n):
        gt = rng.integers(0, k, (6, 7))
        pred = np.where(rng.random((6, 7)) < 0.6, gt, rng.integers(0, k, (6, 7)))
        cm.update(pred, gt)
        one = ConfusionMatrix(k, 255)
        one.update(pred, gt)
        single.append(one.matrix)
    errors = bootstrap_se(np.stack(cm.per_image), seen, draws=draws, seed=9)

    weights = np.random.default_rng(9).multinomial(n, np.full(n, 1.0 / n), size=draws)
    resampled = [SegmentationMetrics.from_confusion(np.tensordot(w, np.stack(single), axes=1), list("abcd"), seen)
                 for w in weights]
    for key, attr in (("mIoU", "miou"), ("seen_mIoU", "seen_miou"), ("unseen_mIoU", "unseen_miou"), ("hIoU", "hiou")):
        assert errors[key] == pytest.approx(np.std([getattr(m, attr) for m in resampled], ddof=1), abs=1e-4), key
    assert errors["mIoU"] > 0


def test_bootstrap_standard_error_is_zero_for_identical_images_and_undefined_for_one():
    gt = np.array([[0, 1], [2, 2]])
    cm = ConfusionMatrix(3, 255, keep_images=True)
    for _ in range(5):
        cm.update(np.array([[0, 1], [1, 2]]), gt)
    assert bootstrap_se(np.stack(cm.per_image), [True, True, False])["mIoU"] == 0.0
    assert bootstrap_se(np.stack(cm.per_image[:1]), [True, True, False]) == dict.fromkeys(
        ("mIoU", "seen_mIoU", "unseen_mIoU", "hIoU"))
