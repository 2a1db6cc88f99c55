import open_clip
import pytest
import torch

from ovseg_core.clip.models import load_clip, save_clip
from ovseg_core.errors import DataError, MissingWeightsError

torch.set_num_threads(1)


def test_tiny_architecture_is_registered_with_open_clip():
    assert "ovseg-tiny-vit" in open_clip.list_models()
    torch.manual_seed(0)
    bundle = load_clip("ovseg-tiny-vit")
    visual = bundle.model.visual
    assert (bundle.image_size, bundle.embed_dim, bundle.arch) == (64, 128, "ovseg-tiny-vit")
    assert visual.patch_size == (8, 8) and len(visual.transformer.resblocks) == 4
    assert bundle.mean == open_clip.OPENAI_DATASET_MEAN and bundle.std == open_clip.OPENAI_DATASET_STD
    tokens = bundle.tokenize(["a photo of a teapot."])
    assert tokens.shape == (1, 24)
    # the standard open_clip BPE tokenizer
    assert torch.equal(tokens, open_clip.SimpleTokenizer(context_length=24)(["a photo of a teapot."]))
    features = bundle.model.encode_image(torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, 128)


def test_save_and_load_by_local_path_round_trips(tmp_path):
    torch.manual_seed(0)
    bundle = load_clip("ovseg-tiny-vit")
    with torch.no_grad():
        bundle.model.logit_scale.fill_(4.2)  # something a fresh init would not have
    path = save_clip(bundle, tmp_path / "models" / "clip.pt")
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    torch.manual_seed(1)
    loaded = load_clip("ovseg-tiny-vit", pretrained=path)
    original, restored = bundle.model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert (loaded.mean, loaded.std, loaded.quick_gelu) == (bundle.mean, bundle.std, bundle.quick_gelu)
    assert loaded.pretrained == str(path)
    with pytest.raises(DataError, match="ovseg-tiny-vit"):
        load_clip("ViT-B-16", pretrained=path)


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="broken.pt"):
        load_clip("ovseg-tiny-vit", pretrained=bad)


def test_uncached_tag_offline_raises_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as info:
        load_clip("ViT-L-14", pretrained="openai", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "ViT-L-14" in message and "openai" in message
    assert "timm/vit_large_patch14_clip_224.openai" in message  # the Hugging Face repo to provide
    assert "open_clip_model.safetensors" in message
    assert str(tmp_path / "ViT-L-14.pt") in message  # or the OpenAI file, at this path
    assert "local path" in message


def test_unknown_tag_or_missing_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="neither an existing checkpoint file nor"):
        load_clip("ovseg-tiny-vit", pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        load_clip("no-such-arch")


class _TorchScriptHolder(torch.nn.Module):
    """Carries CLIP weights under OpenAI's key names, with the extra scalars OpenAI's JIT files have."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_openai_style_torchscript_file_loads_with_quick_gelu(tmp_path):
    torch.manual_seed(0)
    source = load_clip("ovseg-tiny-vit").model
    holder = _TorchScriptHolder()
    for name, child in source.named_children():
        holder.add_module(name, child)
    for name, param in source.named_parameters(recurse=False):
        holder.register_parameter(name, param)
    for name in ("input_resolution", "context_length", "vocab_size"):
        holder.register_buffer(name, torch.tensor(1))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(holder).save(str(path))
    loaded = load_clip("ovseg-tiny-vit", pretrained=path)
    assert loaded.quick_gelu
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
    # a save/load round trip keeps QuickGELU
    again = load_clip("ovseg-tiny-vit", pretrained=save_clip(loaded, tmp_path / "again.pt"))
    assert again.quick_gelu
