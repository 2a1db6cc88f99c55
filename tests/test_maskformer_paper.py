"""The paper's proposal networks are wired: Swin-B (ViT-L/14 text, 768-d) and R101c (ViT-B/16 text, 512-d)
build, load ImageNet-style backbone checkpoints, and run a forward + backward step at reduced size."""
from __future__ import annotations

import pytest
import timm
import torch
from transformers import SwinConfig, SwinForImageClassification

from ovseg_core.errors import DataError
from ovseg_core.maskformer import build_model, load_backbone_weights, preset_config
from test_maskformer import class_text

torch.set_num_threads(2)


def _step(model, size: int) -> torch.Tensor:
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    masks = torch.zeros(2, size, size)
    masks[0, : size // 2], masks[1, size // 2:] = 1, 1
    out = model(model.normalize(image), mask_labels=[masks], class_labels=[torch.tensor([3, 170])])
    out.loss.backward()
    return out.loss


@pytest.mark.parametrize("preset, dim, millions", [("paper-swin-b", 768, 102), ("paper-r101c", 512, 60)])
def test_paper_model_runs_one_training_step(preset, dim, millions):
    torch.manual_seed(0)
    model = build_model(preset_config(preset), class_text(171, dim))  # COCO-Stuff-171 vocabulary
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - millions) < 3, params  # MaskFormer paper: Swin-B 102M, R101c 60M
    assert model.net.num_queries == 100 and model.net.crop_size == (640 if "swin" in preset else 512)
    loss = _step(model, 128)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.class_predictor.void_embedding.grad.abs().sum() > 0


def test_paper_backbones_load_imagenet_checkpoints(tmp_path):
    # Swin-B IN-21K as transformers 5 saves SwinForImageClassification (microsoft/swin-base-patch4-window12-384-in22k
    # re-saved); the hub file's own older key names are covered by test_maskformer's tiny checkpoint test.
    torch.manual_seed(1)
    swin = SwinForImageClassification(SwinConfig(image_size=384, embed_dim=128, depths=[2, 2, 18, 2],
                                                 num_heads=[4, 8, 16, 32], window_size=12, num_labels=10))
    torch.save(swin.state_dict(), tmp_path / "swin_b.pt")
    model = build_model(preset_config("paper-swin-b"), class_text(3, 768), backbone_weights=tmp_path / "swin_b.pt")
    ours = model.model.pixel_level_module.encoder.model  # MaskFormer's Swin keeps the hub files' key names
    for mine, theirs in [("attention.self.query.weight", "attention.q_proj.weight"),
                         ("output.dense.bias", "mlp.fc2.bias"),
                         ("attention.self.relative_position_bias_table",
                          "attention.relative_position_bias.relative_position_bias_table")]:
        assert torch.equal(ours.get_parameter(f"encoder.layers.2.blocks.17.{mine}"),
                           swin.swin.get_parameter(f"encoder.layers.2.blocks.17.{theirs}"))
    del swin, model

    # ResNet-101c in timm's layout.
    resnet = timm.create_model("resnet101c")
    torch.save(resnet.state_dict(), tmp_path / "r101c.pt")
    model = build_model(preset_config("paper-r101c"), class_text(3, 512), backbone_weights=tmp_path / "r101c.pt")
    encoder = model.model.pixel_level_module.encoder
    assert torch.equal(encoder.state_dict()["_backbone.layer3.22.conv2.weight"], resnet.layer3[22].conv2.weight)
    assert torch.equal(encoder.state_dict()["_backbone.bn1.running_var"], resnet.bn1.running_var)  # frozen BN stats

    with pytest.raises(DataError, match="r101c.pt.*missing"):  # a ResNet checkpoint does not fit Swin
        load_backbone_weights(build_model(preset_config("paper-swin-b"), class_text(3, 768)), tmp_path / "r101c.pt")
