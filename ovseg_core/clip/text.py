"""Text classifier: class names → CLIP text embeddings ensembled over the 14 ViLD templates."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .models import ClipBundle

# Paper appendix A.2 (the ViLD templates).
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


@torch.no_grad()
def text_features(
    bundle: ClipBundle,
    names: Sequence[str],
    templates: Sequence[str] = VILD_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """[K, D] features: each template's embedding L2-normalised, averaged over templates, re-normalised."""
    if not templates:
        raise ValueError("text_features: at least one template is needed")
    if not names:
        return torch.zeros(0, bundle.embed_dim, device=bundle.device)
    prompts = [t.format(name) for name in names for t in templates]
    chunks = [  # fp32 normalisation, also when the caller runs the text tower under bf16 autocast
        F.normalize(bundle.model.encode_text(bundle.tokenize(prompts[i : i + batch_size])).float(), dim=-1)
        for i in range(0, len(prompts), batch_size)
    ]
    per_template = torch.cat(chunks).view(len(names), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


class TextFeatureCache:
    """Per-noun memo of `text_features`, so every noun is encoded once per model.

    Each name is encoded on its own (its templates form one batch), so its feature never depends on which
    other names were new at the same time: mining gives bit-identical pairs however its work is split
    among threads and processes. Valid only while the text tower does not change (it is frozen in every
    use after pretraining).
    """

    def __init__(self, bundle: ClipBundle, templates: Sequence[str] = VILD_TEMPLATES):
        self.bundle = bundle
        self.templates = tuple(templates)
        self._features: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        for name in dict.fromkeys(n for n in names if n not in self._features):
            self._features[name] = text_features(self.bundle, [name], self.templates)[0]
        if not names:
            return torch.zeros(0, self.bundle.embed_dim, device=self.bundle.device)
        return torch.stack([self._features[n] for n in names])
