"""Take an adapted CLIP out of the project: files that open_clip (and OpenAI's `clip` package) load as they are.

`export_adapted(src, out)` writes, for an adapted-CLIP directory (`ovseg_core.clip.adapted`) or a plain
CLIP checkpoint:

    <out>/open_clip_model.safetensors   the CLIP weights (FT's where the variant fine-tuned them) in open_clip's
                                        layout: `open_clip.create_model_and_transforms(arch, pretrained=<file>)`
    <out>/open_clip_config.json         architecture and preprocessing as open_clip's hub files hold them, so
                                        that `model_name="local-dir:<out>"` needs nothing else (no registered
                                        architecture): also `python -m open_clip_train.main --model local-dir:<out>`
    <out>/openai_clip.pt                the same weights in OpenAI's state-dict layout (only for architectures
                                        OpenAI's layout can describe: ViT-B/16, ViT-L/14, ... with QuickGELU)
    <out>/prompts.pt                    the mask prompts, where the variant has them (MPT, FT→MPT)
    <out>/export.json                   architecture, QuickGELU, preprocessing, files and the calls that load them

Using the mask prompts outside the project: `prompts.pt` is `{"mask_embedding": [depth, grid², width], "arch"}`
(`torch.load(..., weights_only=True)`). `ovseg_core.clip.mpt.MaskPromptedViT` applies them to open_clip's own
`VisionTransformer` (it only reads its submodules)::

    import open_clip, torch
    from ovseg_core.clip.mpt import MaskPromptedViT, load_prompts
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained="open_clip_model.safetensors")
    prompted = MaskPromptedViT(model.visual, load_prompts("prompts.pt")).eval()
    features = prompted(crops, masks)   # crops [B, 3, S, S] normalised, background 0; masks [B, S, S] bool

What it does, for porting: patch tokens x become x·m + P[0]·(1−m), m = ceil(avgpool(mask, patch)) per
patch, before the class token and positions; after block i (i + 1 < depth) the background patch tokens
are replaced by P[i+1]; pooling and projection are open_clip's.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME
from open_clip.model import build_model_from_openai_state_dict, convert_weights_to_fp16
from safetensors.torch import save_file

from ..atomic import atomic_dir, write_json
from .adapted import load_adapted
from .models import _PREPROCESS_KEYS, ClipBundle, checkpoint_metadata
from .mpt import save_prompts

OPEN_CLIP_FILE = HF_SAFE_WEIGHTS_NAME  # "open_clip_model.safetensors", the name open_clip's hub files use
OPENAI_FILE = "openai_clip.pt"
PROMPTS_FILE = "prompts.pt"
EXPORT_FILE = "export.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # the name open_clip's "local-dir:" and "hf-hub:" schemas read


def open_clip_state_dict(bundle: ClipBundle) -> dict[str, torch.Tensor]:
    """The model's state dict as safetensors stores it (contiguous fp32 CPU tensors, no shared storage)."""
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in bundle.model.state_dict().items()}


def openai_incompatibility(bundle: ClipBundle) -> str | None:
    """Why OpenAI's state-dict layout cannot describe this model, or None when it can.

    The layout holds only tensors: open_clip's `build_model_from_openai_state_dict` (like OpenAI's own
    `clip.model.build_model`) infers the rest, with QuickGELU and 64-dimensional attention heads. The
    model is rebuilt that way on the meta device (no memory, no compute) and compared with ours."""
    model = bundle.model
    if not isinstance(model, open_clip.CLIP):
        return f"{bundle.arch} is a {type(model).__name__}, not a CLIP with OpenAI's text tower"
    if not bundle.quick_gelu:
        return f"{bundle.arch} runs GELU; OpenAI's layout implies QuickGELU (export an OpenAI-initialised model)"
    state = {k: v.to("meta") for k, v in model.state_dict().items()}
    try:
        with torch.device("meta"):
            rebuilt = build_model_from_openai_state_dict(state)
    except (KeyError, RuntimeError, AssertionError) as e:
        return f"open_clip cannot rebuild {bundle.arch} from OpenAI's layout ({type(e).__name__}: {e})"
    ours, theirs = _attention_heads(model), _attention_heads(rebuilt)
    if ours != theirs:
        return f"{bundle.arch} has {ours} attention heads per block, OpenAI's layout implies {theirs}"
    return None


