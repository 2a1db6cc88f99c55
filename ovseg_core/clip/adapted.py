"""An adapted CLIP as one directory: which CLIP weights (original or fine-tuned) and which mask prompts.

    <dir>/adapted.json   {"name", "arch", "clip": weights file, "prompts": prompts file or null}
    <dir>/clip.pt        fine-tuned weights (FT, FT→MPT), absent when the original CLIP is used
    <dir>/prompts.pt     mask prompts (MPT, FT→MPT)

Paths in adapted.json are relative to the directory (the original CLIP stays where its own stage
wrote it, e.g. "../../pretrain_clip/clip.pt"), so the directory can move with its neighbours. `load_adapted` also accepts a plain CLIP checkpoint
file, which is the original CLIP with no prompts.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_json
from ..errors import DataError
from .models import ClipBundle, load_clip
from .mpt import MaskPrompts, encode_masked, load_prompts

ADAPTED_FILE = "adapted.json"


@dataclass
class AdaptedClip:
    name: str
    bundle: ClipBundle
    prompts: MaskPrompts | None

    def encoder(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """encode(crops, masks) -> normalised features, the CLIP branch's encoder."""
        return functools.partial(encode_masked, self.bundle, prompts=self.prompts)

    @property
    def logit_scale(self) -> float:
        return self.bundle.model.logit_scale.detach().exp().item()


def write_adapted(directory: str | Path, name: str, arch: str, clip: str | Path, prompts: str | Path | None) -> Path:
    """Describe an adapted CLIP in `directory/adapted.json` (weights and prompts must already be written)."""
    directory = Path(directory)

    def rel(p: str | Path | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), directory.resolve())

    path = directory / ADAPTED_FILE
    write_json(path, {"name": name, "arch": arch, "clip": rel(clip), "prompts": rel(prompts)})
    return path


def weights_file(path: str | Path) -> Path:
    """The CLIP weights file behind an adapted-CLIP directory or a plain checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    meta_path = path / ADAPTED_FILE
    if not meta_path.is_file():
        raise DataError(path, f"not an adapted CLIP (no {ADAPTED_FILE}) nor a CLIP checkpoint file")
    try:
        return (path / json.loads(meta_path.read_text())["clip"]).resolve()
    except (KeyError, json.JSONDecodeError) as e:
        raise DataError(meta_path, f"malformed adapted-CLIP description: {e}") from e


def load_adapted(path: str | Path, arch: str | None = None, device: str = "cpu") -> AdaptedClip:
    """Load an adapted-CLIP directory, or a plain CLIP checkpoint (then `arch` is needed) as the original."""
    path = Path(path)
    if path.is_file():
        if arch is None:
            raise ValueError(f"{path}: a plain CLIP checkpoint needs its architecture name")
        bundle = load_clip(arch, str(path), device=device)
        bundle.model.eval()
        return AdaptedClip("original", bundle, None)
    clip_path = weights_file(path)
    meta_path = path / ADAPTED_FILE
    try:
        meta = json.loads(meta_path.read_text())
        bundle = load_clip(meta["arch"], str(clip_path), device=device)
        prompts = load_prompts(path / meta["prompts"], device=device) if meta.get("prompts") else None
    except (KeyError, json.JSONDecodeError) as e:
        raise DataError(meta_path, f"malformed adapted-CLIP description: {e}") from e
    bundle.model.eval()
    return AdaptedClip(meta["name"], bundle, prompts)
