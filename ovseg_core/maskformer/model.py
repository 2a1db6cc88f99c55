"""The proposal network: transformers' MaskFormer with an open-vocabulary (CLIP text) class head.

Everything but the class head is transformers' `MaskFormerForInstanceSegmentation` — backbone, pixel
decoder, transformer decoder, Hungarian matcher and losses. Its linear `class_predictor` is replaced
by `CosineClassHead`: query → MLP → CLIP embedding dim D, logits = logit_scale · cosine(query,
[text features; void]). The text features are frozen CLIP text embeddings of the vocabulary (a
buffer); the void ("no object") embedding is learnt. Column K (the last) is void, as the library's
loss expects (`MaskFormerLoss` uses num_labels + 1 classes, void last, weighted by `eos_coef`).

Presets (`preset_config`): `tiny` (the embedded world: 64 px, a small random-init Swin, trains on CPU
in minutes), `paper-swin-b` (Swin-B, 100 queries, crop 640), `paper-r101c` (timm's ResNet-101c — deep stem
32/32/64 — with frozen BatchNorm as in detectron2, crop 512) and `paper-r101c-deeplab` (the R101c of MaskFormer
and ov-seg: detectron2's DeepLab ResNet-101, deep stem 64/64/128 and multi-grid res5, as timm's `resnet101s`
with res5's dilations set after construction; the backbone that ov-seg's R101c release's weights fit,
`detectron2_weights`). Backbone weights come from a local file.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig, TimmBackboneConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.models.maskformer.configuration_maskformer import MaskFormerDetrConfig
from transformers.models.maskformer.modeling_maskformer import (
    MaskFormerLoss,
    MaskFormerModelOutput,
    MaskformerMLPPredictionHead,
)

from ..atomic import write_torch
from ..compute import autocast_off
from ..errors import DataError, MissingWeightsError
from .detectron2_weights import deeplab_resnet_names, original_swin_names

# ImageNet statistics in 0..255, the normalisation of MaskFormer's (and its backbones') training.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ProposalNetConfig:
    """Architecture of the proposal network (JSON-able; stored with every saved model)."""

    # "swin" (transformers' MaskFormer Swin), "timm:<name>" (e.g. timm:resnet101c) or "deeplab:<name>" (a timm
    # deep-stem ResNet, e.g. resnet101s, as detectron2's DeepLab ResNet: res5 dilated by RES5_MULTI_GRID)
    backbone: str
    crop_size: int  # training crop and default test-time short side
    # Swin backbone
    patch_size: int = 4
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    drop_path_rate: float = 0.3
    # transformer decoder (DETR-style, as in MaskFormer)
    num_queries: int = 100
    hidden_dim: int = 256
    decoder_layers: int = 6
    decoder_ffn_dim: int = 2048
    decoder_heads: int = 8
    dropout: float = 0.1
    # pixel decoder (FPN and mask feature width)
    fpn_dim: int = 256
    # open-vocabulary class head
    embed_hidden_dim: int = 1024
    embed_layers: int = 2
    logit_scale: float = 100.0
    # loss (MaskFormer's semantic recipe)
    deep_supervision: bool = True
    no_object_weight: float = 0.1
    mask_weight: float = 20.0
    dice_weight: float = 1.0
    cross_entropy_weight: float = 1.0
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    @property
    def size_divisibility(self) -> int:
        """The backbone's total stride: test-time inputs are padded to a multiple of it."""
        return self.patch_size * 2 ** (len(self.depths) - 1) if self.backbone == "swin" else 32

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProposalNetConfig":
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tuples})


PRESETS: dict[str, ProposalNetConfig] = {
    "tiny": ProposalNetConfig(
        backbone="swin", crop_size=64, patch_size=2, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
        window_size=4, drop_path_rate=0.0, num_queries=24, hidden_dim=64, decoder_layers=3, decoder_ffn_dim=128,
        decoder_heads=4, dropout=0.0, fpn_dim=64, embed_hidden_dim=128, embed_layers=2,
    ),
    "paper-swin-b": ProposalNetConfig(backbone="swin", crop_size=640),
    "paper-r101c": ProposalNetConfig(backbone="timm:resnet101c", crop_size=512),
    "paper-r101c-deeplab": ProposalNetConfig(backbone="deeplab:resnet101s", crop_size=512),
}

