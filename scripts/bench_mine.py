"""Benchmark mining: pairs/s and where the time goes, on a prepared world (default: the embedded one).

Mines the first N images of the `mine` stage's dataset with the stage's settings (params.yaml, one
variant) through `Miner.mine_unit`, and times its steps by wrapping the functions the miner calls
(the library itself carries no timing code):

    maskformer     proposal network forward (ovseg_core.inference.proposals)
    clip-image     CLIP forward of the masked crops (encode_masked)
    clip-text      CLIP text features of the categories (TextFeatureCache, cached per noun)
    crops          masked crops (threshold, box, resize, fill) and their uint8 copies for the shard
    nouns          caption nouns (tokenise, tag, lemmatise)
    matching       noun ↔ proposal assignment
    image-io       image decoding
    shards         shard writing (crop/mask PNG or JPEG encoding, tar, stats with sha256)
    other          everything else (the rest of the loop, GT masks, pair records)

Models: the trained ones named in params.yaml when both files exist, else random-init stand-ins of
the same architectures (said in the output; the timing of a forward pass does not depend on the
weights, but the number of pairs does a little, through which masks survive the threshold).

    python scripts/bench_mine.py --images 150 --threads 1 [--variant proposals-nouns] [--out bench.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from ovseg_core import mining
from ovseg_core.atomic import write_json
from ovseg_core.clip.models import load_clip, save_clip
from ovseg_core.clip.text import text_features
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.maskformer.model import build_model, load_model, preset_config, save_model
from ovseg_core.mining import Miner, MiningConfig

MODEL_STEPS = ("maskformer", "clip-image", "clip-text")
DATA_STEPS = ("image-io", "nouns", "shards")  # the target: these stay under 30% of the time


class StepTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, step: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[step] += time.perf_counter() - start
                self.calls[step] += 1
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(miner: Miner, timer: StepTimer) -> None:
    """Time the miner's steps: module-level functions it calls, and its own collaborators."""
    for name, step in (("proposals", "maskformer"), ("encode_masked", "clip-image"), ("masked_crops", "crops"),
                       ("denormalize", "crops"), ("match_nouns_to_proposals", "matching"),
                       ("write_shard", "shards")):
        setattr(mining, name, timer.wrap(step, getattr(mining, name)))
    miner.text = timer.wrap("clip-text", miner.text)
    miner.categories = timer.wrap("nouns", miner.categories)
    miner.dataset.load_image = timer.wrap("image-io", miner.dataset.load_image)


def models(section: dict[str, Any], train: dict[str, Any], dataset: PreparedDataset, tmp: Path
           ) -> tuple[str, str, str]:
    """(clip path, proposal-net path, description): the trained files, or random-init stand-ins."""
    clip, net = Path(section["clip"]), Path(section["proposal_net"])
    if clip.is_file() and net.is_file():
        return str(clip), str(net), f"trained ({clip}, {net})"
    torch.manual_seed(0)
    bundle = load_clip(section["clip_arch"])
    save_clip(bundle, tmp / "clip.pt")
    model = build_model(preset_config(train.get("preset", "tiny"), **(train.get("net") or {})),
                        text_features(bundle, dataset.classes))
    save_model(tmp / "model.pt", model)
    return str(tmp / "clip.pt"), str(tmp / "model.pt"), (
        f"random-init stand-ins ({section['clip_arch']}, MaskFormer preset {train.get('preset', 'tiny')}): "
        f"{clip if not clip.is_file() else net} not found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", default="proposals-nouns")
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the stage: cores / workers)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = yaml.safe_load(Path(args.params).read_text())
    section = params["mine"]
    settings = {**(section.get("common") or {}), **section["variants"][args.variant], "max_images": args.images}
    dataset = PreparedDataset.load(section["dataset"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_path, net_path, described = models(section, params.get("train_maskformer", {}), dataset, tmp)
        start = time.perf_counter()
        cfg = MiningConfig.from_dict(settings)
        clip = load_clip(section["clip_arch"], clip_path)
        net = load_model(net_path)[0] if cfg.masks == "proposals" else None
        miner = Miner(cfg, dataset, clip, net)
        setup_s = time.perf_counter() - start

        timer = StepTimer()
        instrument(miner, timer)
        miner.mine_image(0)  # warm-up (lazy initialisation), not timed
        timer.reset()
        start = time.perf_counter()
        results = [miner.mine_unit(u, tmp) for u in range(miner.num_units)]  # units as the stage writes them
        total = time.perf_counter() - start

    pairs = sum(r["pairs"] for r in results)
    steps = dict(timer.seconds)
    steps["other"] = total - sum(steps.values())
    model_s = sum(steps.get(s, 0.0) for s in MODEL_STEPS)
    data_s = sum(steps.get(s, 0.0) for s in DATA_STEPS)
    figures = {
        "variant": args.variant, "images": args.images, "pairs": pairs, "threads": args.threads,
        "models": described, "setup_s": round(setup_s, 2), "total_s": round(total, 3),
        "pairs_per_s": round(pairs / total, 2), "images_per_s": round(args.images / total, 2),
        "model_forward_share": round(model_s / total, 3), "io_nouns_shards_share": round(data_s / total, 3),
        "steps_s": {k: round(v, 3) for k, v in sorted(steps.items(), key=lambda kv: -kv[1])},
        "calls": dict(timer.calls),
    }
    print(f"mining {args.variant}: {args.images} images, {pairs} pairs in {total:.2f} s "
          f"({figures['pairs_per_s']} pairs/s, {figures['images_per_s']} images/s, {args.threads} torch thread(s))")
    print(f"models: {described}; setup (model load, tagger) {setup_s:.1f} s, not counted")
    print(f"{'step':<12}{'seconds':>10}{'share':>8}{'calls':>8}")
    for step, seconds in figures["steps_s"].items():
        print(f"{step:<12}{seconds:>10.3f}{seconds / total:>8.1%}{timer.calls.get(step, 0):>8}")
    print(f"model forward passes (maskformer + clip image + clip text): {model_s / total:.1%}; "
          f"everything else: {1 - model_s / total:.1%}")
    verdict = "meets" if data_s / total < 0.30 else "misses"
    print(f"image I/O + nouns + shard writing: {data_s / total:.1%} ({verdict} the < 30% target)")
    if args.out:
        write_json(args.out, figures)


if __name__ == "__main__":
    main()
