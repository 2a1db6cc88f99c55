"""Microsoft's original Swin checkpoints and ov-seg's detectron2 releases (Swin-B and ResNet-101c) → the proposal
network's names.

Hand-written because transformers has nothing for it: transformers 5 ships no MaskFormer conversion script
(older releases had `convert_maskformer_original_pytorch_checkpoint_to_pytorch.py`, and no
`convert_maskformer_swin_to_pytorch.py` is installed), and `transformers.conversion_mapping` only renames
between transformers' own checkpoint generations (e.g. Swin's `attention.self.query` ↔ `attention.q_proj`).

The layouts (microsoft/Swin-Transformer, facebookresearch/MaskFormer, facebookresearch/ov-seg):

* Swin, `patch_embed.*`, `layers.{i}.blocks.{j}.*`, `layers.{i}.downsample.*`: each block's fused `attn.qkv`
  Linear stacks query, key and value (in that order) along its output rows. Microsoft's classification
  checkpoint ends in `norm` (→ MaskFormerSwin's final `layernorm`, which MaskFormer never uses) and `head`
  (dropped). detectron2's `D2SwinTransformer` (ov-seg's `backbone.`) has no `norm`/`head` but norms each
  stage's output with `norm0..norm3` (→ `hidden_states_norms`). `relative_position_index` and the shifted
  blocks' `attn_mask` are constants of window size and resolution: transformers builds its own.
* MaskFormer's `BasePixelDecoder` (`sem_seg_head.pixel_decoder.`) numbers levels from the finest (res2 = 1);
  transformers' FPN runs from the coarsest. `layer_4` (3x3 conv + GroupNorm(32) on res5) is the FPN `stem`;
  level k = 1..3 has a lateral `adapter_k` (1x1 conv + GN) and an output `layer_k` (3x3 conv + GN), FPN
  layer 3 - k's `proj` and `block`; the GN's weights are `<conv>.norm.*` and the convs have no bias.
  `mask_features` (3x3 conv with bias) is `mask_projection`.
* ov-seg's `OpenVocabTransformerPredictor` (`sem_seg_head.predictor.`): DETR's post-norm decoder on res5,
  `nn.MultiheadAttention`s whose `in_proj_*` stack q, k, v; `norm1/2/3` follow self-attention,
  cross-attention and the FFN (`linear1/2`); `class_embed` is an MLP hidden → 1024 → CLIP dim (ReLU between,
  `layers.{i}` Linears, like `mask_embed`). `clip_adapter.non_object_embedding` [1, D] is the void class.
* detectron2's DeepLab ResNet (`backbone.` of ov-seg's ResNet-101c release, `ovseg_R101c_vitB16_ft_mpt.pth`;
  detectron2 `projects/DeepLab/deeplab/resnet.py`, `build_resnet_deeplab_backbone`, and
  `detectron2/modeling/backbone/resnet.py`) → timm's ResNet inside transformers' `TimmBackbone` (`_backbone.`),
  the `deeplab:<timm name>` backbone of `maskformer.model` (preset `paper-r101c-deeplab`). Every conv has no
  bias and a FrozenBatchNorm2d `norm` (buffers weight, bias, running_mean, running_var; eps 1e-5; no
  num_batches_tracked — a BN counter, if a file has one, carries no weight and is skipped). `stem.conv1..3`
  (3x3: 3 → 64 stride 2, 64 → 64, 64 → 128; ReLU after each, then a 3x3 stride-2 max pool) are timm's deep
  stem `conv1.0 / .3 / .6` with norms `conv1.1`, `conv1.4` and `bn1`; `res{k}.{i}.conv{1,2,3}` (1x1, 3x3,
  1x1) and their norms are `layer{k-1}.{i}.conv{1,2,3}` / `bn{1,2,3}`; the first block of each stage has a
  projection `shortcut` (1x1 with the block's stride, + norm) = `downsample.0` / `.1`. ov-seg's config has
  STRIDE_IN_1X1 False, so a block's stride sits on its 3x3 conv as in timm; RES5_MULTI_GRID [1, 2, 4] with
  the default RES5_DILATION 1 keeps res5's stride 2 and dilates its three 3x3 convs by 1, 2, 4, which
  `maskformer.model` sets on timm's built res5 convs (timm has no per-block dilation). The depth is read from
  the tensors (blocks per stage 3/4/23/3: R-101, timm `resnet101s`, the deep-stem "S" ResNet; 3/4/6/3 and
  3/8/36/3: resnet50s / resnet152s).

The class logits agree with `CosineClassHead` (logit_scale 100): ov-seg's inference takes 100 · cos(normalised
class_embed(query), [text features; normalised non-object embedding]), the text features from the release's
own CLIP with the 14 ViLD templates (each normalised, averaged, renormalised), which is
`ovseg_core.clip.text.text_features`. Differences left: ov-seg's configs set INPUT.SIZE_DIVISIBILITY 640
(Swin-B) / 512 (R101c), commented "used in dataset mapper" (whether ov-seg's test-time mapper pads by it was
not checked here); the project pads test images to a multiple of 32.

ov-seg's test-time settings (its configs; `segment` / `evaluate` take their own): the R101c release is
evaluated with `configs/ovseg_R101c_vitB_bs32_120k.yaml` (GETTING_STARTED.md): short side 512 (MIN_SIZE_TEST;
MAX_SIZE_TEST 2048), CLIP ViT-B/16 with MASK_PROMPT_DEPTH 3 and MASK_PROMPT_FWD, MASK_THR 0.5, MASK_FILL
"mean", MASK_EXPAND_RATIO 1.0, CLIP_ENSEMBLE with CLIP_ENSEMBLE_WEIGHT 0.7, ViLD templates, 100 queries, crop
512, EMBEDDING_DIM 512. Its backbone block of that config: `build_resnet_deeplab_backbone`, DEPTH 101,
STEM_TYPE "deeplab", STEM_OUT_CHANNELS 128, STRIDE_IN_1X1 False, OUT_FEATURES res2..res5, RES5_MULTI_GRID
[1, 2, 4], NORM left at detectron2's default "FrozenBN" (its `NORM: "SyncBN"` line is commented out),
initialised from `detectron2://DeepLab/R-103.pkl`. (Swin-B demo config, for comparison: short side 640,
MAX 2560, MASK_THR 0.35.)

Neither release file has been met here (no downloads): the layouts are tested on checkpoints written from the
original module structures (tests/test_ovseg_release.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from torch import Tensor

from ..errors import DataError

if TYPE_CHECKING:
    from .model import OpenVocabMaskFormer, ProposalNetConfig

Target = str | tuple[str, ...]  # a tuple: the tensor is split evenly along dim 0 (fused q, k, v)
Rule = tuple[re.Pattern, Target]

BACKBONE = "backbone."
PIXEL_DECODER = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."
VOID = "clip_adapter.non_object_embedding"

_BLOCK, _HF_BLOCK = r"layers\.(\d+)\.blocks\.(\d+)\.", r"model.encoder.layers.\1.blocks.\2."
_SWIN: list[tuple[str, Target]] = [  # original Swin (regex) → MaskFormerSwinBackbone
    (r"patch_embed\.proj\.(weight|bias)", r"model.embeddings.patch_embeddings.projection.\1"),
    (r"patch_embed\.norm\.(weight|bias)", r"model.embeddings.norm.\1"),
    (_BLOCK + r"norm1\.(weight|bias)", _HF_BLOCK + r"layernorm_before.\3"),
    (_BLOCK + r"attn\.qkv\.(weight|bias)",
     tuple(_HF_BLOCK + rf"attention.self.{n}.\3" for n in ("query", "key", "value"))),
    (_BLOCK + r"attn\.relative_position_bias_table", _HF_BLOCK + "attention.self.relative_position_bias_table"),
    (_BLOCK + r"attn\.proj\.(weight|bias)", _HF_BLOCK + r"attention.output.dense.\3"),
    (_BLOCK + r"norm2\.(weight|bias)", _HF_BLOCK + r"layernorm_after.\3"),
    (_BLOCK + r"mlp\.fc1\.(weight|bias)", _HF_BLOCK + r"intermediate.dense.\3"),
    (_BLOCK + r"mlp\.fc2\.(weight|bias)", _HF_BLOCK + r"output.dense.\3"),
    (r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.(?:weight|bias))", r"model.encoder.layers.\1.downsample.\2"),
    (r"norm(\d)\.(weight|bias)", r"hidden_states_norms.\1.\2"),  # detectron2's per-stage output norms
    (r"norm\.(weight|bias)", r"model.layernorm.\1"),  # the classification checkpoint's final norm
]
# Entries that carry no weight: Swin's window constants, and a BatchNorm's batch counter (a FrozenBN has none).
_CONSTANT = re.compile(r".*\.(relative_position_index|attn_mask|num_batches_tracked)")

_FROZEN_BN = r"(weight|bias|running_mean|running_var)"
_RESNET: list[tuple[str, Target]] = [  # detectron2's DeepLab ResNet → timm's ResNet in transformers' TimmBackbone
    (r"stem\.conv1\.weight", "_backbone.conv1.0.weight"),
    (r"stem\.conv1\.norm\." + _FROZEN_BN, r"_backbone.conv1.1.\1"),
    (r"stem\.conv2\.weight", "_backbone.conv1.3.weight"),
    (r"stem\.conv2\.norm\." + _FROZEN_BN, r"_backbone.conv1.4.\1"),
    (r"stem\.conv3\.weight", "_backbone.conv1.6.weight"),
    (r"stem\.conv3\.norm\." + _FROZEN_BN, r"_backbone.bn1.\1"),
]
_RESNET += [rule for k in (2, 3, 4, 5) for rule in (  # detectron2's res{k} is timm's layer{k-1}
    (rf"res{k}\.(\d+)\.conv([123])\.weight", rf"_backbone.layer{k - 1}.\1.conv\2.weight"),
    (rf"res{k}\.(\d+)\.conv([123])\.norm\." + _FROZEN_BN, rf"_backbone.layer{k - 1}.\1.bn\2.\3"),
    (rf"res{k}\.(\d+)\.shortcut\.weight", rf"_backbone.layer{k - 1}.\1.downsample.0.weight"),
    (rf"res{k}\.(\d+)\.shortcut\.norm\." + _FROZEN_BN, rf"_backbone.layer{k - 1}.\1.downsample.1.\2"))]
# timm's deep-stem ("S") ResNets by blocks per stage: their stem is detectron2's DeepLab stem (64, 64, 128).
RESNET_DEPTHS = {(3, 4, 6, 3): "resnet50s", (3, 4, 23, 3): "resnet101s", (3, 8, 36, 3): "resnet152s"}

_LAYER, _HF_LAYER = r"transformer\.decoder\.layers\.(\d+)\.", r"model.transformer_module.decoder.layers.\1."


def _attention(source: str, target: str) -> list[tuple[str, Target]]:
    return [(_LAYER + source + r"\.in_proj_(weight|bias)", tuple(_HF_LAYER + rf"{target}.{p}_proj.\2" for p in "qkv")),
            (_LAYER + source + r"\.out_proj\.(weight|bias)", _HF_LAYER + target + r".o_proj.\2")]


_PREDICTOR: list[tuple[str, Target]] = [
    (r"query_embed\.weight", "model.transformer_module.queries_embedder.weight"),
    (r"input_proj\.(weight|bias)", r"model.transformer_module.input_projection.\1"),
    *_attention("self_attn", "self_attn"),
    *_attention("multihead_attn", "encoder_attn"),
    (_LAYER + r"linear1\.(weight|bias)", _HF_LAYER + r"mlp.fc1.\2"),
    (_LAYER + r"linear2\.(weight|bias)", _HF_LAYER + r"mlp.fc2.\2"),
    (_LAYER + r"norm1\.(weight|bias)", _HF_LAYER + r"self_attn_layer_norm.\2"),
    (_LAYER + r"norm2\.(weight|bias)", _HF_LAYER + r"encoder_attn_layer_norm.\2"),
    (_LAYER + r"norm3\.(weight|bias)", _HF_LAYER + r"final_layer_norm.\2"),
    (r"transformer\.decoder\.norm\.(weight|bias)", r"model.transformer_module.decoder.layernorm.\1"),
    (r"mask_embed\.layers\.(\d+)\.(weight|bias)", r"mask_embedder.\1.0.\2"),
    (r"class_embed\.layers\.(\d+)\.(weight|bias)", r"class_predictor.projection.\1.0.\2"),
]

# Target entries the release does not provide: the vocabulary (a buffer), the loss's class weights, the
# window constants, and Swin's final LayerNorm (detectron2's Swin has none; MaskFormer never uses it).
_OWN = ("class_predictor.text_features", "criterion.", "relative_position_index", "encoder.model.layernorm.")


def _pixel_decoder(levels: int) -> list[tuple[str, Target]]:
    def conv_gn(source: str, target: str) -> list[tuple[str, Target]]:
        return [(source + r"\.weight", target + ".0.weight"), (source + r"\.norm\.(weight|bias)", target + r".1.\1")]

    rules = conv_gn(f"layer_{levels}", "fpn.stem")
    for k in range(1, levels):
        rules += conv_gn(f"adapter_{k}", f"fpn.layers.{levels - 1 - k}.proj")
        rules += conv_gn(f"layer_{k}", f"fpn.layers.{levels - 1 - k}.block")
    return rules + [(r"mask_features\.(weight|bias)", r"mask_projection.\1")]


def _compile(pairs: Sequence[tuple[str, Target]], source: str = "", target: str = "") -> list[Rule]:
    return [(re.compile(re.escape(source) + pattern),
             target + t if isinstance(t, str) else tuple(target + x for x in t)) for pattern, t in pairs]


def _rename(state: Mapping[str, Tensor], rules: Sequence[Rule]) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors renamed by the first rule matching the whole key, and the keys no rule takes."""
    renamed: dict[str, Tensor] = {}
    left: list[str] = []
    for key, value in state.items():
        for pattern, target in rules:
            match = pattern.fullmatch(key)
            if match:
                if isinstance(target, str):
                    renamed[match.expand(target)] = value
                else:
                    renamed.update(zip((match.expand(t) for t in target), value.chunk(len(target))))
                break
        else:
            left.append(key)
    return renamed, left


