"""OVSeg's released checkpoints (`ovseg_swinbase_vitL14_ft_mpt.pth`, `ovseg_R101c_vitB16_ft_mpt.pth`): their
adapted CLIP as one of the project's adapted-CLIP directories (`ovseg_core.clip.adapted`) and, on request, the
release's proposal network as a project proposal-network file (`maskformer.model.save_model`).

A released file is a detectron2 checkpoint, `{"model": state dict, ...}`. ov-seg's `OVSeg` model keeps its
`MaskFormerClipAdapter` as `clip_adapter`, whose `clip_model` is OpenAI's CLIP (ov-seg's copy of the `clip`
package) with the mask prompts as `visual.mask_embedding` [depth, grid², width] (ov-seg's
`tools/ovseg_replace_clip.py` writes fine-tuned weights there under `clip_adapter.clip_model.`). OpenAI's
layout is open_clip's CLIP layout (`export.openai_state_dict`), so the CLIP loads strictly into open_clip's
QuickGELU architecture.

The proposal network (`backbone.*`: detectron2's Swin, or in the ResNet-101c release detectron2's DeepLab
ResNet-101; `sem_seg_head.*`: MaskFormer's pixel decoder and ov-seg's transformer predictor;
`clip_adapter.non_object_embedding`: the void class) maps onto the project's transformers MaskFormer by
`maskformer.detectron2_weights`, sized from the tensors (the `paper-swin-b` / `paper-r101c-deeplab` preset for
the real releases). Its vocabulary's text features come from the release's own CLIP, as in ov-seg's
inference. A proposal network of another layout is a DataError saying what does not map.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import open_clip
import torch

from ..errors import DataError
from ..maskformer.detectron2_weights import has_proposal_network, load_release_proposals, release_net, release_preset
from ..maskformer.model import OpenVocabMaskFormer, preset_config, save_model
from .adapted import write_adapted
from .models import load_clip, save_clip
from .mpt import MaskPrompts, save_prompts
from .text import text_features

CLIP_PREFIX = "clip_adapter.clip_model."
PROMPTS_KEY = "visual.mask_embedding"
ARCHS = ("ViT-L-14-quickgelu", "ViT-B-16-quickgelu")  # the CLIPs of ov-seg's two releases


def read_release(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a released checkpoint (detectron2's `{"model": ...}`)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DataError(path, "OVSeg checkpoint not found") from e
    except Exception as e:  # noqa: BLE001 - any unreadable file is a data error naming the file
        raise DataError(path, f"not a readable checkpoint ({type(e).__name__}: {e})") from e
    return payload.get("model", payload) if isinstance(payload, dict) else {}


def release_clip(path: Path, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The CLIP state dict (OpenAI layout) and the mask prompts (or None) of a release's state dict."""
    clip = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
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


def import_release(path: str | Path, out: str | Path, name: str = "ovseg", proposals_out: str | Path | None = None,
                   classes: Sequence[str] | None = None) -> tuple[Path, Path | None]:
    """Write the adapted-CLIP directory `out` (clip.pt, prompts.pt, adapted.json) from a released checkpoint and,
    given `proposals_out`, its proposal network there, with the text features of `classes` (default: the
    release's training classes, COCO-Stuff's 171) from the release's CLIP. Everything is checked before
    anything is written. Returns adapted.json and the proposal network file (None: none written, also when
    the checkpoint holds no proposal network)."""
    path, out = Path(path), Path(out)
    state = read_release(path)
    clip, prompts = release_clip(path, state)
    arch = release_arch(path, clip)
    bundle = load_clip(arch)
    result = bundle.model.load_state_dict(clip, strict=False)  # fp16 matrices are copied into fp32 parameters
    if result.missing_keys or result.unexpected_keys:
        raise DataError(path, f"does not hold ov-seg's {arch} CLIP: missing {sorted(result.missing_keys)}, "
                              f"unexpected {sorted(result.unexpected_keys)} (under {CLIP_PREFIX})")
    mask_prompts = None
    if prompts is not None:
        mask_prompts = MaskPrompts.for_visual(bundle.model.visual, depth=prompts.shape[0])
        if mask_prompts.mask_embedding.shape != prompts.shape:
            raise DataError(path, f"{CLIP_PREFIX}{PROMPTS_KEY} has shape {tuple(prompts.shape)}, not "
                                  f"{tuple(mask_prompts.mask_embedding.shape)} as {arch} needs")
        with torch.no_grad():
            mask_prompts.mask_embedding.copy_(prompts)
    proposals = None
    if proposals_out is not None and has_proposal_network(state):
        if classes is None:
            from ..datasets.coco_stuff import png_classes  # imported here: pycocotools is slow to load

            classes = png_classes().names
        net = release_net(path, state, preset_config(release_preset(state)))
        proposals = OpenVocabMaskFormer(net, text_features(bundle, classes)).eval()
        load_release_proposals(proposals, state, path)
    prompts_file = None if mask_prompts is None else save_prompts(mask_prompts, out / "prompts.pt", arch)
    adapted = write_adapted(out, name, arch, save_clip(bundle, out / "clip.pt"), prompts_file)
    if proposals is None:
        return adapted, None
    return adapted, save_model(proposals_out, proposals, meta={"classes": list(classes), "clip": str(out),
                                                               "imported_from": str(path)})
