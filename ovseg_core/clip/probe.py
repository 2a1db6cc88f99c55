"""Zero-shot classification of ground-truth masked regions: how well an (adapted) CLIP names masked crops.

Every class region of a labelled prepared set becomes a masked crop (THE shared `masked_crops`,
as in mining and inference) with its mask, so mask prompts apply; accuracy is reported overall and
for seen / unseen classes. This isolates the CLIP branch from the proposal network.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..crops import masked_crops
from ..datasets.prepared import PreparedDataset
from .adapted import AdaptedClip
from .text import text_features


@torch.no_grad()
def probe_metrics(adapted: AdaptedClip, prepared: PreparedDataset, max_images: int = 100,
                  min_fraction: float = 0.01, batch_size: int = 128) -> dict[str, Any]:
    b = adapted.bundle
    crops, masks, labels = [], [], []
    for i in range(min(max_images, len(prepared))):
        label = torch.from_numpy(prepared.load_label(i))
        present = [c for c in label.unique().tolist()
                   if c != prepared.ignore_label and (label == c).sum() >= min_fraction * label.numel()]
        if not present:
            continue
        image = torch.from_numpy(np.ascontiguousarray(prepared.load_image(i))).permute(2, 0, 1)
        cut = masked_crops(image, torch.stack([label == c for c in present]), b.image_size, b.mean, b.std)
        crops.append(cut.crops)
        masks.append(cut.masks)
        labels.append(torch.tensor(present)[cut.indices])
    if not crops:
        raise ValueError(f"{prepared.root}: no labelled regions to probe")
    x, m, y = torch.cat(crops), torch.cat(masks), torch.cat(labels)
    text = text_features(b, prepared.classes)
    encode = adapted.encoder()
    feats = torch.cat([encode(x[s:s + batch_size], m[s:s + batch_size]) for s in range(0, len(x), batch_size)])
    correct = (feats @ text.T).argmax(1) == y
    seen = torch.tensor(prepared.seen)[y]

    def acc(sel: torch.Tensor) -> float | None:
        return round(100.0 * correct[sel].float().mean().item(), 2) if sel.any() else None

    return {"probe_regions": int(len(y)), "masked_acc": acc(torch.ones_like(correct)),
            "masked_acc_seen": acc(seen), "masked_acc_unseen": acc(~seen),
            "chance_acc": round(100.0 / prepared.num_classes, 2)}
