"""Paper-scale benchmark: the units of work of the paper recipe, at paper size with random weights, on the
device and precision the compute section would pick, with their FLOPs and achieved TFLOP/s.

Units (Swin-B MaskFormer with a COCO-Stuff-171 cosine head, CLIP ViT-L/14, bf16 autocast where native):

    mine             one image through the mining path (`Miner.mine_images`: decoding and caption nouns in
                     DataLoader workers, MaskFormer proposals at 640 short side, the top-k masked crops
                     through CLIP, matching, shard writing) on 480x640 JPEGs; per k in --mine-proposals
    train_maskformer one training step (forward, backward, AdamW) on --maskformer-batch 640x640 crops
    mpt, ft          one CLIP training step (`batch_loss`, backward, AdamW) on --clip-batch masked crops
    evaluate         one 512x683 image through the evaluation path (`BranchSegmenter`: proposals, CLIP on
                     every surviving proposal's crop, the three branches' label maps), 150 classes

FLOPs come from torch's flop-counter formulas (`FlopCount`; 2 per multiply-add) with attention on its
math path so that it is counted, in a first run that also warms up; the times are the median of
--repeat runs after it on a GPU, one run on a CPU (a paper-size unit takes minutes there). The JSON also projects the paper recipe's stages on 1 and 8 GPUs: from the times
measured here when this is a GPU, else from the FLOPs at an assumed sustained rate (said in the output).

    python -m scripts.bench_paper_scale --out benchmarks/paper-scale-cpu.json            # here: CPU
    python -m scripts.bench_paper_scale --out benchmarks/paper-scale-h100.json           # a GPU machine
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ovseg_core.clip.adapted import AdaptedClip
from ovseg_core.clip.models import ClipBundle, load_clip
from ovseg_core.clip.mpt import MaskPrompts
from ovseg_core.clip.text import TextFeatureCache
from ovseg_core.clip.train import ClipTrainConfig, TrainedTowers, batch_loss, param_groups, prepare_trainables
from ovseg_core.compute import ComputeConfig, Placement
from ovseg_core.datasets.prepared import PreparedDataset, PreparedWriter
from ovseg_core.evaluation import BranchSegmenter, label_map
from ovseg_core.inference import ClipBranch
from ovseg_core.maskformer import build_model, preset_config
from ovseg_core.maskformer.model import OpenVocabMaskFormer
from ovseg_core.maskformer.targets import semantic_targets
from ovseg_core.mining import Miner, MiningConfig
from scripts.measure import cpu_name

COCO_STUFF_CLASSES = 171
ADE_CLASSES = 150
NOUNS = ("dog", "cat", "car", "grass", "sky", "person", "table", "umbrella")  # a batch's texts cycle through these
CAPTION = "a {} and a {} next to a {} on the {} under the {}"

# The paper recipe's sizes (configs/paper-swinb-vitl14.yaml, DESIGN.md §5), for the projection.
COCO_TRAIN_IMAGES = 118_287
MASKFORMER_STEPS, MASKFORMER_BATCH = 120_000, 32
CLIP_STEPS, CLIP_BATCH = 8_600, 256  # ~5 epochs of ~440K pairs
MPT_VARIANTS, FT_VARIANTS = 5, 3  # mpt, ft-mpt, depth 1/6/12; ft, ft-gt-classes, ft-gt-nouns
EVAL_IMAGES = 2_000 + 2_000 + 5_105 + 5_105 + 1_449  # PC-59, PC-459, VOC-20 validation
EVAL_VARIANTS = 9
ASSUMED_TFLOPS = 0.35 * 989  # projection without a GPU: H100 SXM dense bf16 peak at 35% utilisation


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FlopCount(TorchDispatchMode):
    """FLOPs of every op torch's flop counter has a formula for (2 per multiply-add). Written here rather than
    using `FlopCounterMode` because that one's per-module tracking fails inside transformers' Hungarian
    matcher ("Expected gradient function to be set"); the formulas are torch's own."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