_SWIN_RULES = _compile(_SWIN)
_RESNET_RULES = _compile(_RESNET)


def original_swin_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A Swin state dict in Microsoft's / detectron2's layout under MaskFormerSwinBackbone's names; keys of
    other layouts are left out."""
    return _rename(state, _SWIN_RULES)[0]


def deeplab_resnet_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detectron2 ResNet state dict (`stem.*`, `res2..5.*`) under the `deeplab:` backbone's (TimmBackbone's)
    names; keys of other layouts are left out."""
    return _rename(state, _RESNET_RULES)[0]


def has_proposal_network(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith((BACKBONE, "sem_seg_head.")) for k in state)


def is_resnet_release(state: Mapping[str, Tensor]) -> bool:
    """Whether the release's backbone is detectron2's ResNet (the R101c release) rather than its Swin."""
    return any(k.startswith((BACKBONE + "stem.", BACKBONE + "res")) for k in state)


def release_preset(state: Mapping[str, Tensor]) -> str:
    """The preset a release's proposal network starts from (`release_net` then reads every size it can)."""
    return "paper-r101c-deeplab" if is_resnet_release(state) else "paper-swin-b"


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many modules `prefix{i}.` holds (1 + the highest i)."""
    found = [int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    if not found:
        raise KeyError(f"{prefix}0.*")
    return 1 + max(found)


def _head_sizes(state: Mapping[str, Tensor]) -> dict[str, int]:
    """The pixel decoder's and predictor's sizes, shared by both releases."""
    queries = state[PREDICTOR + "query_embed.weight"]
    return dict(
        num_queries=queries.shape[0], hidden_dim=queries.shape[1],
        decoder_layers=_count(state, PREDICTOR + "transformer.decoder.layers."),
        decoder_ffn_dim=state[PREDICTOR + "transformer.decoder.layers.0.linear1.weight"].shape[0],
        fpn_dim=state[PIXEL_DECODER + "mask_features.weight"].shape[0],
        embed_hidden_dim=state[PREDICTOR + "class_embed.layers.0.weight"].shape[0],
        embed_layers=_count(state, PREDICTOR + "class_embed.layers."))


def _resnet_backbone(path: Path, state: Mapping[str, Tensor]) -> str:
    """The `deeplab:` backbone holding a detectron2 ResNet release's tensors, or a DataError saying why none does."""
    depths = tuple(_count(state, f"{BACKBONE}res{k}.") for k in (2, 3, 4, 5))
    stem = tuple(None if (conv := state.get(f"{BACKBONE}stem.conv{i}.weight")) is None else tuple(conv.shape)
                 for i in (1, 2, 3))
    name = RESNET_DEPTHS.get(depths)
    if name is None or stem != ((64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)):
        raise DataError(path, f"its ResNet proposal network does not map: stem convs {stem} and {depths} blocks per "
                              f"stage, where only detectron2's DeepLab stem (3x3 convs 3 → 64 → 64 → 128) with "
                              f"{' or '.join(map(str, RESNET_DEPTHS))} blocks (timm's deep-stem ResNets) have a "
                              f"backbone here")
    return f"deeplab:{name}"


