"""OVSeg's releases and Microsoft's Swin checkpoints in the project's models, on checkpoints built from the
original key names and shapes (random weights: the real files are not here).

`ovseg import-ovseg`: the adapted CLIP (ViT-B/16 as in `ovseg_R101c_vitB16_ft_mpt.pth`) and the proposal network
of both releases (Swin-B; ResNet-101c: detectron2's DeepLab ResNet). The detectron2 / Swin layouts below are
written from the original modules (Microsoft's and detectron2's Swin, detectron2's DeepLabStem and
BottleneckBlock, MaskFormer's BasePixelDecoder and DETR decoder, ov-seg's OpenVocabTransformerPredictor), not from
the mapping; where the order of tensors or the wiring matters, hand-written forwards of those modules check the
mapped model numerically.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import convert_weights_to_fp16
from torch import nn

from ovseg_core.cli import main
from ovseg_core.clip.adapted import load_adapted
from ovseg_core.clip.export import openai_state_dict
from ovseg_core.clip.models import load_clip
from ovseg_core.clip.ovseg_release import CLIP_PREFIX, PROMPTS_KEY
from ovseg_core.clip.text import text_features
from ovseg_core.errors import DataError
from ovseg_core.maskformer import OpenVocabMaskFormer, build_model, load_backbone_weights, load_model, preset_config
from ovseg_core.maskformer.detectron2_weights import load_release_proposals, release_net, release_preset
from test_clip_export import TOL, _inputs, _max_diff
from test_maskformer import class_text

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


# A small Swin-B-shaped proposal network (the release's is paper-swin-b: Swin-B, 100 queries, 6 layers).
NET = preset_config("paper-swin-b", embed_dim=32, depths=(2, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4,
                    num_queries=6, hidden_dim=64, decoder_layers=2, decoder_ffn_dim=96, fpn_dim=64,
                    embed_hidden_dim=48)


def relative_position_index(window: int) -> torch.Tensor:
    """Swin's WindowAttention buffer: for tokens a, b of a window, (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    yx = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    d = (yx[:, :, None] - yx[:, None, :]) + window - 1
    return d[0] * (2 * window - 1) + d[1]