# detectron2's DeepLab ResNet as MaskFormer's and ov-seg's R101c configs build it (MODEL.RESNETS.RES5_MULTI_GRID
# [1, 2, 4], RES5_DILATION 1): res5 keeps its stride 2 and its blocks' 3x3 convs are dilated by 1, 2, 4.
RES5_MULTI_GRID = (1, 2, 4)


def preset_config(name: str, **overrides: Any) -> ProposalNetConfig:
    """A preset architecture, with any field overridden (e.g. num_queries=50)."""
    if name not in PRESETS:
        raise ValueError(f"unknown proposal network preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def maskformer_config(net: ProposalNetConfig, num_labels: int) -> MaskFormerConfig:
    """transformers' MaskFormerConfig for `net` with a K-class vocabulary."""
    if net.backbone == "swin":
        backbone = SwinConfig(
            image_size=net.crop_size, patch_size=net.patch_size, embed_dim=net.embed_dim, depths=list(net.depths),
            num_heads=list(net.num_heads), window_size=net.window_size, drop_path_rate=net.drop_path_rate,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
    elif net.backbone.startswith(("timm:", "deeplab:")):
        # detectron2 trains ImageNet-initialised ResNets with frozen BatchNorm; timm provides the deep stems
        # (deeplab: also the multi-grid res5, set by OpenVocabMaskFormer once built).
        backbone = TimmBackboneConfig(backbone=net.backbone.split(":", 1)[1], out_indices=[1, 2, 3, 4],
                                      freeze_batch_norm_2d=True)
    else:
        raise ValueError(f"unknown backbone {net.backbone!r} (use 'swin', 'timm:<model name>' or "
                         f"'deeplab:<timm ResNet name>')")
    decoder = MaskFormerDetrConfig(
        num_queries=net.num_queries, d_model=net.hidden_dim, decoder_layers=net.decoder_layers,
        decoder_ffn_dim=net.decoder_ffn_dim, decoder_attention_heads=net.decoder_heads, encoder_layers=0,
        dropout=net.dropout, use_timm_backbone=False,
    )
    return MaskFormerConfig(
        backbone_config=backbone, decoder_config=decoder, fpn_feature_size=net.fpn_dim,
        mask_feature_size=net.fpn_dim, num_labels=num_labels, use_auxiliary_loss=net.deep_supervision,
        no_object_weight=net.no_object_weight, mask_weight=net.mask_weight, dice_weight=net.dice_weight,
        cross_entropy_weight=net.cross_entropy_weight,
    )


def set_multi_grid(resnet: nn.Module, multi_grid: tuple[int, ...] = RES5_MULTI_GRID) -> None:
    """Dilate the 3x3 convs of a built timm ResNet's res5 (`layer4`) blocks by `multi_grid`, detectron2's
    DeepLab res5. Set on the built modules because timm cannot express it: its `output_stride` dilates whole
    stages and drops their stride, while detectron2 keeps res5's stride 2 (on the first block's 3x3 conv, as
    timm has it: ov-seg's STRIDE_IN_1X1 is False) and dilates block by block. Padding = dilation keeps the
    sizes; no weight changes."""
    blocks = list(resnet.layer4)
    if len(blocks) != len(multi_grid):
        raise ValueError(f"res5 has {len(blocks)} blocks, the multi-grid {multi_grid} {len(multi_grid)}")
    for block, dilation in zip(blocks, multi_grid):
        block.conv2.dilation = block.conv2.padding = (dilation, dilation)
        block.dilation = dilation


class CosineClassHead(nn.Module):
    """Query embedding → MLP → D; logits = scale · cos(query, [text_1..text_K, void]), void last."""

    def __init__(self, hidden_dim: int, embed_hidden_dim: int, num_layers: int, text_features: Tensor,
                 logit_scale: float):
        super().__init__()
        dim = text_features.shape[1]
        self.projection = MaskformerMLPPredictionHead(hidden_dim, embed_hidden_dim, dim, num_layers)
        self.void_embedding = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.logit_scale = logit_scale
        self.register_buffer("text_features", torch.empty(0, dim))
        self.set_text_features(text_features)

    @property
    def num_classes(self) -> int:
        return self.text_features.shape[0]

    def set_text_features(self, text_features: Tensor) -> None:
        if text_features.ndim != 2 or text_features.shape[1] != self.void_embedding.shape[0]:
            raise ValueError(
                f"text features must be [K, {self.void_embedding.shape[0]}], got {tuple(text_features.shape)}")
        self.text_features = F.normalize(text_features.detach().float(), dim=-1).to(self.void_embedding.device)

    def forward(self, queries: Tensor) -> Tensor:
        """queries [..., hidden] → logits [..., K + 1]."""
        embeddings = self.projection(queries)
        with autocast_off(embeddings.device):  # bf16 cosines ×100 would be off by up to ~0.3
            embeddings = F.normalize(embeddings.float(), dim=-1)
            classes = torch.cat([self.text_features, F.normalize(self.void_embedding, dim=0)[None]], dim=0)
            return self.logit_scale * embeddings @ classes.T


class OpenVocabMaskFormer(MaskFormerForInstanceSegmentation):
    """MaskFormer whose classifier is `CosineClassHead`; `set_vocabulary` changes the classes."""

    def __init__(self, net: ProposalNetConfig, text_features: Tensor):
        super().__init__(maskformer_config(net, num_labels=text_features.shape[0]))
        self.net = net
        self.class_predictor = CosineClassHead(net.hidden_dim, net.embed_hidden_dim, net.embed_layers,
                                               text_features, net.logit_scale)
        self._init_weights(self.class_predictor.projection)  # the library's init for its MLP heads (xavier)
        self._init_decoder_like_detr()
        if net.backbone.startswith("deeplab:"):
            set_multi_grid(self.model.pixel_level_module.encoder._backbone)
        swin = getattr(self.model.pixel_level_module.encoder, "model", None)
        if swin is not None and hasattr(swin, "layernorm"):
            # Swin's final LayerNorm feeds no feature map MaskFormer uses; frozen so that every trainable
            # parameter gets a gradient (DDP then needs no unused-parameter search).
            swin.layernorm.requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(net.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(net.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.loss_components: dict[str, Tensor] = {}  # the last training loss, by term (see get_loss)

    @torch.no_grad()
    def _init_decoder_like_detr(self) -> None:
        """MaskFormer's (DETR's) init: xavier-uniform decoder weights, N(0, 1) query embeddings. The library
        draws both from N(0, 0.02); its queries then start nearly identical with near-uniform attention,
        and small models trained from scratch stay collapsed (every query the same mask) for long."""
        transformer = self.model.transformer_module
        for p in transformer.decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(transformer.queries_embedder.weight)

    @property
    def num_classes(self) -> int:
        return self.class_predictor.num_classes

    def set_vocabulary(self, text_features: Tensor) -> None:
        """Classify into these K classes from now on (K may change); rebuilds the library's loss for K."""
        self.class_predictor.set_text_features(text_features)
        if self.criterion.num_labels != self.num_classes:
            self.criterion = MaskFormerLoss(self.num_classes, matcher=self.matcher, weight_dict=self.weight_dict,
                                            eos_coef=self.net.no_object_weight).to(self.pixel_mean.device)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or 0..255 float) images [B, 3, H, W] → the backbone's normalised input."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, pixel_values: Tensor, mask_labels: list[Tensor] | None = None,
                class_labels: list[Tensor] | None = None, **kwargs: Any):
        # The library only fills the decoder's per-layer states (needed for deep supervision) when
        # hidden states are requested; it drops them from its output again otherwise. Inference needs
        # the last layer only.
        kwargs.setdefault("output_hidden_states", self.config.use_auxiliary_loss and self.training)
        return super().forward(pixel_values, mask_labels=mask_labels, class_labels=class_labels, **kwargs)

    def get_logits(self, outputs: MaskFormerModelOutput) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
        """Class and mask logits of the last decoder layer, plus those of every earlier layer for deep
        supervision. Overridden because the library's version stacks the decoder's input (all zeros) as a
        layer and skips the decoder's final LayerNorm, which MaskFormer applies to every layer's output."""
        pixel_embeddings = outputs.pixel_decoder_last_hidden_state
        states = [outputs.transformer_decoder_last_hidden_state]
        if self.config.use_auxiliary_loss and outputs.transformer_decoder_hidden_states is not None:
            norm = self.model.transformer_module.decoder.layernorm
            states = [norm(h) for h in outputs.transformer_decoder_hidden_states[1:-1]] + states
        classes = [self.class_predictor(s) for s in states]
        masks = [torch.einsum("bqc,bchw->bqhw", self.mask_embedder(s), pixel_embeddings) for s in states]
        auxiliary = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], classes[:-1])]
        return classes[-1], masks[-1], auxiliary

    def get_loss_dict(self, masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: list[Tensor],
                      class_labels: list[Tensor], auxiliary_logits: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        # The matching and the losses in fp32, also under bf16 autocast: the Hungarian costs and the
        # focal / dice sums are where bf16's 8-bit mantissa would show.
        def fp32(logits: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.float() for k, v in logits.items()}

        with autocast_off(masks_queries_logits.device):
            return super().get_loss_dict(masks_queries_logits.float(), class_queries_logits.float(), mask_labels,
                                         class_labels, [fp32(a) for a in auxiliary_logits or []])

    def get_loss(self, loss_dict: dict[str, Tensor]) -> Tensor:
        # Keep the weighted components (the library returns only their sum) for the training log.
        self.loss_components = {k: v.detach() for k, v in loss_dict.items()}
        return super().get_loss(loss_dict)

    def backbone_parameter_names(self) -> set[str]:
        encoder = self.model.pixel_level_module.encoder
        return {f"model.pixel_level_module.encoder.{n}" for n, _ in encoder.named_parameters()}


def build_model(net: ProposalNetConfig, text_features: Tensor, backbone_weights: str | Path | None = None
                ) -> OpenVocabMaskFormer:
    """A random-init proposal network for `text_features` [K, D]; the backbone from `backbone_weights`
    (a local state-dict file) when given."""
    model = OpenVocabMaskFormer(net, text_features)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
    return model


# Backbone entries a checkpoint need not hold: the norm MaskFormer adds after each Swin stage (new weights
# unless a detectron2 checkpoint brings them), Swin's relative position indices (constants of the window
# size) and its final LayerNorm (no feature map MaskFormer uses comes out of it; detectron2's Swin has none).
_NOT_REQUIRED = ("hidden_states_norms.", "relative_position_index", "model.layernorm.")
_PREFIXES = ("model.", "swin.", "resnet.", "backbone.", "module.", "encoder.")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any decoding failure is a bad file
        raise DataError(path, f"cannot read weights: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(path, "not a state dict of tensors")
    return state


def _legacy_swin_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename transformers-5 Swin keys (attention.q_proj, mlp.fc1, ...) to the names MaskFormer's Swin still
    uses (attention.self.query, intermediate.dense, ...), by reversing transformers' own Swin key mapping."""
    reverse = [t.reverse_transform() for t in get_checkpoint_conversion_mapping("swin")]
    renamed = {}
    for key, value in state.items():
        for transform in reverse:
            key, hit = transform.rename_source_key(key)
            if hit:
                break
        renamed[key] = value
    return renamed


def load_backbone_weights(model: OpenVocabMaskFormer, path: str | Path) -> None:
    """Load a backbone state dict (e.g. an ImageNet classification checkpoint saved from transformers or
    timm) into the proposal network's backbone. Key prefixes such as 'swin.' / 'model.' / 'backbone.' and
    the Swin key layouts (the hub files', transformers 5's, and Microsoft's original one, which detectron2's
    Swin shares: `detectron2_weights`) and detectron2's ResNet layout (`stem.*`, `res2..5.*`, for `deeplab:`
    backbones) are matched automatically. Every backbone weight except those in
    `_NOT_REQUIRED` must be present; those are loaded too when the file has them."""
    path = Path(path)
    backbone = model.model.pixel_level_module.encoder
    if not path.is_file():
        raise MissingWeightsError(
            f"backbone weights {path} not found: put a state dict of the {model.net.backbone} backbone there "
            f"(.pt/.pth/.bin via torch.save, or .safetensors; e.g. the ImageNet-21K Swin-B / ImageNet-1K "
            f"ResNet-101c checkpoint), or leave the path unset for random initialisation")
    state = _read_state_dict(path)
    target = backbone.state_dict()
    candidates = []
    for strip in ("", *_PREFIXES):
        stripped = {k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}
        candidates.append(original_swin_names(stripped))  # already the backbone's own names
        candidates.append(deeplab_resnet_names(stripped))
        for source in (stripped, _legacy_swin_names(stripped)):
            candidates += [{add + k: v for k, v in source.items()} for add in ("", "model.", "_backbone.")]
    best = max(candidates, key=lambda c: len(c.keys() & target.keys()))
    required = [k for k in target if not any(p in k for p in _NOT_REQUIRED)]
    missing = [k for k in required if k not in best]
    if missing:
        raise DataError(path, f"{len(missing)} of {len(required)} backbone weights missing "
                              f"(e.g. {missing[:3]}); is this a {model.net.backbone} checkpoint?")
    present = [k for k in target if k in best]
    wrong = [f"{k}: {tuple(best[k].shape)} vs {tuple(target[k].shape)}" for k in present
             if best[k].shape != target[k].shape]
    if wrong:
        raise DataError(path, f"backbone weight shapes differ from the {model.net.backbone} config: {wrong[:3]}")
    backbone.load_state_dict({k: best[k] for k in present}, strict=False)


MODEL_FORMAT = "ovseg-proposal-net/1"


def save_model(path: str | Path, model: OpenVocabMaskFormer, meta: dict[str, Any] | None = None) -> Path:
    """Write the architecture, weights (with the training vocabulary's text features) and `meta`
    (e.g. the class names) to one file, atomically."""
    model = getattr(model, "module", model)
    payload = {"format": MODEL_FORMAT, "net": asdict(model.net), "meta": meta or {},
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    write_torch(path, payload)
    return Path(path)


def _read_saved(path: Path, mmap: bool) -> dict[str, Any]:
    """The payload `save_model` wrote (memory-mapped: tensors are read only when touched), checked by format."""
    if not path.is_file():
        raise MissingWeightsError(f"proposal network {path} not found: train it first (the MaskFormer stage)")
    try:
        payload = torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
        if payload.get("format") != MODEL_FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, expected {MODEL_FORMAT!r}")
    except (OSError, RuntimeError, ValueError, AttributeError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(path, f"not a proposal network saved by save_model: {e}") from e
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[OpenVocabMaskFormer, dict[str, Any]]:
    """Rebuild a model written by `save_model`; returns (model in eval mode, meta)."""
    path = Path(path)
    payload = _read_saved(path, mmap=False)
    try:
        net = ProposalNetConfig.from_dict(payload["net"])
        state = payload["state_dict"]
        model = OpenVocabMaskFormer(net, state["class_predictor.text_features"])
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(path, f"not a proposal network saved by save_model: {e}") from e
    return model.to(device).eval(), payload["meta"]


def read_meta(path: str | Path) -> dict[str, Any]:
    """The `meta` of a model written by `save_model` (e.g. its training classes), without building the model:
    the file is memory-mapped, so its weights are not read."""
    try:
        return dict(_read_saved(Path(path), mmap=True)["meta"])
    except (KeyError, TypeError) as e:
        raise DataError(Path(path), f"not a proposal network saved by save_model: {e}") from e


def fingerprint(net: ProposalNetConfig, text_features: Tensor) -> str:
    """A short hash of an architecture and vocabulary (used to refuse resuming an unrelated run)."""
    h = hashlib.sha256(repr(sorted(asdict(net).items())).encode())
    h.update(F.normalize(text_features.detach().float().cpu(), dim=-1).numpy().tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "CosineClassHead", "OpenVocabMaskFormer", "ProposalNetConfig", "PRESETS", "build_model", "fingerprint",
    "load_backbone_weights", "load_model", "maskformer_config", "preset_config", "save_model", "set_multi_grid",
]
