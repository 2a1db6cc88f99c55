"""Mask prompt tuning (paper §3.3): learnable tokens replace the background patch tokens of a masked crop.

`MaskPrompts` holds only the prompts (`mask_embedding`, [depth, grid², width]); they are saved and
loaded apart from CLIP's weights and fit any CLIP of the same vision architecture (the original or
a fine-tuned one). `MaskPromptedViT` runs open_clip's own `VisionTransformer` submodules — no weight
copies — with the prompts inserted:

* patch mask m = ceil(avgpool(mask, patch)): a patch is background only if no pixel of it is masked in;
* patch tokens become x·m + P[0]·(1−m) before the class token is prepended and positions are added;
* after block i, for i + 1 < depth, background patch tokens are replaced by P[i+1]; CLS never is.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..atomic import write_torch
from ..errors import DataError
from .models import ClipBundle


class MaskPrompts(nn.Module):
    def __init__(self, depth: int, num_patches: int, width: int, init_std: float = 0.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"prompt depth must be >= 1, got {depth}")
        self.mask_embedding = nn.Parameter(torch.zeros(depth, num_patches, width))
        if init_std > 0:
            nn.init.normal_(self.mask_embedding, std=init_std)

    @classmethod
    def for_visual(cls, visual: nn.Module, depth: int, init_std: float = 0.0) -> "MaskPrompts":
        _check_visual(visual)
        layers = len(visual.transformer.resblocks)
        if depth > layers:
            raise ValueError(f"prompt depth {depth} exceeds the vision transformer's {layers} layers")
        grid = visual.grid_size[0] * visual.grid_size[1]
        return cls(depth, grid, visual.transformer.width, init_std).to(visual.conv1.weight.device)

    @property
    def depth(self) -> int:
        return self.mask_embedding.shape[0]


def _check_visual(visual: nn.Module) -> None:
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"mask prompt tuning needs open_clip's VisionTransformer, got {type(visual).__name__}")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise ValueError("mask prompt tuning needs every patch token in place: disable patch dropout")


def patch_mask(masks: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] masks → [B, grid_h·grid_w] in {0, 1}; 1 where any pixel of the patch is in the mask."""
    pooled = F.avg_pool2d(masks[:, None].float(), kernel_size=patch_size, stride=patch_size)
    return torch.ceil(pooled).flatten(1)


class MaskPromptedViT(nn.Module):
    """open_clip's VisionTransformer forward with mask prompts; returns projected (unnormalised) features."""

    def __init__(self, visual: VisionTransformer, prompts: MaskPrompts):
        super().__init__()
        _check_visual(visual)
        grid = visual.grid_size[0] * visual.grid_size[1]
        expected = (grid, visual.transformer.width)
        if tuple(prompts.mask_embedding.shape[1:]) != expected:
            shape = tuple(prompts.mask_embedding.shape)
            raise ValueError(f"prompts of shape {shape} do not fit this ViT ([depth, {grid}, {expected[1]}])")
        if prompts.depth > len(visual.transformer.resblocks):
            raise ValueError(f"prompt depth {prompts.depth} exceeds {len(visual.transformer.resblocks)} layers")
        self.visual = visual
        self.prompts = prompts

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One transformer block on batch-first tokens (`_frozen_block` where gradients flow through it)."""
        training = torch.is_grad_enabled() and type(block) is ResidualAttentionBlock
        run = functools.partial(_frozen_block, block) if training else block
        transformer = self.visual.transformer
        if not transformer.batch_first and run is block:
            x = x.transpose(0, 1)
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(run, x, use_reentrant=False)
        else:
            x = run(x)
        return x if transformer.batch_first or run is not block else x.transpose(0, 1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        if masks.shape[0] != images.shape[0] or masks.shape[1:] != images.shape[2:]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        x = visual.conv1(images)  # [B, width, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [B, grid², width]
        keep = patch_mask(masks, visual.patch_size).to(x.dtype).unsqueeze(-1)  # [B, grid², 1]
        prompts = self.prompts.mask_embedding.to(x.dtype)
        x = x * keep + prompts[0] * (1 - keep)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            x = self._block(block, x)
            if i + 1 < self.prompts.depth:
                patches = x[:, 1:] * keep + prompts[i + 1] * (1 - keep)
                x = torch.cat([x[:, :1], patches], dim=1)
        pooled, _ = visual._pool(x)  # open_clip's own pooling (ln_post, token/avg/attentional pool)
        return pooled @ visual.proj if visual.proj is not None else pooled


def _frozen_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """open_clip's `ResidualAttentionBlock.forward` on batch-first tokens `x` (no attention mask), with the
    attention's input projection applied to the tokens as they lie in memory.

    Why not `block(x)`: `nn.MultiheadAttention` transposes its input to sequence-first before projecting,
    and when the input requires grad while the weights do not (mask prompt tuning: gradients flow through
    a frozen CLIP to the prompts), torch's matmul does not fold that transposed [L, B, E] input into a
    matrix but multiplies it by the weight expanded, and copied, once per token position: 27 s instead of
    2 s per ViT-L/14 sample on the CPU (measured 2026-12-02), and a 1.6 GB copy per layer on a GPU.
    """
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, E] → [B, H, L, E / H]
        return t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).flatten(2)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def encode_masked(
    bundle: ClipBundle,
    crops: torch.Tensor,
    masks: torch.Tensor | None = None,
    prompts: MaskPrompts | None = None,
) -> torch.Tensor:
    """L2-normalised fp32 image features of masked crops; with prompts, background patches get mask prompts.

    The single image-encoding entry point for mining, evaluation and training (gradients flow; wrap in
    torch.no_grad() where none are wanted). The forward pass runs in the caller's autocast precision;
    the features are normalised in fp32, so their norms are 1 to fp32 accuracy.
    """
    if crops.shape[-2:] != (bundle.image_size, bundle.image_size):
        size = bundle.image_size
        raise ValueError(f"crops must be {size}x{size} for {bundle.arch}, got {tuple(crops.shape)}")
    if prompts is None:
        features = bundle.model.encode_image(crops)
    elif masks is None:
        raise ValueError("encode_masked: mask prompts need the crops' masks")
    else:
        features = MaskPromptedViT(bundle.model.visual, prompts)(crops, masks)
    return F.normalize(features.float(), dim=-1)


def save_prompts(prompts: MaskPrompts, path: str | Path, arch: str | None = None) -> Path:
    """Write the prompts alone (not CLIP's weights), atomically."""
    path = Path(path)
    payload = {"mask_embedding": prompts.mask_embedding.detach().cpu(), "arch": arch}
    write_torch(path, payload)
    return path


def load_prompts(path: str | Path, device: str | torch.device = "cpu") -> MaskPrompts:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "mask prompt file not found")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        embedding = payload["mask_embedding"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is a data error naming the file
        raise DataError(path, f"not a mask prompt file ({type(e).__name__}: {e})") from e
    if embedding.ndim != 3 or math.prod(embedding.shape) == 0:
        raise DataError(path, f"mask_embedding must be [depth, grid², width], got {tuple(embedding.shape)}")
    prompts = MaskPrompts(*embedding.shape).to(device)
    with torch.no_grad():
        prompts.mask_embedding.copy_(embedding)
    return prompts
