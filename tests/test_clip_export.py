"""`ovseg export`: the adapted CLIP as open_clip loads it (same features), in OpenAI's layout where the
architecture allows (round trip through open_clip's own `build_model_from_openai_state_dict`), and its
mask prompts applied to open_clip's VisionTransformer."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import torch
from open_clip.model import build_model_from_openai_state_dict, convert_weights_to_fp16

from ovseg_core.cli import main
from ovseg_core.clip.adapted import load_adapted
from ovseg_core.clip.export import (EXPORT_FILE, OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_FILE, OPENAI_FILE, PROMPTS_FILE,
                                    openai_incompatibility)
from ovseg_core.clip.models import ClipBundle, load_clip, save_clip
from ovseg_core.clip.mpt import MaskPromptedViT, load_prompts
from test_segment_cli import run_dir  # noqa: F401 - a run's models/, with an FT→MPT adapted CLIP

torch.set_num_threads(1)
TINY = "ovseg-tiny-vit"
# A small model in OpenAI's shape (QuickGELU, 64-wide heads), so the OpenAI layout is tested in seconds.
OPENAI_STYLE = "ovseg-test-openai-vit"
OPENAI_STYLE_CONFIG = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
TOL = 1e-5


def _inputs(bundle: ClipBundle, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(n, 3, bundle.image_size, bundle.image_size, generator=gen)
    return images, bundle.tokenize(["a photo of a kite.", "sand", "a golden retriever on grass"])


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return max((a.encode_image(images) - b.encode_image(images)).abs().max().item(),
                   (a.encode_text(tokens) - b.encode_text(tokens)).abs().max().item())


def test_open_clip_loads_the_export_with_the_projects_features(run_dir, tmp_path, capsys):  # noqa: F811
    ft_mpt = run_dir / "adapt_clip" / "ft-mpt"  # fine-tuned weights (moved off their init) and mask prompts
    out = tmp_path / "export"
    assert main(["export", str(ft_mpt), "--out", str(out)]) == 0
    assert "create_model_and_transforms('ovseg-tiny-vit'" in capsys.readouterr().out
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["files"] == {"open_clip": OPEN_CLIP_FILE, "openai": None, "prompts": PROMPTS_FILE}
    assert "GELU" in record["openai_layout"]  # the tiny architecture runs GELU: no OpenAI file
    assert sorted(p.name for p in out.iterdir()) == sorted([OPEN_CLIP_FILE, OPEN_CLIP_CONFIG_FILE, PROMPTS_FILE,
                                                            EXPORT_FILE])

    torch.manual_seed(123)  # another init, so unloaded weights could not pass for loaded ones
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(out / OPEN_CLIP_FILE))
    model.eval()
    ours = load_adapted(ft_mpt)
    images, tokens = _inputs(ours.bundle)
    assert _max_diff(model, ours.bundle.model, images, tokens) < TOL
    # the folder alone, as open_clip's trainer takes it (`--model local-dir:<out>`): architecture and
    # preprocessing from its config file, the weights found beside it
    torch.manual_seed(321)
    folder_model, _, folder_preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert _max_diff(folder_model.eval(), ours.bundle.model, images, tokens) < TOL
    assert repr(folder_preprocess).replace("[", "(").replace("]", ")") == repr(preprocess)  # lists from JSON

    # mask prompts on open_clip's own VisionTransformer, as the export's docstring shows
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[:, 8:40, 16:56] = True
    prompted = MaskPromptedViT(model.visual, load_prompts(out / PROMPTS_FILE)).eval()
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(prompted(images, masks), dim=-1)
        assert (theirs - ours.encoder()(images, masks)).abs().max().item() < TOL


def _openai_style_bundle(tmp_path: Path) -> ClipBundle:
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / f"{OPENAI_STYLE}.json").write_text(json.dumps(OPENAI_STYLE_CONFIG))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(1)
    bundle = load_clip(OPENAI_STYLE)
    assert bundle.quick_gelu
    return bundle


def test_openai_layout_round_trips_through_open_clips_builder(tmp_path):
    bundle = _openai_style_bundle(tmp_path)
    checkpoint = save_clip(bundle, tmp_path / "clip.pt")  # a plain checkpoint: its metadata names the architecture
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    state = torch.load(out / OPENAI_FILE, map_location="cpu", weights_only=True)
    for key in ("visual.class_embedding", "visual.transformer.resblocks.1.attn.in_proj_weight", "visual.proj",
                "positional_embedding", "text_projection", "logit_scale", "token_embedding.weight"):
        assert key in state, key
    assert state["visual.proj"].dtype == torch.float16  # stored as OpenAI stores it
    rebuilt = build_model_from_openai_state_dict(state).float()
    # OpenAI's layout keeps the matrices in fp16: compare with our model at that precision
    rounded = copy.deepcopy(bundle.model)
    convert_weights_to_fp16(rounded)
    rounded.float().eval()
    images, tokens = _inputs(bundle)
    assert _max_diff(rebuilt, rounded, images, tokens) < TOL
    assert _max_diff(rebuilt, bundle.model, images, tokens) < 1e-2  # fp16 rounding only

    # and open_clip's own layout of the same model is exact
    model = open_clip.create_model(OPENAI_STYLE, pretrained=str(out / OPEN_CLIP_FILE)).eval()
    assert _max_diff(model, bundle.model, images, tokens) < TOL


def test_openai_layout_of_vit_b_16(tmp_path):
    """ViT-B/16 as loaded from OpenAI's weights (QuickGELU), random init: the layout ov-seg's CLIP uses."""
    torch.manual_seed(2)
    bundle = load_clip("ViT-B-16-quickgelu")
    out = tmp_path / "export"
    assert main(["export", str(save_clip(bundle, tmp_path / "clip.pt")), "--out", str(out)]) == 0
    rebuilt = build_model_from_openai_state_dict(torch.load(out / OPENAI_FILE, weights_only=True)).float()
    rounded = copy.deepcopy(bundle.model)
    convert_weights_to_fp16(rounded)
    images, tokens = _inputs(bundle, n=2)
    assert _max_diff(rebuilt, rounded.float().eval(), images, tokens) < TOL


def test_openai_layout_needs_quickgelu_and_64_wide_heads():
    torch.manual_seed(0)
    tiny = load_clip(TINY)
    assert "GELU" in openai_incompatibility(tiny)
    tiny.quick_gelu = True  # still 48-wide heads, which OpenAI's layout cannot say
    assert "attention heads" in openai_incompatibility(tiny)


def test_bad_input_names_the_file(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["export", str(missing), "--out", str(tmp_path / "x")]) == 1
    assert str(missing) in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"  # a bare state dict: no architecture recorded
    torch.manual_seed(0)
    torch.save(load_clip(TINY).model.state_dict(), foreign)
    assert main(["export", str(foreign), "--out", str(tmp_path / "x")]) == 1
    assert str(foreign) in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
