"""Proposal network: cosine class head, vocabulary swap, targets, augmentation, weights I/O, training.

`make_prepared` (synthetic scenes in the prepared-dataset form) is shared with test_maskformer_train,
test_inference and test_ddp.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg_core.datasets.prepared import PreparedDataset, PreparedWriter
from ovseg_core.errors import DataError, MissingWeightsError
from ovseg_core.maskformer import CosineClassHead, build_model, load_model, preset_config, save_model
from ovseg_core.maskformer.model import MODEL_FORMAT, read_meta
from ovseg_core.maskformer.augment import AugmentConfig, augment
from ovseg_core.maskformer.data import SemanticDataset
from ovseg_core.maskformer.targets import semantic_targets

torch.set_num_threads(1)

CLASSES = ["sand", "water", "box", "ball"]
_COLOURS = {2: (220, 40, 40), 3: (40, 60, 230)}


def synthetic_scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Sand below / water above a random horizon, 1-3 red boxes or blue balls, noise, an ignored strip."""
    yy, xx = np.mgrid[:size, :size]
    horizon = size // 2 + int(rng.integers(-12, 13))
    label = np.where(yy < horizon, 1, 0).astype(np.int64)
    image = np.where(label[..., None] == 1, (90.0, 150.0, 210.0), (200.0, 180.0, 120.0))
    for _ in range(int(rng.integers(1, 4))):
        cls, r = int(rng.integers(2, 4)), int(rng.integers(6, 13))
        cy, cx = rng.integers(r, size - r, 2)
        if cls == 2:
            inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        else:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        label[inside] = cls
        image[inside] = _COLOURS[cls]
    image += rng.normal(0, 12, image.shape)
    label[:2] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_prepared(root: Path, n: int, seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with PreparedWriter(root / "prepared", "synthetic", CLASSES, [True] * len(CLASSES), 255) as w:
        for i in range(n):
            image, label = synthetic_scene(rng, size)
            Image.fromarray(image).save(raw / f"{i:04d}.png")
            w.add(f"{i:04d}", raw / f"{i:04d}.png", label)
    return root / "prepared"


def class_text(k: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_cosine_head_logits_are_100_cosine_with_void_last():
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # normalised by the head
    head = CosineClassHead(hidden_dim=2, embed_hidden_dim=8, num_layers=1, text_features=text, logit_scale=100.0)
    with torch.no_grad():
        linear = head.projection.get_submodule("0.0")
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        linear.bias.zero_()
        head.void_embedding.copy_(torch.tensor([0.0, 0.0, 5.0]))
    logits = head(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    # |(3,4,0)| = 5: cosines 0.6, 0.8, 0 (void); (0,-2,0): 0, -1, 0
    assert torch.allclose(logits, torch.tensor([[60.0, 80.0, 0.0], [0.0, -100.0, 0.0]]), atol=1e-4)


def test_model_uses_cosine_head_and_library_loss_consumes_void_last():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", deep_supervision=False), class_text(4))
    image = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    masks = [torch.zeros(2, 64, 64), torch.zeros(1, 64, 64)]
    masks[0][0, :32], masks[0][1, 32:], masks[1][0, :, :20] = 1, 1, 1
    classes = [torch.tensor([0, 3]), torch.tensor([2])]
    out = model(model.normalize(image), mask_labels=masks, class_labels=classes, output_hidden_states=True)
    assert out.class_queries_logits.shape == (2, 24, 5)
    expected = model.class_predictor(out.transformer_decoder_last_hidden_state)
    assert torch.allclose(out.class_queries_logits, expected)
    assert out.class_queries_logits.abs().max() <= 100.0 + 1e-3  # scaled cosines

    # Cross entropy by hand: matched queries take their class, all others void (index K, weight 0.1).
    indices = model.matcher(out.masks_queries_logits, out.class_queries_logits, masks, classes)
    targets = torch.full((2, 24), 4)
    for b, (q, t) in enumerate(indices):
        targets[b, q] = classes[b][t]
    weights = torch.where(targets == 4, 0.1, 1.0)
    nll = -out.class_queries_logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    hand = (weights * nll).sum() / weights.sum()
    assert torch.allclose(model.loss_components["loss_cross_entropy"], hand, rtol=1e-5)

    out.loss.backward()
    assert model.class_predictor.void_embedding.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_deep_supervision_adds_one_loss_per_earlier_decoder_layer():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny"), class_text(4))  # 3 decoder layers
    out = model(model.normalize(torch.zeros(1, 3, 64, 64)), mask_labels=[torch.ones(1, 64, 64)],
                class_labels=[torch.tensor([1])], output_auxiliary_logits=True)
    assert len(out.auxiliary_logits) == 2
    assert sorted(model.loss_components) == sorted(
        f"loss_{t}{s}" for t in ("cross_entropy", "mask", "dice") for s in ("", "_0", "_1"))
    # The earlier layers' predictions differ from the last one's (they are not the decoder input).
    assert not torch.allclose(out.auxiliary_logits[-1]["class_queries_logits"], out.class_queries_logits)


def test_set_vocabulary_changes_k_and_outputs():
    torch.manual_seed(0)
    text = class_text(4)
    model = build_model(preset_config("tiny"), text).eval()
    image = model.normalize(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        before = model(image).class_queries_logits
        bigger = torch.cat([text, class_text(2, seed=1)])
        model.set_vocabulary(bigger)
        after = model(image).class_queries_logits
    assert before.shape[-1] == 5 and after.shape[-1] == 7
    assert torch.allclose(after[..., :4], before[..., :4], atol=1e-4)  # same classes, same logits
    assert torch.allclose(after[..., -1], before[..., -1], atol=1e-4)  # void stays last
    assert not torch.allclose(after[..., 4:6], after[..., :2])
    # The loss now accepts the new class ids.
    model.train()
    out = model(image, mask_labels=[torch.ones(1, 64, 64)], class_labels=[torch.tensor([5])])
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError):
        model.set_vocabulary(torch.randn(3, 16))  # wrong embedding dimension


def test_semantic_targets_from_hand_made_label_map():
    label = torch.tensor([[0, 0, 255], [2, 2, 255], [0, 5, 5]])
    masks, classes = semantic_targets(label, ignore_label=255)
    assert classes.tolist() == [0, 2, 5]
    assert masks.tolist() == [
        [[1, 1, 0], [0, 0, 0], [1, 0, 0]],
        [[0, 0, 0], [1, 1, 0], [0, 0, 0]],
        [[0, 0, 0], [0, 0, 0], [0, 1, 1]],
    ]
    empty_masks, empty_classes = semantic_targets(torch.full((4, 4), 65535), ignore_label=65535)
    assert empty_masks.shape == (0, 4, 4) and empty_classes.numel() == 0


def test_augment_is_deterministic_and_pads_with_ignore():
    rng = np.random.default_rng(3)
    image_np, label_np = synthetic_scene(rng, 40)
    image, label = torch.from_numpy(image_np).permute(2, 0, 1).contiguous(), torch.from_numpy(label_np)
    cfg = AugmentConfig(crop_size=32, scale_range=(0.5, 2.0))
    a = augment(image, label, cfg, 255, np.random.default_rng(7))
    b = augment(image, label, cfg, 255, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outs = {augment(image, label, cfg, 255, np.random.default_rng(s))[1].sum().item() for s in range(8)}
    assert len(outs) > 1  # different draws differ
    assert a[0].shape == (3, 32, 32) and a[0].dtype == torch.uint8 and a[1].shape == (32, 32)
    assert set(a[1].unique().tolist()) <= set(label.unique().tolist())

    # No resize (short side stays 40 = 64 × 0.625): a 40×40 window, flipped or not, padded to 64.
    cfg = AugmentConfig(crop_size=64, scale_range=(0.625, 0.625))
    flips = set()
    for seed in range(6):
        img, lab = augment(image, label, cfg, 255, np.random.default_rng(seed))
        assert (lab[40:] == 255).all() and (lab[:, 40:] == 255).all()
        assert (img[:, 40:] == torch.tensor(cfg.pad_value, dtype=torch.uint8).view(3, 1, 1)).all()
        flipped = torch.equal(lab[:40, :40], label.flip(-1))
        assert flipped or torch.equal(lab[:40, :40], label)
        assert torch.equal(img[:, :40, :40], image.flip(-1) if flipped else image)
        flips.add(flipped)
    assert flips == {True, False}


def test_semantic_dataset_reads_prepared_data(tmp_path):
    ds = SemanticDataset(PreparedDataset.load(make_prepared(tmp_path, 2)))
    image, label = ds[1]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert label.shape == (64, 64) and set(label.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_backbone_weights_load_from_a_classification_style_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = build_model(preset_config("tiny"), class_text(4))
    backbone = source.model.pixel_level_module.encoder.state_dict()
    # A Swin classification checkpoint: "swin." prefix instead of "model.", no MaskFormer stage norms,
    # plus a classifier the backbone does not use.
    checkpoint = {"swin." + k[len("model."):]: v for k, v in backbone.items() if k.startswith("model.")}
    checkpoint["classifier.weight"] = torch.zeros(10, 256)
    torch.save(checkpoint, tmp_path / "swin.pt")

    torch.manual_seed(1)
    target = build_model(preset_config("tiny"), class_text(4), backbone_weights=tmp_path / "swin.pt")
    loaded = target.model.pixel_level_module.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in backbone.items())  # seed 1 alone would differ

    with pytest.raises(MissingWeightsError, match="not found"):
        build_model(preset_config("tiny"), class_text(4), backbone_weights=tmp_path / "missing.pt")
    del checkpoint["swin.embeddings.patch_embeddings.projection.weight"]
    torch.save(checkpoint, tmp_path / "partial.pt")
    with pytest.raises(DataError, match="partial.pt.*missing"):
        build_model(preset_config("tiny"), class_text(4), backbone_weights=tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pt"):
        build_model(preset_config("tiny"), class_text(4), backbone_weights=tmp_path / "junk.pt")


def test_save_and_load_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", num_queries=8), class_text(3)).eval()
    save_model(tmp_path / "mf.pt", model, meta={"classes": ["a", "b", "c"]})
    loaded, meta = load_model(tmp_path / "mf.pt")
    assert meta == {"classes": ["a", "b", "c"]} and loaded.net == model.net
    x = model.normalize(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)
    assert torch.equal(a.masks_queries_logits, b.masks_queries_logits)
    assert read_meta(tmp_path / "mf.pt") == meta
    for missing in (load_model, read_meta):
        with pytest.raises(MissingWeightsError, match="none.pt"):
            missing(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"format": "something else", "meta": {}}, tmp_path / "other.pt")
    torch.save({"format": MODEL_FORMAT}, tmp_path / "no-meta.pt")
    for name, reader in (("junk.pt", load_model), ("junk.pt", read_meta), ("other.pt", load_model),
                         ("other.pt", read_meta), ("no-meta.pt", read_meta), ("no-meta.pt", load_model)):
        with pytest.raises(DataError, match=f"{name}.*not a proposal network"):
            reader(tmp_path / name)


def test_paper_r101c_deeplab_preset_is_detectron2s_deeplab_resnet_101():
    # The backbone of MaskFormer's and ov-seg's R101c (detectron2's DeepLab ResNet: STEM_OUT_CHANNELS 128,
    # STRIDE_IN_1X1 False, RES5_MULTI_GRID [1, 2, 4], FrozenBN), which ov-seg's R101c release's weights fit.
    torch.manual_seed(0)
    model = build_model(preset_config("paper-r101c-deeplab"), class_text(171, 512))
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 60) < 3  # MaskFormer paper: R101c 60M
    resnet = model.model.pixel_level_module.encoder._backbone
    assert [tuple(resnet.conv1[i].weight.shape) for i in (0, 3, 6)] == [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert [len(getattr(resnet, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 23, 3]
    for layer in (resnet.layer2, resnet.layer3, resnet.layer4):  # the stride on the 3x3 conv
        assert layer[0].conv1.stride == (1, 1) and layer[0].conv2.stride == (2, 2)
    assert [(b.conv2.dilation, b.conv2.padding) for b in resnet.layer4] == [((1, 1),) * 2, ((2, 2),) * 2, ((4, 4),) * 2]
    assert all(b.conv2.dilation == (1, 1) for layer in (resnet.layer1, resnet.layer2, resnet.layer3) for b in layer)
    state = model.model.pixel_level_module.encoder.state_dict()
    assert not any(k.endswith("num_batches_tracked") for k in state) and "_backbone.bn1.running_var" in state
    with torch.no_grad():
        features = model.model.pixel_level_module.encoder(torch.zeros(1, 3, 64, 96)).feature_maps
    assert [tuple(f.shape[1:]) for f in features] == [(256, 16, 24), (512, 8, 12), (1024, 4, 6), (2048, 2, 3)]
    assert model.net.size_divisibility == 32
    # The timm R101c preset is unchanged: deep stem 32/32/64, no dilation.
    assert preset_config("paper-r101c").backbone == "timm:resnet101c"