@contextlib.contextmanager
def counted_attention():
    """Attention through its math path (plain matmuls), whose FLOPs the formulas count."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def measure(name: str, run: Callable[[], Any], placement: Placement, repeat: int, per: int = 1) -> dict[str, Any]:
    """Seconds (median of `repeat`) and FLOPs of `run`, divided by `per` (items it processes)."""
    device = placement.device
    if device.type == "cuda":
        with counted_attention(), FlopCount() as counter:
            run()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    else:  # counted in the first run (it also warms up oneDNN's kernels), timed in one more
        with counted_attention(), FlopCount() as counter:
            run()
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    flops = counter.flops / per
    result = {"seconds": round(seconds / per, 4), "tflops": round(flops / 1e12, 4),
              "achieved_tflop_per_s": round(flops / (seconds / per) / 1e12, 2)}
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(f"{name}: {result}", flush=True)
    return result


def paper_maskformer(text_dim: int, classes: int, device: torch.device) -> OpenVocabMaskFormer:
    text = F.normalize(torch.randn(classes, text_dim), dim=-1)  # random weights: random text features will do
    return build_model(preset_config("paper-swin-b"), text).to(device)


def synthetic_prepared(root: Path, count: int, height: int, width: int) -> tuple[Path, Path]:
    """`count` JPEGs of coloured blocks with captions, as a prepared set; and a word/TAG file for the tagger."""
    rng = np.random.default_rng(0)
    with PreparedWriter(root / "prepared", "synthetic", ["thing"], [True], 255) as writer:
        captions = {}
        for i in range(count):
            image = np.full((height, width, 3), rng.integers(0, 255, 3), dtype=np.uint8)
            for _ in range(6):
                y, x = rng.integers(0, height - 60), rng.integers(0, width - 60)
                image[y:y + rng.integers(40, height - y), x:x + rng.integers(40, width - x)] = rng.integers(0, 255, 3)
            path = root / f"{i:06d}.jpg"
            Image.fromarray(image).save(path, quality=90)
            writer.add(f"{i:06d}", path, None)
            captions[f"{i:06d}"] = [CAPTION.format(*rng.choice(NOUNS, 5, replace=False))]
        writer.set_captions(captions)
    tagged = root / "tagged.txt"
    tagged.write_text("\n".join(" ".join(f"{w}/{'NN' if w in NOUNS else 'DT' if w in ('a', 'the') else 'IN'}"
                                         for w in CAPTION.format(*NOUNS[i:i + 5]).split()) for i in range(3)) + "\n")
    return root / "prepared", tagged


def bench_mine(clip: ClipBundle, placement: Placement, proposals: int, images: int, loader_workers: int,
               repeat: int) -> dict[str, Any]:
    net = paper_maskformer(clip.embed_dim, COCO_STUFF_CLASSES, placement.device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        prepared, tagged = synthetic_prepared(Path(tmp), images, 480, 640)
        cfg = MiningConfig(top_proposals=proposals, mask_threshold=0.4, image_format="jpg",
                           batch_images=min(8, images), nouns={"tagger": f"trained:{tagged}"})
        miner = Miner(cfg, PreparedDataset.load(prepared), clip, net, placement, loader_workers)
        with torch.no_grad(), placement.autocast():
            miner.text(list(NOUNS))  # each noun's text features are computed once per run, not per image
        pairs = []

        def run() -> None:
            pairs[:] = list(miner.mine_images(range(images)))

        result = measure(f"mine ({proposals} proposals)", run, placement, repeat, per=images)
    return {**result, "images": images, "proposals": proposals, "pairs_per_image": round(len(pairs) / images, 2)}


def bench_maskformer_step(clip: ClipBundle, placement: Placement, batch: int, repeat: int) -> dict[str, Any]:
    model = paper_maskformer(clip.embed_dim, COCO_STUFF_CLASSES, placement.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-5, weight_decay=0.01,
                                  fused=True)
    size, device = 640, placement.device
    label = torch.full((size, size), 255, dtype=torch.long)
    label[: size // 2] = 3
    label[size // 2:, : size // 3] = 170
    label[size // 2:, size // 3:] = 12
    masks, classes = zip(*(semantic_targets(label, 255) for _ in range(batch)))
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with placement.autocast():
            out = model(pixel_values=model.normalize(images), mask_labels=[m.to(device) for m in masks],
                        class_labels=[c.to(device) for c in classes])
        out.loss.backward()
        optimizer.step()

    return {**measure("train_maskformer step", run, placement, repeat, per=batch), "batch": batch,
            "note": "per sample (one step / batch)"}


def bench_clip_step(clip: ClipBundle, placement: Placement, mode: str, batch: int, repeat: int) -> dict[str, Any]:
    config = ClipTrainConfig(mode=mode, steps=1, batch_size=batch, lr=0.02 if mode == "mpt" else 5e-6,
                             weight_decay=0.0 if mode == "mpt" else 0.2, prompt_depth=3)
    clip.model.train(mode != "mpt")
    named, prompts = prepare_trainables(clip, config, None)
    optimizer = torch.optim.AdamW(param_groups(named, config.weight_decay), lr=config.lr, fused=True)
    towers = TrainedTowers(clip, prompts)
    text_cache = TextFeatureCache(clip)
    device, size = placement.device, clip.image_size
    masks = torch.zeros(batch, size, size, dtype=torch.bool, device=device)
    masks[:, size // 4: 3 * size // 4, size // 8: size // 2] = True
    crops = torch.randn(batch, 3, size, size, device=device) * masks[:, None]
    texts = [NOUNS[i % len(NOUNS)] for i in range(batch)]
    with torch.no_grad(), placement.autocast():
        text_cache(list(NOUNS))  # encoded once per noun in a real run: not part of a step

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        batch_loss(towers, clip, config.mode, crops, masks, texts, text_cache, placement).backward()
        optimizer.step()

    result = measure(f"{mode} step", run, placement, repeat, per=batch)
    clip.model.requires_grad_(False).eval()
    return {**result, "batch": batch, "trainable_params": sum(p.numel() for _, p in named),
            "note": "per sample (one step / batch)"}


def bench_evaluate(clip: ClipBundle, placement: Placement, repeat: int) -> dict[str, Any]:
    device = placement.device
    net = paper_maskformer(clip.embed_dim, ADE_CLASSES, device).eval()
    text = F.normalize(torch.randn(ADE_CLASSES, clip.embed_dim, device=device), dim=-1)
    adapted = AdaptedClip("random", clip, MaskPrompts.for_visual(clip.model.visual, 3, init_std=0.02))
    branch = ClipBranch(encode=adapted.encoder(), text_features=text, size=clip.image_size, mean=clip.mean,
                        std=clip.std, threshold=0.4)
    segmenter = BranchSegmenter(net, branch, placement=placement)
    image = np.random.default_rng(0).integers(0, 255, (512, 683, 3), dtype=np.uint8)
    crops = []

    @torch.no_grad()
    def run() -> None:
        props = segmenter.proposals([image])[0]
        scores = segmenter.clip_scores(image, props)
        crops[:] = [int(scores.keep.sum())]
        for lam in (0.0, 1.0, 0.7):
            label_map(props, None if lam == 0 else scores, lam)

    result = measure("evaluate image", run, placement, repeat)
    return {**result, "crops": crops[0], "image": "512x683, resized to 640 short side"}


def projection(units: dict[str, Any], measured_on_gpu: bool) -> dict[str, Any]:
    """Hours per stage of the paper recipe on 1 and 8 GPUs (8: the 1-GPU time / 8, i.e. perfect scaling)."""
    def seconds(unit: dict[str, Any]) -> float:
        return unit["seconds"] if measured_on_gpu else unit["tflops"] / ASSUMED_TFLOPS

    mine = units.get("mine_20") or next(v for k, v in units.items() if k.startswith("mine"))
    work = {
        f"mine ({mine['proposals']} proposals/image)": COCO_TRAIN_IMAGES * seconds(mine),
        "train_maskformer": MASKFORMER_STEPS * MASKFORMER_BATCH * seconds(units["train_maskformer"]),
        "adapt_clip, one MPT variant": CLIP_STEPS * CLIP_BATCH * seconds(units["mpt"]),
        "adapt_clip, one FT variant": CLIP_STEPS * CLIP_BATCH * seconds(units["ft"]),
        "evaluate, one variant (5 sets)": EVAL_IMAGES * seconds(units["evaluate"]),
    }
    work["whole recipe"] = (work[next(iter(work))] + work["train_maskformer"]
                            + MPT_VARIANTS * work["adapt_clip, one MPT variant"]
                            + FT_VARIANTS * work["adapt_clip, one FT variant"]
                            + EVAL_VARIANTS * work["evaluate, one variant (5 sets)"])
    return {
        "basis": ("times measured on this GPU" if measured_on_gpu else
                  f"FLOPs measured here at an assumed {ASSUMED_TFLOPS:.0f} TFLOP/s per GPU (35% of an H100's "
                  "dense bf16 peak); not measured on a GPU"),
        "scaling": "8 GPUs = 1 GPU / 8 (DDP and data-loading overheads not measured)",
        "hours": {stage: {"1_gpu": round(s / 3600, 2), "8_gpus": round(s / 3600 / 8, 2)} for stage, s in work.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--units", nargs="+", default=["mine", "train_maskformer", "mpt", "ft", "evaluate"])
    parser.add_argument("--mine-proposals", type=int, nargs="+", default=None,
                        help="proposals cropped per mining image (default: 20 100 on a GPU, 20 on a CPU)")
    parser.add_argument("--mine-images", type=int, default=None, help="default 64 on a GPU, 2 on a CPU")
    parser.add_argument("--maskformer-batch", type=int, default=None, help="default 4 on a GPU, 1 on a CPU")
    parser.add_argument("--clip-batch", type=int, default=None, help="default 64 on a GPU, 2 on a CPU")
    parser.add_argument("--loader-workers", type=int, default=None, help="default 8 on a GPU, 0 on a CPU")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per unit on a GPU (median)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    placement = ComputeConfig(device=args.device, precision=args.precision).placement()
    gpu = placement.device.type == "cuda"
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    start = time.perf_counter()
    clip = load_clip("ViT-L-14", device=placement.device)
    clip.model.requires_grad_(False)
    units: dict[str, Any] = {}
    if "mine" in args.units:
        for k in args.mine_proposals or ([20, 100] if gpu else [20]):
            units[f"mine_{k}"] = bench_mine(clip, placement, k, args.mine_images or (64 if gpu else 2),
                                            args.loader_workers if args.loader_workers is not None else (8 if gpu else 0),
                                            args.repeat)
    if "train_maskformer" in args.units:
        units["train_maskformer"] = bench_maskformer_step(clip, placement, args.maskformer_batch or (4 if gpu else 1),
                                                          args.repeat)
    for mode in ("mpt", "ft"):
        if mode in args.units:
            units[mode] = bench_clip_step(clip, placement, mode, args.clip_batch or (64 if gpu else 2), args.repeat)
    if "evaluate" in args.units:
        units["evaluate"] = bench_evaluate(clip, placement, args.repeat)

    record = {
        "date": datetime.date.today().isoformat(),
        "machine": (torch.cuda.get_device_name(placement.device) if gpu else f"{cpu_name()}, {os.cpu_count()} CPU cores"),
        "torch": torch.__version__,
        "command": "python -m scripts.bench_paper_scale " + " ".join(sys.argv[1:]),
        **placement.describe(),
        "models": "CLIP ViT-L/14 (random init), MaskFormer Swin-B (paper-swin-b preset, random init)",
        "units": units,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if {"mine", "train_maskformer", "mpt", "ft", "evaluate"} <= set(args.units):
        record["projection"] = projection(units, gpu)
        if gpu:
            mine = units["mine_20"]
            record["coco_mining_hours_1_gpu_20_proposals"] = round(COCO_TRAIN_IMAGES * mine["seconds"] / 3600, 2)
    print(json.dumps(record.get("projection", {}), indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