def original_swin(net=NET, detectron2: bool = True) -> dict[str, torch.Tensor]:
    """Swin's state dict as Microsoft's SwinTransformer / detectron2's D2SwinTransformer save it: PatchEmbed
    (proj conv, norm); per stage i of dim C·2^i, blocks (norm1; attn: relative_position_bias_table
    [(2w-1)², heads], relative_position_index, qkv, proj; norm2; mlp fc1 → 4·dim → fc2) and PatchMerging
    (norm over 4·dim, reduction 4·dim → 2·dim) but after the last stage. detectron2 adds norm0..3 on the stage
    outputs; Microsoft's classifier a final norm, the head, and shifted blocks' attn_mask buffers."""
    c, p, w = net.embed_dim, net.patch_size, net.window_size
    shapes = {"patch_embed.proj.weight": (c, 3, p, p), "patch_embed.proj.bias": (c,),
              "patch_embed.norm.weight": (c,), "patch_embed.norm.bias": (c,)}
    for i, (depth, heads) in enumerate(zip(net.depths, net.num_heads)):
        dim = c * 2**i
        for j in range(depth):
            shapes |= {f"layers.{i}.blocks.{j}.{k}": s for k, s in {
                "norm1.weight": (dim,), "norm1.bias": (dim,),
                "attn.relative_position_bias_table": ((2 * w - 1) ** 2, heads),
                "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
                "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                "norm2.weight": (dim,), "norm2.bias": (dim,),
                "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
                "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}.items()}
        if i < len(net.depths) - 1:
            shapes |= {f"layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim),
                       f"layers.{i}.downsample.norm.weight": (4 * dim,), f"layers.{i}.downsample.norm.bias": (4 * dim,)}
        if detectron2:
            shapes |= {f"norm{i}.weight": (dim,), f"norm{i}.bias": (dim,)}
    top = c * 2 ** (len(net.depths) - 1)
    if not detectron2:
        shapes |= {"norm.weight": (top,), "norm.bias": (top,), "head.weight": (10, top), "head.bias": (10,)}
    state = {k: torch.randn(s) for k, s in shapes.items()}
    for i, depth in enumerate(net.depths):
        for j in range(depth):
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(w)
            if not detectron2 and j % 2:
                state[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, w * w, w * w)
    return state


def release_proposals(net=NET, dim: int = 32) -> dict[str, torch.Tensor]:
    """ov-seg's Swin-B release's proposal network as its OVSeg model saves it: `backbone.` D2SwinTransformer
    and the heads (`release_heads`)."""
    state = {"backbone." + k: v for k, v in original_swin(net).items()}
    return state | release_heads([net.embed_dim * 2**i for i in range(len(net.depths))], net, dim)


def release_heads(channels: list[int], net=NET, dim: int = 32, make=torch.randn) -> dict[str, torch.Tensor]:
    """ov-seg's heads on backbone features of `channels` (res2..res5): `sem_seg_head.pixel_decoder.`
    BasePixelDecoder (GN convs without bias: adapter_k 1x1 on res(k+1) and layer_k 3x3 for k < 4, layer_4 3x3 on
    res5, mask_features 3x3 with bias); `sem_seg_head.predictor.` query_embed, input_proj (1x1 conv from res5),
    DETR decoder layers (self_attn / multihead_attn nn.MultiheadAttention, linear1/2, norm1..3), decoder norm,
    mask_embed MLP (3 layers) and class_embed MLP (hidden → embed_hidden → CLIP dim); the non-object embedding
    [1, D]; and entries no proposal weights."""
    state = {}
    f, h, ff, e = net.fpn_dim, net.hidden_dim, net.decoder_ffn_dim, net.embed_hidden_dim
    shapes = {"layer_4.weight": (f, channels[3], 3, 3), "layer_4.norm.weight": (f,), "layer_4.norm.bias": (f,),
              "mask_features.weight": (f, f, 3, 3), "mask_features.bias": (f,)}
    for k in (1, 2, 3):
        shapes |= {f"adapter_{k}.weight": (f, channels[k - 1], 1, 1), f"adapter_{k}.norm.weight": (f,),
                   f"adapter_{k}.norm.bias": (f,), f"layer_{k}.weight": (f, f, 3, 3), f"layer_{k}.norm.weight": (f,),
                   f"layer_{k}.norm.bias": (f,)}
    state |= {"sem_seg_head.pixel_decoder." + k: make(s) for k, s in shapes.items()}
    shapes = {"query_embed.weight": (net.num_queries, h), "input_proj.weight": (h, channels[3], 1, 1),
              "input_proj.bias": (h,), "transformer.decoder.norm.weight": (h,), "transformer.decoder.norm.bias": (h,),
              "mask_embed.layers.0.weight": (h, h), "mask_embed.layers.0.bias": (h,),
              "mask_embed.layers.1.weight": (h, h), "mask_embed.layers.1.bias": (h,),
              "mask_embed.layers.2.weight": (f, h), "mask_embed.layers.2.bias": (f,),
              "class_embed.layers.0.weight": (e, h), "class_embed.layers.0.bias": (e,),
              "class_embed.layers.1.weight": (dim, e), "class_embed.layers.1.bias": (dim,)}
    for n in range(net.decoder_layers):
        layer = f"transformer.decoder.layers.{n}."
        for attention in ("self_attn", "multihead_attn"):
            shapes |= {f"{layer}{attention}.in_proj_weight": (3 * h, h), f"{layer}{attention}.in_proj_bias": (3 * h,),
                       f"{layer}{attention}.out_proj.weight": (h, h), f"{layer}{attention}.out_proj.bias": (h,)}
        shapes |= {f"{layer}linear1.weight": (ff, h), f"{layer}linear1.bias": (ff,),
                   f"{layer}linear2.weight": (h, ff), f"{layer}linear2.bias": (h,)}
        shapes |= {f"{layer}norm{i}.{p}": (h,) for i in (1, 2, 3) for p in ("weight", "bias")}
    state |= {"sem_seg_head.predictor." + k: make(s) for k, s in shapes.items()}
    state["clip_adapter.non_object_embedding"] = make((1, dim))
    state["criterion.empty_weight"] = torch.ones(172)
    state["clip_adapter.pixel_mean"] = torch.zeros(1, 3, 1, 1)
    return state


@pytest.fixture(scope="module")
def imported() -> tuple[dict[str, torch.Tensor], OpenVocabMaskFormer]:
    torch.manual_seed(0)
    state = release_proposals()
    model = OpenVocabMaskFormer(release_net(Path("release.pth"), state, preset_config("paper-swin-b")), class_text(3))
    load_release_proposals(model.eval(), state, Path("release.pth"))
    return state, model


def test_release_proposal_network_loads_with_every_tensor_in_place(imported):
    state, model = imported
    assert model.net == NET  # sized from the tensors (decoder heads: the preset's 8)
    loaded = model.state_dict()
    for source, target in {  # facts of the layouts (see detectron2_weights' docstring)
        "backbone.norm0.weight": "model.pixel_level_module.encoder.hidden_states_norms.0.weight",
        "sem_seg_head.pixel_decoder.layer_4.weight": "model.pixel_level_module.decoder.fpn.stem.0.weight",
        "sem_seg_head.pixel_decoder.adapter_1.weight": "model.pixel_level_module.decoder.fpn.layers.2.proj.0.weight",
        "sem_seg_head.pixel_decoder.layer_3.norm.bias": "model.pixel_level_module.decoder.fpn.layers.0.block.1.bias",
        "sem_seg_head.pixel_decoder.mask_features.bias": "model.pixel_level_module.decoder.mask_projection.bias",
        "sem_seg_head.predictor.input_proj.weight": "model.transformer_module.input_projection.weight",
        "sem_seg_head.predictor.query_embed.weight": "model.transformer_module.queries_embedder.weight",
        "sem_seg_head.predictor.transformer.decoder.norm.weight": "model.transformer_module.decoder.layernorm.weight",
        "sem_seg_head.predictor.mask_embed.layers.2.weight": "mask_embedder.2.0.weight",
        "sem_seg_head.predictor.class_embed.layers.1.bias": "class_predictor.projection.1.0.bias",
    }.items():
        assert torch.equal(loaded[target], state[source]), source
    assert torch.equal(model.class_predictor.void_embedding, state["clip_adapter.non_object_embedding"][0])
    # Every source tensor (each third of a fused q/k/v one) is somewhere in the model, unchanged.
    values = list(loaded.values())
    for key, tensor in state.items():
        if key.startswith(("backbone.", "sem_seg_head.")) and not key.endswith("relative_position_index"):
            parts = tensor.chunk(3) if ("qkv" in key or "in_proj" in key) else [tensor]
            assert all(any(v.shape == t.shape and torch.equal(v, t) for v in values) for t in parts), key


def test_swin_attention_matches_the_original_fused_qkv_formula(imported):
    state, model = imported
    stage, heads, w = 2, NET.num_heads[2], NET.window_size
    dim = NET.embed_dim * 2**stage
    x = 0.1 * torch.randn(3, w * w, dim)  # 3 windows of w² tokens
    src = f"backbone.layers.{stage}.blocks.1.attn."
    q, k, v = F.linear(x, state[src + "qkv.weight"], state[src + "qkv.bias"]).view(3, w * w, 3, heads, -1) \
        .permute(2, 0, 3, 1, 4)
    bias = state[src + "relative_position_bias_table"][relative_position_index(w).flatten()]
    scores = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1) + bias.view(w * w, w * w, heads).permute(2, 0, 1)
    expected = F.linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, w * w, dim),
                        state[src + "proj.weight"], state[src + "proj.bias"])
    block = model.model.pixel_level_module.encoder.model.encoder.layers[stage].blocks[1]
    with torch.no_grad():
        assert torch.allclose(block.attention(x)[0], expected, rtol=1e-4, atol=1e-4)


