"""Build the paper's proposal networks (random init, cosine head over a COCO-Stuff-sized vocabulary) and
time one training step (forward + backward + AdamW) on CPU at reduced resolution.

    python scripts/bench_maskformer_paper.py [--size 256] [--batch 1] [--threads 2] [--presets paper-swin-b paper-r101c]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from ovseg_core.maskformer import build_model, preset_config
from ovseg_core.maskformer.targets import semantic_targets

# Text embedding width of the CLIP each network is paired with in the paper.
CLIP_DIM = {"paper-swin-b": 768, "paper-r101c": 512}  # ViT-L/14, ViT-B/16
NUM_CLASSES = 171  # COCO-Stuff


def bench(preset: str, size: int, batch: int) -> None:
    torch.manual_seed(0)
    text = F.normalize(torch.randn(NUM_CLASSES, CLIP_DIM[preset]), dim=-1)
    start = time.perf_counter()
    model = build_model(preset_config(preset), text).train()
    built = time.perf_counter() - start
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.model.pixel_level_module.encoder.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-5, weight_decay=1e-2)

    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    label = torch.zeros(size, size, dtype=torch.long)
    label[: size // 2] = 3
    label[size // 2:, : size // 3] = 170
    masks, classes = zip(*(semantic_targets(label, 255) for _ in range(batch)))

    t0 = time.perf_counter()
    out = model(model.normalize(images), mask_labels=list(masks), class_labels=list(classes))
    t1 = time.perf_counter()
    out.loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    t3 = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{preset}: {total / 1e6:.1f}M parameters ({backbone / 1e6:.1f}M backbone), {model.net.num_queries} queries, "
          f"built in {built:.1f}s; {size}px batch {batch}: forward {t1 - t0:.2f}s, backward {t2 - t1:.2f}s, "
          f"AdamW step {t3 - t2:.2f}s, loss {out.loss.item():.2f}, peak RSS so far {peak_gb:.2f} GB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(CLIP_DIM), choices=list(CLIP_DIM))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.presets:
        bench(preset, args.size, args.batch)


if __name__ == "__main__":
    main()
