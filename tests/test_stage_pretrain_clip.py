"""The pretrain_clip stage and its datasets, end to end on a tiny generated world."""
import copy
import json

import pytest
import torch

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.datasets import CaptionImageDataset, normalise, segment_probe
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.errors import DataError, MissingWeightsError
from ovseg_core.world import BASE_CLASSES
from stages.common import StageContext, run_stage

torch.set_num_threads(1)
ARCH = "ovseg-tiny-vit"


@pytest.fixture(scope="module")
def world(tiny_world):
    """The session's tiny world (conftest): its web split as a caption set, its eval split as a labelled set."""
    return {"web": PreparedDataset.load(tiny_world.web), "eval": PreparedDataset.load(tiny_world.eval),
            "captions_per_image": tiny_world.config["web_captions_per_image"]}


def params(world, tmp_path, **over):
    section = {
        "arch": ARCH, "pretrained": None, "data": str(world["web"].root), "captions_per_image": None,
        "out": str(tmp_path / "models/pretrain_clip"), "checkpoints": str(tmp_path / "checkpoints/pretrain_clip"),
        "plots": str(tmp_path / "plots/pretrain_clip"), "metrics": str(tmp_path / "metrics/pretrain_clip.json"),
        "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 1, "seed": 0,
                  "checkpoint_every": 2, "init_logit_scale": None, "learn_logit_scale": True, "grad_clip_norm": None},
        "probe": {"data": str(world["eval"].root), "images": 3, "min_fraction": 0.01},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            section[key] = {**section[key], **value}
        else:
            section[key] = value
    return {"pretrain_clip": section, "compute": {"threads": 1}}


def run(p):
    return run_stage("pretrain_clip", StageContext("pretrain_clip", copy.deepcopy(p)))


def test_caption_dataset_pairs_every_caption_with_its_image(world):
    web = world["web"]
    data = CaptionImageDataset(web, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    captions = web.captions()
    per_image = world["captions_per_image"]
    assert data.num_images == len(web) and len(data) == sum(len(c) for c in captions.values()) == len(web) * per_image
    for i in (0, 1, len(data) - 1):
        image, mask, text = data[i]
        row = i // per_image  # pairs are enumerated image by image
        expected = torch.tensor(web.load_image(row)).permute(2, 0, 1)
        assert mask is None and image.shape == (3, 64, 64)
        assert torch.allclose(image, normalise(expected, (0.5,) * 3, (0.25,) * 3))
        assert text == captions[web.samples[row].id][i % per_image]
    one = CaptionImageDataset(web, 32, (0.5,) * 3, (0.25,) * 3, captions_per_image=1)
    assert len(one) == len(web) and one[0][0].shape == (3, 32, 32) and one[1][2] == captions[web.samples[1].id][0]


def test_segment_probe_cuts_every_region_three_ways(world):
    probe = segment_probe(world["eval"], 64, (0.5,) * 3, (0.25,) * 3, max_images=3)
    assert probe.classes == [c.name for c in BASE_CLASSES] and probe.scenes.shape == (3, 3, 64, 64)
    labels = [torch.from_numpy(world["eval"].load_label(i)) for i in range(3)]
    assert probe.scene_labels.tolist() == [int(torch.bincount(lab.flatten()).argmax()) for lab in labels]
    regions = sorted(c for lab in labels for c in lab.unique().tolist() if (lab == c).sum() >= 0.01 * lab.numel())
    assert sorted(probe.segment_labels.tolist()) == regions
    assert probe.boxes.shape == probe.masked.shape == (len(regions), 3, 64, 64)
    outside = ~probe.masks[:, None].expand_as(probe.masked)
    assert (probe.masked[outside] == 0).all() and (probe.masked[~outside] != 0).any()
    assert (probe.boxes[outside] != 0).any()  # boxes keep the surroundings masked crops blank out
    with pytest.raises(DataError, match="no labelled samples"):
        segment_probe(world["web"], 64, (0.5,) * 3, (0.25,) * 3)


def test_stage_trains_resumes_and_writes_loadable_outputs(world, tmp_path):
    p = params(world, tmp_path)
    summary = run(p)
    metrics = json.loads((tmp_path / "metrics/details/pretrain_clip.json").read_text())
    headline = json.loads((tmp_path / "metrics/pretrain_clip.json").read_text())
    assert headline == {k: metrics[k] for k in ("final_loss", "masked_acc", "masked_acc_unseen")}
    assert metrics["source"] == "trained" and metrics["steps"] == 3 and summary["resumed_from_step"] == 0
    assert metrics["pairs"] == len(world["web"]) * world["captions_per_image"]
    assert metrics["train_samples"] == 3 * 8 and summary["samples_per_s"] > 0 and "samples_per_s" not in metrics
    assert summary["final_loss"] == metrics["final_loss"] and metrics["final_loss"] > 0
    assert metrics["chance_acc"] == round(100 / len(BASE_CLASSES), 2) and metrics["probe_images"] == 3
    for view in ("scene", "box", "masked"):
        assert 0 <= metrics[f"{view}_acc"] <= 100
        assert metrics[f"{view}_acc_seen"] is not None or metrics[f"{view}_acc_unseen"] is not None
    assert [r["step"] for r in json.loads((tmp_path / "plots/pretrain_clip/loss.json").read_text())] == [1, 2, 3]

    trained = load_clip(ARCH, tmp_path / "models/pretrain_clip/clip.pt")
    torch.manual_seed(0)
    initial = load_clip(ARCH)  # the stage's random initialisation (same seed)
    changed = [k for k, v in initial.model.state_dict().items() if not torch.equal(v, trained.model.state_dict()[k])]
    assert "visual.conv1.weight" in changed and "text_projection" in changed

    longer = run(params(world, tmp_path, train={"steps": 4}))  # a new config: the old checkpoint is dropped
    assert longer["resumed_from_step"] == 0 and longer["steps"] == 4
    again = run(params(world, tmp_path, train={"steps": 4}))  # same config: resumes the finished run
    assert again["resumed_from_step"] == 4 and again["samples_per_s"] is None
    assert again["final_loss"] == longer["final_loss"]


def test_pretrained_file_is_resolved_without_training(world, tiny_models, tmp_path):
    weights = tiny_models.clip  # a save_clip file (random init) standing in for downloaded weights
    source = load_clip(tiny_models.clip_arch, weights)
    metrics = run(params(world, tmp_path, pretrained=str(weights), data="/nonexistent", probe={"images": 0}))
    assert metrics["source"] == "pretrained" and "steps" not in metrics and "masked_acc" not in metrics
    out = load_clip(ARCH, tmp_path / "models/pretrain_clip/clip.pt").model.state_dict()
    assert all(torch.equal(v, out[k]) for k, v in source.model.state_dict().items())
    assert (tmp_path / "checkpoints/pretrain_clip").is_dir()
    assert json.loads((tmp_path / "plots/pretrain_clip/loss.json").read_text()) == []


def test_missing_weights_fail_with_what_to_provide(world, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"ViT-B-32 / 'openai' are not in the local cache.*Provide one of"):
        run(params(world, tmp_path, arch="ViT-B-32", pretrained="openai"))
    with pytest.raises(MissingWeightsError, match="neither an existing checkpoint file nor an open_clip pretrained tag"):
        run(params(world, tmp_path, pretrained=str(tmp_path / "missing.pt")))
    assert not (tmp_path / "models/pretrain_clip/clip.pt").exists()