def test_pixel_decoder_matches_detectron2s_base_pixel_decoder(imported):
    state, model = imported
    src = {k[len("sem_seg_head.pixel_decoder."):]: v for k, v in state.items()
           if k.startswith("sem_seg_head.pixel_decoder.")}
    features = [torch.randn(1, NET.embed_dim * 2**i, 16 // 2**i, 24 // 2**i) for i in range(4)]  # res2..res5

    def conv_gn_relu(name: str, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        weight = src[name + ".weight"]
        y = F.group_norm(F.conv2d(x, weight, padding=weight.shape[-1] // 2), 32, src[name + ".norm.weight"],
                         src[name + ".norm.bias"])
        return F.relu(y) if relu else y

    y = conv_gn_relu("layer_4", features[3])  # top-down from res5
    for k in (3, 2, 1):
        lateral = conv_gn_relu(f"adapter_{k}", features[k - 1], relu=False)
        y = conv_gn_relu(f"layer_{k}", lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
    expected = F.conv2d(y, src["mask_features.weight"], src["mask_features.bias"], padding=1)
    with torch.no_grad():
        actual = model.model.pixel_level_module.decoder(features).last_hidden_state
    assert torch.allclose(actual, expected, atol=1e-4)


def test_decoder_layer_matches_detr_with_torch_multihead_attention(imported):
    state, model = imported
    src = "sem_seg_head.predictor.transformer.decoder.layers.1."
    h = NET.hidden_dim

    def attention(name: str) -> nn.MultiheadAttention:
        mha = nn.MultiheadAttention(h, NET.decoder_heads, batch_first=True)
        mha.load_state_dict({k: state[f"{src}{name}.{k}"] for k in
                             ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        return mha.eval()

    def norm(i: int, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (h,), state[f"{src}norm{i}.weight"], state[f"{src}norm{i}.bias"])

    tgt, query_pos = torch.randn(2, NET.num_queries, h), torch.randn(2, NET.num_queries, h)
    memory, pos = torch.randn(2, 12, h), torch.randn(2, 12, h)
    with torch.no_grad():  # DETR's TransformerDecoderLayer.forward_post
        x = norm(1, tgt + attention("self_attn")(tgt + query_pos, tgt + query_pos, tgt)[0])
        x = norm(2, x + attention("multihead_attn")(x + query_pos, memory + pos, memory)[0])
        ffn = F.linear(F.relu(F.linear(x, state[src + "linear1.weight"], state[src + "linear1.bias"])),
                       state[src + "linear2.weight"], state[src + "linear2.bias"])
        expected = norm(3, x + ffn)
        actual = model.model.transformer_module.decoder.layers[1](
            tgt, spatial_position_embeddings=pos, object_queries_position_embeddings=query_pos,
            encoder_hidden_states=memory)
    assert torch.allclose(actual, expected, atol=1e-5)


def test_release_that_does_not_fit_is_one_error_naming_file_and_keys():
    torch.manual_seed(1)
    path = Path("ovseg_swinbase_vitL14_ft_mpt.pth")

    def load(state: dict[str, torch.Tensor]) -> None:
        model = OpenVocabMaskFormer(release_net(path, state, preset_config("paper-swin-b")), class_text(3))
        load_release_proposals(model, state, path)

    state = release_proposals()
    del state["sem_seg_head.pixel_decoder.adapter_2.norm.weight"], state["clip_adapter.non_object_embedding"]
    state["backbone.layers.0.blocks.0.attn.extra"] = torch.zeros(1)
    state["sem_seg_head.pixel_decoder.adapter_1.weight"] = torch.zeros(64, 31, 1, 1)
    with pytest.raises(DataError) as error:
        load(state)
    message = str(error.value)
    assert message.startswith(str(path))
    assert "2 tensors missing" in message and "fpn.layers.1.proj.1.weight" in message and "void_embedding" in message
    assert "1 tensors unexpected (e.g. ['backbone.layers.0.blocks.0.attn.extra'])" in message
    assert "fpn.layers.2.proj.0.weight (64, 31, 1, 1) vs (64, 32, 1, 1)" in message

    # A ResNet layout that is not the R101c release's: one error saying what does not map.
    partial = {"backbone.stem.conv1.weight": torch.zeros(64, 3, 3, 3), **release_proposals()}
    with pytest.raises(DataError, match=r"not ov-seg's ResNet \(DeepLab\) proposal network: no 'backbone\.res2\.0"):
        load(partial)
    basic_stem = {k: v for k, v in deeplab_resnet(make=_meta).items() if not k.startswith("backbone.stem.conv")}
    basic_stem["backbone.stem.conv1.weight"] = torch.zeros(64, 3, 7, 7)  # detectron2's BasicStem (7x7, 64)
    with pytest.raises(DataError, match=r"ResNet proposal network does not map: stem convs \(\(64, 3, 7, 7\), "):
        release_net(path, basic_stem | release_heads([256, 512, 1024, 2048], make=_meta), NET)


def test_microsoft_swin_checkpoint_loads_as_backbone_weights(tmp_path):
    torch.manual_seed(2)
    microsoft = original_swin(detectron2=False)
    torch.save({"model": microsoft}, tmp_path / "swin_base_patch4_window12_384_22k.pth")
    model = build_model(NET, class_text(3), backbone_weights=tmp_path / "swin_base_patch4_window12_384_22k.pth")
    swin = model.model.pixel_level_module.encoder.model
    attention = swin.encoder.layers[1].blocks[0].attention.self
    q, k, v = microsoft["layers.1.blocks.0.attn.qkv.weight"].chunk(3)
    assert torch.equal(attention.query.weight, q) and torch.equal(attention.key.weight, k)
    assert torch.equal(attention.value.weight, v)
    assert torch.equal(swin.encoder.layers[2].blocks[1].layernorm_after.bias, microsoft["layers.2.blocks.1.norm2.bias"])
    assert torch.equal(swin.encoder.layers[0].downsample.reduction.weight,
                       microsoft["layers.0.downsample.reduction.weight"])
    assert torch.equal(swin.embeddings.patch_embeddings.projection.weight, microsoft["patch_embed.proj.weight"])
    assert torch.equal(swin.layernorm.weight, microsoft["norm.weight"])

    # detectron2's Swin (an ov-seg release) also brings MaskFormer's per-stage norms.
    release = release_proposals()
    torch.save({"model": release}, tmp_path / "release.pth")
    load_backbone_weights(model, tmp_path / "release.pth")
    norms = model.model.pixel_level_module.encoder.hidden_states_norms
    assert torch.equal(norms[3].bias, release["backbone.norm3.bias"])

    del microsoft["layers.1.blocks.0.attn.proj.weight"]
    torch.save({"model": microsoft}, tmp_path / "partial.pth")
    with pytest.raises(DataError, match=r"partial\.pth: 1 of .* missing .*layers\.1\.blocks\.0\.attention\.output"):
        build_model(NET, class_text(3), backbone_weights=tmp_path / "partial.pth")


# ov-seg's ResNet-101c release: detectron2's DeepLab ResNet-101 (configs/ovseg_R101c_vitB_bs32_120k.yaml:
# build_resnet_deeplab_backbone, STEM_TYPE deeplab, STEM_OUT_CHANNELS 128, STRIDE_IN_1X1 False, RES5_MULTI_GRID
# [1, 2, 4], NORM detectron2's default FrozenBN). The tests build its 50-layer sibling (blocks per stage 3/4/6/3,
# the same modules: timm's resnet50s) with NET's small heads; the R-101 layout is sized without building it.
STRIDE_IN_1X1, RES5_MULTI_GRID, BN_EPS = False, (1, 2, 4), 1e-5
R50, R101 = (3, 4, 6, 3), (3, 4, 23, 3)
RESNET_NET = replace(preset_config("paper-r101c-deeplab"), backbone="deeplab:resnet50s", **{
    k: getattr(NET, k) for k in ("num_queries", "hidden_dim", "decoder_layers", "decoder_ffn_dim", "fpn_dim",
                                 "embed_hidden_dim", "embed_layers")})
RESNET_CHANNELS = [256, 512, 1024, 2048]


def _meta(shape) -> torch.Tensor:
    return torch.empty(shape, device="meta")  # shapes only


def deeplab_resnet(blocks=R50, make=None) -> dict[str, torch.Tensor]:
    """detectron2's ResNet as `build_resnet_deeplab_backbone` builds and saves it, under `backbone.`: DeepLabStem
    `stem.conv1..3` (3x3 convs 3 → 64 → 64 → 128), then `res2..res5` of BottleneckBlocks (conv1 1x1 in →
    bottleneck, conv2 3x3, conv3 1x1 → out; bottleneck 64 · 2^s, out 256 · 2^s for stage s = 0..3; res2 takes
    the stem's 128 channels) and a 1x1 `shortcut` where in ≠ out (each stage's first block). Every conv is a
    detectron2 Conv2d without bias whose `norm` is a FrozenBatchNorm2d: weight, bias, running_mean, running_var.
    Random weights at He scale and BN statistics near 1, so that activations stay O(1) through 50 layers."""
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out: int, inp: int, k: int, last: bool = False) -> None:
        if make is not None:
            state[f"backbone.{name}.weight"] = make((out, inp, k, k))
            state.update({f"backbone.{name}.norm.{p}": make((out,))
                          for p in ("weight", "bias", "running_mean", "running_var")})
            return
        state[f"backbone.{name}.weight"] = torch.randn(out, inp, k, k) * (2 / (inp * k * k)) ** 0.5
        state[f"backbone.{name}.norm.weight"] = (0.2 if last else 1.0) * (1 + 0.1 * torch.randn(out))
        state[f"backbone.{name}.norm.bias"] = 0.1 * torch.randn(out)
        state[f"backbone.{name}.norm.running_mean"] = 0.1 * torch.randn(out)
        state[f"backbone.{name}.norm.running_var"] = 0.5 + torch.rand(out)

    conv("stem.conv1", 64, 3, 3)
    conv("stem.conv2", 64, 64, 3)
    conv("stem.conv3", 128, 64, 3)
    inp = 128
    for s, n in enumerate(blocks):
        b, out = 64 * 2**s, 256 * 2**s
        for i in range(n):
            name = f"res{s + 2}.{i}"
            if inp != out:
                conv(f"{name}.shortcut", out, inp, 1)
            conv(f"{name}.conv1", b, inp, 1)
            conv(f"{name}.conv2", b, b, 3)
            conv(f"{name}.conv3", out, b, 1, last=True)
            inp = out
    return state


def resnet_release_proposals(blocks=R50, dim: int = 32) -> dict[str, torch.Tensor]:
    return deeplab_resnet(blocks) | release_heads(RESNET_CHANNELS, RESNET_NET, dim)


# detectron2's modules, by hand, reading the checkpoint's tensors (`s`, names without `backbone.`).
def frozen_bn(x: torch.Tensor, s: dict, name: str) -> torch.Tensor:
    """FrozenBatchNorm2d: (x - running_mean) / sqrt(running_var + eps) · weight + bias, per channel."""
    scale = s[name + ".weight"] / torch.sqrt(s[name + ".running_var"] + BN_EPS)
    shift = s[name + ".bias"] - s[name + ".running_mean"] * scale
    return x * scale[:, None, None] + shift[:, None, None]


def conv_norm(x: torch.Tensor, s: dict, name: str, stride: int = 1, dilation: int = 1) -> torch.Tensor:
    """detectron2's Conv2d(bias=False, norm=FrozenBN); padding k // 2 · dilation keeps the size."""
    weight = s[name + ".weight"]
    y = F.conv2d(x, weight, stride=stride, padding=dilation * (weight.shape[-1] // 2), dilation=dilation)
    return frozen_bn(y, s, name + ".norm")


def deeplab_stem(x: torch.Tensor, s: dict) -> torch.Tensor:
    """DeepLabStem: conv1 (stride 2), conv2, conv3, each + norm + ReLU, then max pool 3x3 stride 2 padding 1."""
    x = F.relu(conv_norm(x, s, "stem.conv1", stride=2))
    x = F.relu(conv_norm(x, s, "stem.conv2"))
    x = F.relu(conv_norm(x, s, "stem.conv3"))
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def bottleneck(x: torch.Tensor, s: dict, name: str, stride: int, dilation: int,
               stride_in_1x1: bool = STRIDE_IN_1X1) -> torch.Tensor:
    """BottleneckBlock: the stride on conv1 (1x1) when stride_in_1x1, else on conv2 (3x3, dilated); the
    shortcut (1x1 with the block's stride + norm) where the checkpoint has one, else the identity."""
    stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
    out = F.relu(conv_norm(x, s, name + ".conv1", stride=stride_1x1))
    out = F.relu(conv_norm(out, s, name + ".conv2", stride=stride_3x3, dilation=dilation))
    out = conv_norm(out, s, name + ".conv3")
    shortcut = conv_norm(x, s, name + ".shortcut", stride=stride) if name + ".shortcut.weight" in s else x
    return F.relu(out + shortcut)


def block_settings(stage: int, i: int) -> tuple[int, int]:
    """(stride, dilation) of block i of res{stage} in build_resnet_deeplab_backbone with RES5_DILATION 1:
    res3..res5 start with stride 2; res5's blocks are dilated by the multi-grid."""
    return (2 if i == 0 and stage > 2 else 1), (RES5_MULTI_GRID[i] if stage == 5 else 1)


def deeplab_backbone(x: torch.Tensor, s: dict, blocks=R50) -> list[torch.Tensor]:
    """res2..res5 of detectron2's ResNet."""
    x, features = deeplab_stem(x, s), []
    for stage, n in zip((2, 3, 4, 5), blocks):
        for i in range(n):
            x = bottleneck(x, s, f"res{stage}.{i}", *block_settings(stage, i))
        features.append(x)
    return features


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-4,
                                                             atol=1e-4 * expected.abs().max().item())


@pytest.fixture(scope="module")
def imported_resnet() -> tuple[dict[str, torch.Tensor], OpenVocabMaskFormer]:
    torch.manual_seed(5)
    state = resnet_release_proposals()
    path = Path("ovseg_R101c_vitB16_ft_mpt.pth")
    model = OpenVocabMaskFormer(release_net(path, state, preset_config(release_preset(state))), class_text(3))
    load_release_proposals(model.eval(), state, path)
    return state, model


def test_r101c_release_is_sized_from_its_tensors():
    state = deeplab_resnet(R101, make=_meta) | release_heads(RESNET_CHANNELS, preset_config("paper-r101c-deeplab"),
                                                              dim=512, make=_meta)
    assert release_preset(state) == "paper-r101c-deeplab"
    # The real release's shapes give exactly the preset: detectron2's R-101 as timm's resnet101s, ov-seg's heads.
    assert release_net(Path("r101c.pth"), state, preset_config("paper-r101c-deeplab")) == preset_config(
        "paper-r101c-deeplab")
    assert preset_config("paper-r101c-deeplab").backbone == "deeplab:resnet101s"


def test_r101c_release_proposal_network_loads_with_every_tensor_in_place(imported_resnet):
    state, model = imported_resnet
    assert model.net == RESNET_NET
    loaded = model.state_dict()
    encoder = "model.pixel_level_module.encoder._backbone."
    for source, target in {  # facts of the layouts (see detectron2_weights' docstring)
        "stem.conv1.weight": "conv1.0.weight", "stem.conv1.norm.running_mean": "conv1.1.running_mean",
        "stem.conv2.weight": "conv1.3.weight", "stem.conv2.norm.weight": "conv1.4.weight",
        "stem.conv3.weight": "conv1.6.weight", "stem.conv3.norm.running_var": "bn1.running_var",
        "res2.0.shortcut.weight": "layer1.0.downsample.0.weight",
        "res2.0.shortcut.norm.bias": "layer1.0.downsample.1.bias",
        "res3.0.conv1.norm.weight": "layer2.0.bn1.weight", "res4.5.conv3.weight": "layer3.5.conv3.weight",
        "res5.2.conv2.norm.running_var": "layer4.2.bn2.running_var",
    }.items():
        assert torch.equal(loaded[encoder + target], state["backbone." + source]), source
    assert not any("num_batches_tracked" in k for k in loaded)  # frozen BN, like detectron2's
    assert torch.equal(loaded["model.pixel_level_module.decoder.fpn.stem.0.weight"],
                       state["sem_seg_head.pixel_decoder.layer_4.weight"])  # the heads' rules: the Swin release's
    values = list(loaded.values())
    for key, tensor in state.items():
        if key.startswith(("backbone.", "sem_seg_head.")):
            parts = tensor.chunk(3) if "in_proj" in key else [tensor]
            assert all(any(v.shape == t.shape and torch.equal(v, t) for v in values) for t in parts), key

    # A BatchNorm's batch counter (a release trained with SyncBN would hold them) carries no weight.
    counted = state | {"backbone.res2.0.conv1.norm.num_batches_tracked": torch.tensor(7)}
    load_release_proposals(model, counted, Path("ovseg_R101c_vitB16_ft_mpt.pth"))
    # Every backbone tensor is required: a dropped shortcut norm is one error naming it.
    dropped = {k: v for k, v in state.items() if not k.startswith("backbone.res3.0.shortcut.norm.")}
    with pytest.raises(DataError, match=r"4 tensors missing .*layer2\.0\.downsample\.1\."):
        load_release_proposals(model, dropped, Path("ovseg_R101c_vitB16_ft_mpt.pth"))


def test_deeplab_stem_and_bottlenecks_match_detectron2s(imported_resnet):
    state, model = imported_resnet
    s = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    resnet = model.model.pixel_level_module.encoder._backbone
    torch.manual_seed(6)
    with torch.no_grad():
        x = torch.randn(2, 3, 40, 56)
        stem = resnet.maxpool(resnet.act1(resnet.bn1(resnet.conv1(x))))
        assert _close(stem, deeplab_stem(x, s))
        for stage, i, channels, size in [(2, 0, 128, 13), (3, 0, 256, 13), (3, 1, 512, 9), (5, 0, 1024, 14),
                                         (5, 1, 2048, 11), (5, 2, 2048, 11)]:
            x = torch.randn(1, channels, size, size + 2)
            block = getattr(resnet, f"layer{stage - 1}")[i]
            assert _close(block(x), bottleneck(x, s, f"res{stage}.{i}", *block_settings(stage, i))), (stage, i)


def test_deeplab_backbone_features_match_detectron2s_resnet(imported_resnet):
    state, model = imported_resnet
    s = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    torch.manual_seed(7)
    x = torch.randn(1, 3, 160, 192)  # res5 5 x 6: large enough that dilations 2 and 4 differ
    with torch.no_grad():
        actual = model.model.pixel_level_module.encoder(x).feature_maps
        expected = deeplab_backbone(x, s)
    assert [tuple(f.shape[-2:]) for f in actual] == [(40, 48), (20, 24), (10, 12), (5, 6)]  # strides 4..32
    for stage, (a, e) in enumerate(zip(actual, expected), start=2):
        assert _close(a, e), f"res{stage}"


def test_import_ovseg_writes_the_proposal_network_with_the_release_clips_text_features(tmp_path, capsys):
    torch.manual_seed(4)
    bundle = load_clip("ViT-B-16-quickgelu")
    checkpoint = tmp_path / "release.pth"
    payload = release(bundle, 0.02 * torch.randn(3, 196, 768))
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith(("backbone.", "sem_seg_head."))}
    payload["model"] |= release_proposals(dim=512)
    torch.save(payload, checkpoint)
    out, proposals = tmp_path / "adapt_clip" / "ovseg", tmp_path / "train_maskformer" / "ovseg.pt"
    argv = ["import-ovseg", str(checkpoint), "--out", str(out), "--proposals-out", str(proposals)]
    assert main([*argv, "--classes", "sky, grass, kite"]) == 0
    assert f"use it as --maskformer {proposals}" in capsys.readouterr().out
    model, meta = load_model(proposals)
    assert meta["classes"] == ["sky", "grass", "kite"] and model.net == NET
    expected = text_features(load_adapted(out).bundle, ["sky", "grass", "kite"])
    assert torch.allclose(model.class_predictor.text_features, expected, atol=1e-6)
    assert torch.equal(model.class_predictor.void_embedding, payload["model"]["clip_adapter.non_object_embedding"][0])

    # A proposal network that does not map (an abridged ResNet one): an error, and nothing written.
    torch.save(release(bundle, 0.02 * torch.randn(3, 196, 768)), checkpoint)
    assert main([*argv[:3], str(tmp_path / "r101c"), *argv[4:]]) == 1
    assert "not ov-seg's ResNet (DeepLab) proposal network: no 'backbone.res3.0.*'" in capsys.readouterr().err
    assert not (tmp_path / "r101c").exists()
    # No proposal network in the checkpoint: the CLIP only.
    payload["model"] = {k: v for k, v in payload["model"].items() if k.startswith(CLIP_PREFIX)}
    torch.save(payload, checkpoint)
    proposals.unlink()
    assert main(argv) == 0
    assert "holds no proposal network: wrote the CLIP only" in capsys.readouterr().out and not proposals.exists()


def test_import_ovseg_writes_the_r101c_release_proposal_network(tmp_path, capsys):
    torch.manual_seed(8)
    bundle = load_clip("ViT-B-16-quickgelu")
    payload = release(bundle, 0.02 * torch.randn(3, 196, 768))  # the R101c release's CLIP: ViT-B/16
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith(("backbone.", "sem_seg_head."))}
    payload["model"] |= resnet_release_proposals(dim=512)
    checkpoint = tmp_path / "ovseg_R101c_vitB16_ft_mpt.pth"
    torch.save(payload, checkpoint)
    out, proposals = tmp_path / "adapt_clip" / "ovseg-r101c", tmp_path / "train_maskformer" / "ovseg-r101c.pt"
    assert main(["import-ovseg", str(checkpoint), "--out", str(out), "--proposals-out", str(proposals),
                 "--classes", "sky, grass"]) == 0
    assert f"use it as --maskformer {proposals}" in capsys.readouterr().out
    model, meta = load_model(proposals)
    assert meta["classes"] == ["sky", "grass"] and model.net == RESNET_NET
    expected = text_features(load_adapted(out).bundle, ["sky", "grass"])
    assert torch.allclose(model.class_predictor.text_features, expected, atol=1e-6)
    resnet = model.model.pixel_level_module.encoder._backbone
    assert [b.conv2.dilation for b in resnet.layer4] == [(1, 1), (2, 2), (4, 4)]  # rebuilt with the multi-grid
    s = {k[len("backbone."):]: v for k, v in payload["model"].items() if k.startswith("backbone.")}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        actual = model.model.pixel_level_module.encoder(x).feature_maps
        assert all(_close(a, e) for a, e in zip(actual, deeplab_backbone(x, s)))
        assert model(model.normalize(torch.randint(0, 256, (1, 3, 64, 96)))).class_queries_logits.shape == (1, 6, 3)

    # The release file also serves as `deeplab:` backbone weights (detectron2's ResNet layout).
    with torch.no_grad():
        for p in resnet.parameters():
            p.zero_()
    load_backbone_weights(model, checkpoint)
    assert torch.equal(resnet.layer3[5].conv3.weight, payload["model"]["backbone.res4.5.conv3.weight"])
    assert torch.equal(resnet.conv1[3].weight, payload["model"]["backbone.stem.conv2.weight"])
