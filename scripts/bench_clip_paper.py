"""Benchmark: build a CLIP (random init) with depth-3 mask prompts and time one forward on CPU.

    python -m scripts.bench_clip_paper                      # ViT-L-14 (paper) and ovseg-tiny-vit
    python -m scripts.bench_clip_paper --arch ViT-B-16 --batch 4
"""
from __future__ import annotations

import argparse
import time

import torch

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.mpt import MaskPrompts, encode_masked


def bench(arch: str, batch: int, depth: int) -> dict[str, float]:
    start = time.perf_counter()
    torch.manual_seed(0)
    bundle = load_clip(arch)
    prompts = MaskPrompts.for_visual(bundle.model.visual, depth, init_std=0.02)
    build_s = time.perf_counter() - start
    size = bundle.image_size
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    masks[:, size // 4 : 3 * size // 4, size // 8 : size // 2] = True
    crops = torch.randn(batch, 3, size, size) * masks[:, None]
    with torch.no_grad():
        start = time.perf_counter()
        plain = encode_masked(bundle, crops)
        plain_s = time.perf_counter() - start
        start = time.perf_counter()
        prompted = encode_masked(bundle, crops, masks, prompts)
        mpt_s = time.perf_counter() - start
    assert prompted.shape == plain.shape == (batch, bundle.embed_dim)
    return {
        "params_total": sum(p.numel() for p in bundle.model.parameters()),
        "params_visual": sum(p.numel() for p in bundle.model.visual.parameters()),
        "params_prompts": prompts.mask_embedding.numel(),
        "image_size": size,
        "build_s": build_s,
        "forward_plain_s": plain_s,
        "forward_mpt_s": mpt_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["ViT-L-14", "ovseg-tiny-vit"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, batch {args.batch}, prompt depth {args.depth}")
    for arch in args.arch:
        r = bench(arch, args.batch, args.depth)
        print(
            f"{arch:>16}: {r['params_total'] / 1e6:8.2f}M params ({r['params_visual'] / 1e6:.2f}M visual), "
            f"{r['params_prompts'] / 1e3:.1f}K prompt params, {r['image_size']} px | build {r['build_s']:.2f} s, "
            f"forward plain {r['forward_plain_s']:.3f} s, with MPT {r['forward_mpt_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
