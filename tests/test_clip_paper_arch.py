"""The paper's full-size CLIP is wired: ViT-L/14 with depth-3 mask prompts runs; cached tags load offline."""
import open_clip
import torch
from safetensors.torch import save_file

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.mpt import MaskPrompts, encode_masked
from ovseg_core.crops import masked_crops

torch.set_num_threads(2)


def test_vit_l14_random_init_with_depth3_prompts_forward():
    torch.manual_seed(0)
    bundle = load_clip("ViT-L-14")
    assert bundle.image_size == 224 and bundle.embed_dim == 768
    prompts = MaskPrompts.for_visual(bundle.model.visual, 3, init_std=0.02)
    assert prompts.mask_embedding.shape == (3, 256, 1024)
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    mask = torch.zeros(1, 300, 400, dtype=torch.bool)
    mask[0, 50:200, 100:180] = True
    crops = masked_crops(image, mask, bundle.image_size, bundle.mean, bundle.std)
    with torch.no_grad():
        features = encode_masked(bundle, crops.crops, crops.masks, prompts)
    assert features.shape == (1, 768) and torch.isfinite(features).all()
    assert torch.allclose(features.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_pretrained_tag_resolves_from_local_hugging_face_cache(tmp_path, monkeypatch):
    # Lay out the cache exactly as huggingface_hub would after downloading RN50/openai
    # (hf_hub "timm/resnet50_clip.openai/"), with weights of our own.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    weights = open_clip.create_model("RN50", force_quick_gelu=True).state_dict()
    snapshot = tmp_path / "models--timm--resnet50_clip.openai" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--timm--resnet50_clip.openai" / "refs").mkdir()
    (tmp_path / "models--timm--resnet50_clip.openai" / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "open_clip_model.safetensors"))
    bundle = load_clip("RN50", pretrained="openai", cache_dir=str(tmp_path))
    assert bundle.quick_gelu and bundle.pretrained == "openai"
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
