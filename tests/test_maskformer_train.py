"""Training the proposal network: a tiny model overfits a handful of images."""
from __future__ import annotations

import csv

import torch

from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.inference import segment
from ovseg_core.maskformer import build_model, preset_config
from ovseg_core.maskformer.data import SemanticDataset
from ovseg_core.maskformer.train import LOG_FIELDS, TrainConfig, train
from ovseg_core.metrics import ConfusionMatrix
from test_maskformer import CLASSES, class_text, make_prepared

torch.set_num_threads(1)


def test_tiny_model_overfits_a_handful_of_images(tmp_path):
    ds = SemanticDataset(PreparedDataset.load(make_prepared(tmp_path, 4)))
    torch.manual_seed(0)
    model = build_model(preset_config("tiny"), class_text(len(CLASSES)))
    cfg = TrainConfig(steps=150, batch_size=4, lr=1e-3, weight_decay=1e-4, crop_size=64, scale_range=(1.0, 1.0),
                      flip=False, checkpoint_every=1000)
    rows = train(model, ds, cfg, tmp_path / "ckpt", tmp_path / "loss.csv").log

    losses = [r["loss"] for r in rows]
    assert len(rows) == 150 and [r["step"] for r in rows] == list(range(1, 151))
    assert sum(losses[:10]) / sum(losses[-10:]) > 10, losses[::10]
    with open(tmp_path / "loss.csv") as f:
        logged = list(csv.DictReader(f))
    assert tuple(logged[0]) == LOG_FIELDS and len(logged) == 150
    assert float(logged[-1]["lr"]) < cfg.lr / 10  # poly schedule decayed

    cm = ConfusionMatrix(len(CLASSES), ds.ignore_label)
    for i in range(len(ds)):
        image, label = ds[i]
        cm.update(segment(model, image).labels, label)
    miou = cm.metrics(CLASSES, [True] * len(CLASSES)).to_dict()["mIoU"]
    assert miou > 85, miou