def release_net(path: Path, state: Mapping[str, Tensor], base: ProposalNetConfig) -> ProposalNetConfig:
    """`base` (the `release_preset` for the real releases) with every size the release's tensors fix: Swin's
    sizes, or the ResNet's depth (its `deeplab:` backbone), and the decoders'; the decoder's head count is not
    among them and stays `base`'s."""
    try:
        if is_resnet_release(state):
            return replace(base, backbone=_resnet_backbone(path, state), **_head_sizes(state))
        patch = state[BACKBONE + "patch_embed.proj.weight"]
        stages = _count(state, BACKBONE + "layers.")
        tables = [state[f"{BACKBONE}layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
        return replace(
            base, backbone="swin", patch_size=patch.shape[-1], embed_dim=patch.shape[0],
            depths=tuple(_count(state, f"{BACKBONE}layers.{i}.blocks.") for i in range(stages)),
            num_heads=tuple(t.shape[1] for t in tables), window_size=(math.isqrt(tables[0].shape[0]) + 1) // 2,
            **_head_sizes(state))
    except KeyError as e:
        kind = "ResNet (DeepLab)" if is_resnet_release(state) else "Swin"
        raise DataError(path, f"not ov-seg's {kind} proposal network: no {e}") from e


def load_release_proposals(model: OpenVocabMaskFormer, state: Mapping[str, Tensor], path: Path) -> None:
    """Load a release's proposal network (`backbone.*`, `sem_seg_head.*`, the non-object embedding) into
    `model` (built with `release_net`): every tensor of both must be accounted for, shapes equal, else one
    DataError naming the file and a few keys."""
    backbone = _SWIN if model.net.backbone == "swin" else _RESNET
    levels = len(model.model.pixel_level_module.decoder.fpn.layers) + 1
    rules = (_compile(backbone, BACKBONE, "model.pixel_level_module.encoder.")
             + _compile(_pixel_decoder(levels), PIXEL_DECODER, "model.pixel_level_module.decoder.")
             + _compile(_PREDICTOR, PREDICTOR))
    renamed, left = _rename(state, rules)
    if VOID in state:
        renamed["class_predictor.void_embedding"] = state[VOID].flatten()
    target = model.state_dict()
    problems = {
        "missing": [k for k in target if k not in renamed and not any(s in k for s in _OWN)],
        "unexpected": [k for k in left if k.startswith((BACKBONE, "sem_seg_head.")) and not _CONSTANT.fullmatch(k)]
                      + [k for k in renamed if k not in target],
        "of another shape": [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in renamed.items()
                             if k in target and v.shape != target[k].shape],
    }
    if any(problems.values()):
        raise DataError(path, "does not fit the proposal network: " + "; ".join(
            f"{len(keys)} tensors {what} (e.g. {keys[:3]})" for what, keys in problems.items() if keys))
    model.load_state_dict({**target, **renamed})


__all__ = ["deeplab_resnet_names", "has_proposal_network", "is_resnet_release", "load_release_proposals",
           "original_swin_names", "release_net", "release_preset"]
