"""Build or load an open_clip model by architecture name, offline.

`pretrained` is one of: None (random init), an open_clip pretrained tag (resolved from the local
cache only; nothing is downloaded), or a local checkpoint file (open_clip's own state-dict loading,
which also reads the files `save_clip` writes). The embedded world's tiny architectures live as
open_clip JSON model configs in `ovseg_core/model_configs/` and are registered with open_clip's
config registry on import, so they are built by name exactly like `ViT-L-14`.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.constants import HF_HUB_CACHE
from open_clip.constants import HF_WEIGHTS_NAME
from open_clip.pretrained import _get_safe_alternatives

from ..atomic import write_torch
from ..errors import DataError, MissingWeightsError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def register_model_configs(directory: Path = MODEL_CONFIG_DIR) -> None:
    """Add our JSON model configs to open_clip's registry (idempotent)."""
    missing = [p.stem for p in directory.glob("*.json") if p.stem not in open_clip.list_models()]
    if missing:
        open_clip.add_model_config(directory)


register_model_configs()


@dataclass
class ClipBundle:
    """An open_clip model with what every caller needs beside it."""

    model: open_clip.CLIP | open_clip.CustomTextCLIP
    tokenizer: Callable[..., torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    arch: str
    pretrained: str | None = None
    quick_gelu: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)


def _cached_tag_file(pcfg: dict[str, Any], cache_dir: str | None) -> tuple[Path | None, list[str]]:
    """Find a pretrained tag's weights in the local caches open_clip downloads to; never touch the network.

    Returns (path or None, human-readable list of the places looked at).
    """
    looked: list[str] = []
    if pcfg.get("hf_hub"):
        repo_id, filename = os.path.split(pcfg["hf_hub"])  # open_clip's convention: "org/repo/" = default file
        filename = filename or HF_WEIGHTS_NAME
        for name in [*_get_safe_alternatives(filename), filename]:  # open_clip prefers safetensors too
            looked.append(f"Hugging Face hub cache {cache_dir or HF_HUB_CACHE}: repo {repo_id}, file {name}")
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return Path(found), looked
    if pcfg.get("url"):
        clip_cache = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        target = clip_cache / os.path.basename(pcfg["url"])
        looked.append(f"file {target} (downloaded from {pcfg['url']})")
        if target.is_file():
            return target, looked
    return None, looked


def _is_torchscript(path: Path) -> bool:
    # OpenAI's released CLIP files are TorchScript archives, which torch.load refuses with weights_only=True.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    """Read the metadata `save_clip` stores beside the state dict (empty for foreign checkpoints)."""
    if path.suffix in (".safetensors", ".npz", ".npy"):
        return {}
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a data error naming the file
        raise DataError(path, f"not a readable CLIP checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(payload, dict) and "ovseg_clip" in payload:
        return payload["ovseg_clip"]
    return {}


def resolve_pretrained(arch: str, pretrained: str | Path, cache_dir: str | None = None) -> Path:
    """The local weights file behind an open_clip pretrained tag (from the local cache only) or a path.

    Cheap (nothing is built), so configurations can be validated before any stage runs. Raises
    MissingWeightsError saying which file to provide where.
    """
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {arch!r}; open_clip knows {open_clip.list_models()}")
    pcfg = open_clip.get_pretrained_cfg(arch, str(pretrained))
    if pcfg:
        checkpoint, looked = _cached_tag_file(pcfg, cache_dir)
        if checkpoint is None:
            raise MissingWeightsError(
                f"CLIP weights {arch} / {pretrained!r} are not in the local cache and nothing is downloaded here. "
                "Provide one of: " + "; ".join(looked) + ". "
                f"E.g. on a connected machine run `python -c \"import open_clip; open_clip.create_model('{arch}', "
                f"pretrained='{pretrained}')\"` and copy the Hugging Face hub cache (HF_HOME) here, "
                "or pass the weights file's local path as `pretrained`."
            )
        return checkpoint
    checkpoint = Path(pretrained)
    if not checkpoint.is_file():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise MissingWeightsError(
            f"{pretrained!r} is neither an existing checkpoint file nor an open_clip pretrained tag "
            f"for {arch} (tags: {tags})."
        )
    return checkpoint


def load_clip(
    arch: str,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> ClipBundle:
    """Build `arch` (any open_clip architecture or one of ours) with weights from `pretrained`.

    A local file may be one `save_clip` wrote (architecture and preprocessing are checked and restored),
    an open_clip state dict, or an OpenAI TorchScript release (QuickGELU is then switched on). For
    other foreign state dicts trained with QuickGELU, name the `-quickgelu` architecture variant.

    Raises MissingWeightsError when a pretrained tag is not in the local cache (saying which file to
    provide where), DataError for an unreadable or mismatched checkpoint file.
    """
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {arch!r}; open_clip knows {open_clip.list_models()}")
    kwargs: dict[str, Any] = {}
    checkpoint: Path | None = None
    quick_gelu = bool(open_clip.get_model_config(arch).get("quick_gelu", False))
    if pretrained is not None:
        checkpoint = resolve_pretrained(arch, pretrained, cache_dir)
        pcfg = open_clip.get_pretrained_cfg(arch, str(pretrained))
        if pcfg:
            quick_gelu = bool(pcfg.get("quick_gelu", quick_gelu))
            kwargs["force_preprocess_cfg"] = {k: pcfg[k] for k in _PREPROCESS_KEYS if k in pcfg}
        else:
            meta = {} if _is_torchscript(checkpoint) else checkpoint_metadata(checkpoint)
            if meta:
                if meta["arch"] != arch:
                    raise DataError(checkpoint, f"checkpoint is for architecture {meta['arch']!r}, not {arch!r}")
                quick_gelu = bool(meta["quick_gelu"])
                kwargs["force_preprocess_cfg"] = {k: meta["preprocess_cfg"][k] for k in _PREPROCESS_KEYS}
    if checkpoint is not None and _is_torchscript(checkpoint):
        kwargs["weights_only"] = False  # open_clip then takes the state dict out of the TorchScript module
        quick_gelu = True  # every OpenAI release uses QuickGELU
    try:
        model = open_clip.create_model(
            arch,
            pretrained=str(checkpoint) if checkpoint else None,
            device=device,
            force_quick_gelu=quick_gelu,
            **kwargs,
        )
    except (RuntimeError, KeyError) as e:
        if checkpoint is None:
            raise
        raise DataError(checkpoint, f"weights do not fit {arch}: {e}") from e
    model.eval()
    cfg = model.visual.preprocess_cfg
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)  # ResNet towers keep an int
    if size[0] != size[1]:
        raise ValueError(f"{arch}: only square CLIP inputs are supported, got {size}")
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        image_size=int(size[0]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        embed_dim=int(open_clip.get_model_config(arch)["embed_dim"]),
        arch=arch,
        pretrained=str(pretrained) if pretrained is not None else None,
        quick_gelu=quick_gelu,
    )


def save_clip(bundle: ClipBundle, path: str | Path) -> Path:
    """Write the model's state dict (open_clip-loadable: key `state_dict`) plus our metadata, atomically."""
    path = Path(path)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in bundle.model.state_dict().items()},
        "ovseg_clip": {
            "arch": bundle.arch,
            "quick_gelu": bundle.quick_gelu,
            "preprocess_cfg": {k: bundle.model.visual.preprocess_cfg[k] for k in _PREPROCESS_KEYS},
        },
    }
    write_torch(path, payload)
    return path
