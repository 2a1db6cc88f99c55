"""Benchmark CLIP pretraining on the embedded world: throughput and zero-shot accuracy along the way.

Trains a CLIP from scratch on a prepared web caption set with `train_clip` (or loads a saved one with
--checkpoint) and, at the steps given by --eval-at, measures zero-shot noun accuracy on held-out
probes rendered from the world generator (thing vocabulary; chance = 1/16):

* single-grey    one object on a plain grey background (whole view);
* single-stuff   one object on a stuff texture (whole view) ...
* single-masked  ... and the masked crop of the same object (the OVSeg input; background = mean colour);
* scene          a multi-object scene, labelled with the object of largest visible area;
* scene-box      the tight box of every object in those scenes, surroundings kept;
* scene-masked   the masked crop of the same objects;

plus the stage's own probe (`segment_probe` on a prepared eval set, all classes): eval-scene,
eval-box, eval-masked. Each row splits accuracy into seen and unseen classes (the world's default
unseen list). Wall time counts training only, not the probes.

    python scripts/bench_pretrain_clip.py --web data/prepared/world-web --eval data/prepared/eval/world-eval \
        --steps 600 --batch 128 --lr 2e-3 --warmup 50 --eval-at 150,300,600 --out bench.json
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import open_clip
import torch

from ovseg_core.atomic import write_json
from ovseg_core.clip.models import ClipBundle, load_clip, save_clip
from ovseg_core.clip.train import ClipTrainConfig, train_clip
from ovseg_core.clip.zeroshot import zero_shot_accuracy
from ovseg_core.clip.datasets import CaptionImageDataset, clip_pixels, normalise, segment_probe
from ovseg_core.crops import masked_crops
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.world import DEFAULT_UNSEEN, STUFF, THINGS, WorldConfig, render_scene, render_single_object, scene_rng

THING_NAMES = [t.name for t in THINGS]
MIN_OBJECT_PX = 40  # smaller visible parts are mostly occluded slivers


def _whole(bundle: ClipBundle, image: np.ndarray) -> torch.Tensor:
    return normalise(clip_pixels(image, bundle.image_size), bundle.mean, bundle.std)


def _crops(bundle: ClipBundle, image: np.ndarray, masks: np.ndarray, box: bool) -> torch.Tensor:
    pixels = torch.from_numpy(image).permute(2, 0, 1)
    masks = torch.from_numpy(masks)
    if box:  # the full tight box as the mask keeps the surroundings
        cut = masked_crops(pixels, masks, bundle.image_size, bundle.mean, bundle.std)
        masks = torch.zeros_like(masks)
        for k, (x0, y0, x1, y1) in enumerate(cut.boxes.tolist()):
            masks[k, y0:y1, x0:x1] = True
    return masked_crops(pixels, masks, bundle.image_size, bundle.mean, bundle.std).crops


def world_probes(bundle: ClipBundle, per_class: int, scenes: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out probe images from the generator (streams the world's own splits never use)."""
    size = WorldConfig().image_size
    out: dict[str, tuple[list[torch.Tensor], list[int]]] = {
        k: ([], []) for k in ("single-grey", "single-stuff", "single-masked", "scene", "scene-box", "scene-masked")
    }

    def add(key: str, images: torch.Tensor, labels: list[int]) -> None:
        out[key][0].append(images.reshape(-1, *images.shape[-3:]))
        out[key][1].extend(labels)

    for c, name in enumerate(THING_NAMES):
        for i in range(per_class):
            rng = scene_rng(seed, f"probe-single-{name}", i)
            size_frac = float(rng.uniform(0.35, 0.6))
            grey = render_single_object(rng, name, size, object_size=size_frac)
            add("single-grey", _whole(bundle, grey.image), [c])
            on_stuff = render_single_object(rng, name, size, background=STUFF[i % len(STUFF)].name, object_size=size_frac)
            add("single-stuff", _whole(bundle, on_stuff.image), [c])
            add("single-masked", _crops(bundle, on_stuff.image, on_stuff.thing_masks, box=False), [c])
    params = WorldConfig().scene
    for i in range(scenes):
        scene = render_scene(scene_rng(seed, "probe-scene", i), size, params, 0)
        areas = scene.thing_masks.reshape(len(scene.thing_classes), -1).sum(1)
        add("scene", _whole(bundle, scene.image), [scene.thing_classes[int(areas.argmax())]])
        keep = areas >= MIN_OBJECT_PX
        labels = [c for c, k in zip(scene.thing_classes, keep) if k]
        if labels:
            add("scene-box", _crops(bundle, scene.image, scene.thing_masks[keep], box=True), labels)
            add("scene-masked", _crops(bundle, scene.image, scene.thing_masks[keep], box=False), labels)
    return {k: (torch.cat(v[0]), torch.tensor(v[1])) for k, v in out.items()}


