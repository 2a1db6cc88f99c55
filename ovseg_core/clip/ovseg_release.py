"""OVSeg's released checkpoints (`ovseg_swinbase_vitL14_ft_mpt.pth`, `ovseg_R101c_vitB16_ft_mpt.pth`): their
adapted CLIP as one of the project's adapted-CLIP directories (`ovseg_core.clip.adapted`).

A released file is a detectron2 checkpoint, `{"model": state dict, ...}`. ov-seg's `OVSeg` model keeps its
`MaskFormerClipAdapter` as `clip_adapter`, whose `clip_model` is OpenAI's CLIP (ov-seg's copy of the `clip`
package) with the mask prompts as `visual.mask_embedding` [depth, grid², width] (ov-seg's
`tools/ovseg_replace_clip.py` writes fine-tuned weights there under `clip_adapter.clip_model.`). OpenAI's
layout is open_clip's CLIP layout (`export.openai_state_dict`), so the CLIP loads strictly into open_clip's
QuickGELU architecture. Not mapped: `clip_adapter.non_object_embedding` (ov-seg's void text embedding; the
project's void belongs to its proposal network) and the proposal network itself (`backbone.*`,
`sem_seg_head.*`: detectron2's Swin-B / ResNet-101c MaskFormer).
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from ..errors import DataError
from .adapted import write_adapted
from .models import load_clip, save_clip
from .mpt import MaskPrompts, save_prompts

CLIP_PREFIX = "clip_adapter.clip_model."
PROMPTS_KEY = "visual.mask_embedding"
ARCHS = ("ViT-L-14-quickgelu", "ViT-B-16-quickgelu")  # the CLIPs of ov-seg's two releases


def read_release(path: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The CLIP state dict (OpenAI layout) and the mask prompts (or None) of a released checkpoint."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DataError(path, "OVSeg checkpoint not found") from e
    except Exception as e:  # noqa: BLE001 - any unreadable file is a data error naming the file
        raise DataError(path, f"not a readable checkpoint ({type(e).__name__}: {e})") from e
    model = payload.get("model", payload) if isinstance(payload, dict) else {}
    clip = {k[len(CLIP_PREFIX):]: v for k, v in model.items() if k.startswith(CLIP_PREFIX)}
    if not clip:
        raise DataError(path, f"no OVSeg CLIP in it (no keys {CLIP_PREFIX}* under 'model')")
    return clip, clip.pop(PROMPTS_KEY, None)


def release_arch(path: Path, clip: dict[str, torch.Tensor]) -> str:
    """Which of ov-seg's CLIPs the state dict holds, by its patch embedding."""
    conv = clip.get("visual.conv1.weight")
    for arch in ARCHS:
        vision = open_clip.get_model_config(arch)["vision_cfg"]
        if conv is not None and tuple(conv.shape) == (vision["width"], 3, vision["patch_size"], vision["patch_size"]):
            return arch
    shape = None if conv is None else tuple(conv.shape)
    raise DataError(path, f"{CLIP_PREFIX}visual.conv1.weight of shape {shape} is neither of ov-seg's CLIPs {ARCHS}")


def import_release(path: str | Path, out: str | Path, name: str = "ovseg") -> Path:
    """Write the adapted-CLIP directory `out` (clip.pt, prompts.pt, adapted.json) from a released checkpoint."""
    path, out = Path(path), Path(out)
    clip, prompts = read_release(path)
    arch = release_arch(path, clip)
    bundle = load_clip(arch)
    result = bundle.model.load_state_dict(clip, strict=False)  # fp16 matrices are copied into fp32 parameters
    if result.missing_keys or result.unexpected_keys:
        raise DataError(path, f"does not hold ov-seg's {arch} CLIP: missing {sorted(result.missing_keys)}, "
                              f"unexpected {sorted(result.unexpected_keys)} (under {CLIP_PREFIX})")
    prompts_file = None
    if prompts is not None:
        mask_prompts = MaskPrompts.for_visual(bundle.model.visual, depth=prompts.shape[0])
        if mask_prompts.mask_embedding.shape != prompts.shape:
            raise DataError(path, f"{CLIP_PREFIX}{PROMPTS_KEY} has shape {tuple(prompts.shape)}, not "
                                  f"{tuple(mask_prompts.mask_embedding.shape)} as {arch} needs")
        with torch.no_grad():
            mask_prompts.mask_embedding.copy_(prompts)
        prompts_file = save_prompts(mask_prompts, out / "prompts.pt", arch)
    weights = save_clip(bundle, out / "clip.pt")
    return write_adapted(out, name, arch, weights, prompts_file)
