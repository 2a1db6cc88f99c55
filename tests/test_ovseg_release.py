"""`ovseg import-ovseg`: the adapted CLIP of an OVSeg release, on a checkpoint built from ov-seg's key names and
shapes (ViT-B/16 as in `ovseg_R101c_vitB16_ft_mpt.pth`, random weights: the real files are not here)."""
from __future__ import annotations

import copy

import torch
from open_clip.model import convert_weights_to_fp16

from ovseg_core.cli import main
from ovseg_core.clip.adapted import load_adapted
from ovseg_core.clip.export import openai_state_dict
from ovseg_core.clip.models import load_clip
from ovseg_core.clip.ovseg_release import CLIP_PREFIX, PROMPTS_KEY
from test_clip_export import TOL, _inputs, _max_diff

torch.set_num_threads(1)


def release(bundle, prompts: torch.Tensor) -> dict:
    """A detectron2 checkpoint laid out as ov-seg's OVSeg model saves it (proposal-network keys abridged)."""
    model = {f"{CLIP_PREFIX}{k}": v for k, v in openai_state_dict(bundle).items()}
    model[CLIP_PREFIX + PROMPTS_KEY] = prompts
    model["clip_adapter.non_object_embedding"] = torch.randn(1, 512)
    model["backbone.res2.0.conv1.weight"] = torch.randn(64, 64, 1, 1)
    model["sem_seg_head.predictor.query_embed.weight"] = torch.randn(100, 256)
    return {"model": model, "iteration": 120000}


def test_release_clip_and_prompts_load_as_an_adapted_clip(tmp_path, capsys):
    torch.manual_seed(3)
    bundle = load_clip("ViT-B-16-quickgelu")
    prompts = 0.02 * torch.randn(3, 196, 768)
    checkpoint = tmp_path / "ovseg_R101c_vitB16_ft_mpt.pth"
    torch.save(release(bundle, prompts), checkpoint)
    out = tmp_path / "adapt_clip" / "ovseg"
    assert main(["import-ovseg", str(checkpoint), "--out", str(out)]) == 0
    adapted = load_adapted(out)
    assert (adapted.name, adapted.bundle.arch, adapted.bundle.quick_gelu) == ("ovseg", "ViT-B-16-quickgelu", True)
    assert torch.equal(adapted.prompts.mask_embedding, prompts)
    rounded = copy.deepcopy(bundle.model)  # the release stores OpenAI's fp16 matrices
    convert_weights_to_fp16(rounded)
    images, tokens = _inputs(bundle, n=2)
    assert _max_diff(adapted.bundle.model, rounded.float().eval(), images, tokens) < TOL

    broken = release(bundle, prompts)
    del broken["model"][CLIP_PREFIX + "visual.proj"]
    torch.save(broken, checkpoint)
    assert main(["import-ovseg", str(checkpoint), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "missing ['visual.proj']" in err

    torch.save({"model": {"backbone.res2.0.conv1.weight": torch.zeros(1)}}, checkpoint)
    assert main(["import-ovseg", str(checkpoint), "--out", str(tmp_path / "x")]) == 1
    assert f"{checkpoint}: no OVSeg CLIP" in capsys.readouterr().err