def evaluate(bundle: ClipBundle, world: dict, probe) -> dict[str, dict[str, float]]:
    rows = {}
    unseen_things = [n for n in THING_NAMES if n in DEFAULT_UNSEEN]
    seen_things = [n for n in THING_NAMES if n not in DEFAULT_UNSEEN]
    for key, (images, labels) in world.items():
        r = zero_shot_accuracy(bundle, images, None, labels, THING_NAMES)
        rows[key] = {"n": len(labels), "acc": r.accuracy, "seen": r.subset_accuracy(seen_things),
                     "unseen": r.subset_accuracy(unseen_things), "chance": 1 / len(THING_NAMES)}
    if probe is not None:
        seen, unseen = probe.names(True), probe.names(False)
        for key, images, labels in (("eval-scene", probe.scenes, probe.scene_labels),
                                    ("eval-box", probe.boxes, probe.segment_labels),
                                    ("eval-masked", probe.masked, probe.segment_labels)):
            r = zero_shot_accuracy(bundle, images, None, labels, probe.classes)
            rows[key] = {"n": len(labels), "acc": r.accuracy, "seen": r.subset_accuracy(seen),
                         "unseen": r.subset_accuracy(unseen), "chance": 1 / len(probe.classes)}
    return rows


def print_rows(step: int, wall: float, rows: dict[str, dict[str, float]]) -> None:
    print(f"step {step}  train wall {wall:.0f}s")
    for key, r in rows.items():
        print(f"  {key:14s} n={r['n']:5d}  acc {r['acc']:.3f}  seen {r['seen']:.3f}  unseen {r['unseen']:.3f}"
              f"  (chance {r['chance']:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--web", type=Path, help="prepared caption set to train on")
    ap.add_argument("--eval", type=Path, help="prepared labelled eval set for the segment probe (optional)")
    ap.add_argument("--checkpoint", type=Path, help="evaluate this saved CLIP instead of training")
    ap.add_argument("--arch", default="ovseg-tiny-vit")
    ap.add_argument("--arch-config", type=Path, help="an open_clip JSON model config to register (arch = its stem)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--logit-scale", type=float, default=None, help="exp(logit_scale) at step 0")
    ap.add_argument("--fixed-scale", action="store_true", help="do not learn the logit scale")
    ap.add_argument("--grad-clip", type=float, default=None)
    ap.add_argument("--captions-per-image", type=int, default=None)
    ap.add_argument("--max-images", type=int, default=None, help="train on the first N images only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-at", default="", help="comma-separated steps to probe at (the last step always is)")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--probe-images", type=int, default=100, help="eval-set images in the segment probe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, help="save the trained CLIP here")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.arch_config:
        open_clip.add_model_config(args.arch_config)
        args.arch = args.arch_config.stem

    torch.manual_seed(args.seed)
    bundle = load_clip(args.arch, pretrained=args.checkpoint)
    params = sum(p.numel() for p in bundle.model.parameters())
    world = world_probes(bundle, args.per_class, args.scenes, seed=1000 + args.seed)
    probe = None
    if args.eval:
        probe = segment_probe(PreparedDataset.load(args.eval), bundle.image_size, bundle.mean, bundle.std,
                              max_images=args.probe_images)
    results: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "params": params, "evals": []}
    if args.checkpoint:
        rows = evaluate(bundle, world, probe)
        print_rows(0, 0.0, rows)
        results["evals"].append({"step": None, "rows": rows})
    else:
        prepared = PreparedDataset.load(args.web)
        if args.max_images:
            prepared.samples = prepared.samples[: args.max_images]
        t = time.perf_counter()
        data = CaptionImageDataset.for_model(prepared, bundle, args.captions_per_image)
        results["load_s"] = time.perf_counter() - t
        config = ClipTrainConfig(
            mode="pretrain", steps=args.steps, batch_size=args.batch, lr=args.lr, weight_decay=args.wd,
            warmup_steps=args.warmup, seed=args.seed, checkpoint_every=args.steps,
            init_logit_scale=args.logit_scale, learn_logit_scale=not args.fixed_scale,
            grad_clip_norm=args.grad_clip,
        )
        results["config"] = asdict(config)
        results["pairs"], results["images"] = len(data), data.num_images
        stops = sorted({int(s) for s in args.eval_at.split(",") if s} | {args.steps})
        ckpt = Path(tempfile.mkdtemp(prefix="bench-pretrain-clip-"))
        wall = 0.0
        try:
            for stop in stops:
                t = time.perf_counter()
                result = train_clip(bundle, data, config, ckpt, stop_after=stop)
                wall += time.perf_counter() - t
                rows = evaluate(bundle, world, probe)
                last = result.log[-20:]
                entry = {"step": stop, "wall_s": wall, "samples_per_s": stop * args.batch / wall,
                         "loss": sum(r["loss"] for r in last) / len(last),
                         "logit_scale": float(bundle.model.logit_scale.detach().exp()), "rows": rows}
                results["evals"].append(entry)
                print(f"loss {entry['loss']:.3f}  scale {entry['logit_scale']:.1f}  "
                      f"{entry['samples_per_s']:.0f} samples/s")
                print_rows(stop, wall, rows)
                if args.out:
                    write_json(args.out, results)
            results["loss_curve"] = [r["loss"] for r in result.log]
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)
        if args.save:
            save_clip(bundle, args.save)
    print(f"{params / 1e6:.2f}M parameters")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