def _attention_heads(model: torch.nn.Module) -> list[int]:
    return [m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]


def openai_state_dict(bundle: ClipBundle) -> dict[str, torch.Tensor]:
    """OpenAI's layout: open_clip's CLIP keys are OpenAI's (`build_model_from_openai_state_dict` loads them
    strictly), with the weights OpenAI stores in fp16 cast by open_clip's own `convert_weights_to_fp16` —
    both loaders cast them to fp16 anyway."""
    reason = openai_incompatibility(bundle)
    if reason:
        raise ValueError(reason)
    model = copy.deepcopy(bundle.model).cpu()
    convert_weights_to_fp16(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_call(arch: str, quick_gelu: bool, preprocess: dict[str, Any]) -> str:
    """The open_clip call that rebuilds the exported model with the project's preprocessing."""
    extra = ", force_quick_gelu=True" if quick_gelu else ""
    return (f"open_clip.create_model_and_transforms({arch!r}, pretrained='{OPEN_CLIP_FILE}'{extra}, "
            f"image_mean={tuple(preprocess['mean'])}, image_std={tuple(preprocess['std'])}, "
            f"image_interpolation={preprocess['interpolation']!r}, image_resize_mode={preprocess['resize_mode']!r})")


def open_clip_config(bundle: ClipBundle, preprocess: dict[str, Any]) -> dict[str, Any]:
    """open_clip's config file: the architecture (QuickGELU included) and the project's preprocessing."""
    model_cfg = open_clip.get_model_config(bundle.arch)
    if model_cfg is None:
        raise ValueError(f"open_clip does not know the architecture {bundle.arch!r}")
    if bundle.quick_gelu:
        model_cfg["quick_gelu"] = True
    return {"model_cfg": model_cfg, "preprocess_cfg": {**preprocess, "size": bundle.image_size}}


def export_adapted(src: str | Path, out: str | Path, arch: str | None = None) -> dict[str, Any]:
    """Write the export of the adapted CLIP `src` (directory or plain checkpoint; `arch` names the architecture
    of a checkpoint that does not record it) to `out`, replacing it whole. Returns export.json's content."""
    src, out = Path(src), Path(out)
    if arch is None and src.is_file():
        arch = checkpoint_metadata(src).get("arch")
    adapted = load_adapted(src, arch)
    bundle = adapted.bundle
    preprocess = {k: bundle.model.visual.preprocess_cfg[k] for k in _PREPROCESS_KEYS}
    reason = openai_incompatibility(bundle)
    record: dict[str, Any] = {
        "name": adapted.name, "arch": bundle.arch, "quick_gelu": bundle.quick_gelu, "preprocess": preprocess,
        "image_size": bundle.image_size, "source": str(src.resolve()),
        "files": {"open_clip": OPEN_CLIP_FILE, "openai": None if reason else OPENAI_FILE,
                  "prompts": PROMPTS_FILE if adapted.prompts is not None else None},
        "openai_layout": reason or "written",
        "load": {"open_clip": load_call(bundle.arch, bundle.quick_gelu, preprocess),
                 "openai": None if reason else f"open_clip.model.build_model_from_openai_state_dict("
                                               f"torch.load('{OPENAI_FILE}')).float(), or OpenAI's "
                                               f"clip.load('{OPENAI_FILE}', jit=False)",
                 "prompts": None if adapted.prompts is None else
                 f"ovseg_core.clip.mpt.MaskPromptedViT(model.visual, load_prompts('{PROMPTS_FILE}'))"},
    }
    with atomic_dir(out) as tmp:
        save_file(open_clip_state_dict(bundle), tmp / OPEN_CLIP_FILE)
        if not reason:
            torch.save(openai_state_dict(bundle), tmp / OPENAI_FILE)
        if adapted.prompts is not None:
            save_prompts(adapted.prompts, tmp / PROMPTS_FILE, bundle.arch)
        write_json(tmp / OPEN_CLIP_CONFIG_FILE, open_clip_config(bundle, preprocess))
        write_json(tmp / EXPORT_FILE, record)
    return record

