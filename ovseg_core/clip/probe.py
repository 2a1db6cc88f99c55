"""Zero-shot classification of ground-truth masked regions: how well an (adapted) CLIP names masked crops.

Every class region of a labelled prepared set becomes a masked crop (`segment_probe`, built on the shared
`masked_crops` of mining and inference) with its mask, so mask prompts apply; accuracy is reported overall and
for seen / unseen classes. This isolates the CLIP branch from the proposal network.
"""
from __future__ import annotations

from typing import Any

import torch

from ..compute import CPU_FP32, Placement
from ..datasets.prepared import DATASET_FILE, PreparedDataset
from ..errors import DataError
from .adapted import AdaptedClip
from .datasets import segment_probe
from .text import text_features


@torch.no_grad()
def probe_metrics(adapted: AdaptedClip, prepared: PreparedDataset, max_images: int = 100,
                  min_fraction: float = 0.01, batch_size: int = 128, placement: Placement = CPU_FP32
                  ) -> dict[str, Any]:
    """Accuracy (%) of the adapted CLIP naming every masked region of `prepared`'s first images, on
    `placement` (the adapted CLIP must already be on its device)."""
    b = adapted.bundle
    probe = segment_probe(prepared, b.image_size, b.mean, b.std, max_images, min_fraction)
    x, m, y = probe.masked, probe.masks, probe.segment_labels
    if not len(y):
        raise DataError(prepared.root / DATASET_FILE, "no labelled regions to probe")
    encode = adapted.encoder()
    device = placement.device
    with placement.autocast():
        text = text_features(b, prepared.classes)
        feats = torch.cat([encode(x[s:s + batch_size].to(device), m[s:s + batch_size].to(device))
                           for s in range(0, len(x), batch_size)])
    correct = ((feats @ text.T).argmax(1) == y.to(device)).cpu()
    seen = torch.tensor(prepared.seen)[y]

    def acc(sel: torch.Tensor) -> float | None:
        return round(100.0 * correct[sel].float().mean().item(), 2) if sel.any() else None

    return {"probe_regions": int(len(y)), "masked_acc": acc(torch.ones_like(correct)),
            "masked_acc_seen": acc(seen), "masked_acc_unseen": acc(~seen),
            "chance_acc": round(100.0 / prepared.num_classes, 2)}
