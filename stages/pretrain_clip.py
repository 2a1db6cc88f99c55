"""Stage `pretrain_clip`: the CLIP that every later stage starts from.

* `pretrained: null` (the embedded world): train `arch` from scratch on image–caption pairs of a
  prepared caption set (the world's web split), the stand-in for OpenAI's pretraining; resumable
  from `checkpoints`; with `compute.processes` > 1 the stage launches that many DDP ranks itself.
* `pretrained: <open_clip tag or local file>` (the paper recipe): resolve the weights offline —
  a missing tag or file fails with `MissingWeightsError`, saying what to put where — and write
  them in the common format; nothing is trained.

Either way `out/clip.pt` is written with `save_clip`, and CLIP is probed zero-shot on a labelled
prepared set (every class region of its first `probe.images` images, vocabulary = its classes):
the whole image (labelled with its largest class), each region's tight box with surroundings, and
the region's masked crop (the OVSeg input) — accuracy in percent, overall and seen / unseen classes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ovseg_core.atomic import write_json
from ovseg_core.clip.models import ClipBundle, load_clip, save_clip
from ovseg_core.clip.train import ClipTrainConfig, train_clip
from ovseg_core.clip.zeroshot import zero_shot_accuracy
from ovseg_core.compute import ComputeConfig
from ovseg_core.distributed import launch, process_rank
from ovseg_core.clip.datasets import CaptionImageDataset, SegmentProbe, segment_probe
from ovseg_core.datasets.prepared import CAPTIONS_FILE, DATASET_FILE, PreparedDataset
from stages.common import StageContext, file_digest, main, resumable_dir, training_figures, write_metrics

CLIP_FILE = "clip.pt"
LOSS_FILE = "loss.json"
LOSS_WINDOW = 20  # steps averaged into the reported final loss (one batch's loss is noisy)


def train_process(p: dict[str, Any], checkpoints: str, compute: ComputeConfig
                  ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """One training rank (or the only process): the seeded random init, then training on the caption
    set; rank 0 writes the CLIP and returns the training metrics and this run's figures (what it
    resumed, its time and throughput: they differ from run to run, so they are no metrics)."""
    torch.set_num_threads(compute.cpu_threads())
    config = ClipTrainConfig(mode="pretrain", **p["train"])
    torch.manual_seed(int(p["train"].get("seed", 0)))  # the random initialisation
    bundle = load_clip(p["arch"])
    data = CaptionImageDataset.for_model(PreparedDataset.load(p["data"]), bundle, p.get("captions_per_image"))
    t0 = time.perf_counter()
    result = train_clip(bundle, data, config, checkpoints, log_path=Path(p["plots"]) / LOSS_FILE, compute=compute)
    train_s = time.perf_counter() - t0
    if process_rank() != 0:
        return None
    save_clip(bundle, Path(p["out"]) / CLIP_FILE)
    tail = result.log[-LOSS_WINDOW:]
    metrics = {
        "images": data.num_images,
        "pairs": len(data),
        "steps": result.step,
        "train_samples": result.step * config.batch_size,
        "final_loss": round(sum(r["loss"] for r in tail) / len(tail), 4),
        "logit_scale": round(float(bundle.model.logit_scale.detach().exp()), 2),
    }
    return metrics, training_figures(result.resumed_from_step, result.step, config.batch_size, train_s)


def pretrain(p: dict[str, Any], compute: ComputeConfig) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Train from scratch on `compute.processes` ranks (launched here); rank 0's `train_process` result."""
    data_root = Path(p["data"])
    checkpoints = resumable_dir(p["checkpoints"], {
        "arch": p["arch"], "captions_per_image": p.get("captions_per_image"), "train": p["train"],
        "data": [file_digest(data_root / DATASET_FILE), file_digest(data_root / CAPTIONS_FILE)],
        "precision": compute.placement().precision,
    })
    return launch(train_process, (p, str(checkpoints), compute), compute, name="pretrain_clip")


def probe_metrics(bundle: ClipBundle, probe: SegmentProbe) -> dict[str, Any]:
    seen, unseen = probe.names(True), probe.names(False)

    def pct(x: float) -> float | None:
        return None if x != x else round(100.0 * x, 2)  # NaN (no sample) -> null

    metrics: dict[str, Any] = {"probe_images": len(probe.scene_labels), "probe_regions": len(probe.segment_labels),
                               "chance_acc": round(100.0 / len(probe.classes), 2)}
    for view, images, labels in (("scene", probe.scenes, probe.scene_labels),
                                 ("box", probe.boxes, probe.segment_labels),
                                 ("masked", probe.masked, probe.segment_labels)):
        r = zero_shot_accuracy(bundle, images, None, labels, probe.classes)
        metrics |= {f"{view}_acc": pct(r.accuracy), f"{view}_acc_seen": pct(r.subset_accuracy(seen)),
                    f"{view}_acc_unseen": pct(r.subset_accuracy(unseen))}
    return metrics


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.section("pretrain_clip")
    p = {**p, "train": ctx.seeded(p["train"])}
    compute = ctx.compute
    out, plots = Path(p["out"]), Path(p["plots"])
    plots.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_figures: dict[str, Any] = {}
    if p.get("pretrained") is None:
        trained = pretrain(p, compute)
        if trained is None:
            ctx.log.info("this node ran no rank 0: node 0 writes the CLIP and metrics")
            return {}
        metrics: dict[str, Any] = {"source": "trained", **trained[0]}
        run_figures = trained[1]
        placement = compute.placement()
        bundle = load_clip(p["arch"], out / CLIP_FILE, device=placement.device)
    else:
        placement = compute.placement()
        bundle = load_clip(p["arch"], p["pretrained"], device=placement.device)  # MissingWeightsError says what
        Path(p["checkpoints"]).mkdir(parents=True, exist_ok=True)  # a declared out, unused here
        write_json(plots / LOSS_FILE, [], indent=None)
        save_clip(bundle, out / CLIP_FILE)
        metrics = {"source": "pretrained"}
    metrics["parameters"] = sum(t.numel() for t in bundle.model.parameters())
    run_figures["stage_train_s"] = round(time.perf_counter() - t0, 1)
    metrics |= {"processes": compute.world_size, **placement.describe()}

    probe_cfg = p.get("probe") or {}
    if int(probe_cfg.get("images", 0)) > 0:
        torch.set_num_threads(compute.cpu_threads())
        probe = segment_probe(PreparedDataset.load(probe_cfg["data"]), bundle.image_size, bundle.mean, bundle.std,
                              max_images=int(probe_cfg["images"]),
                              min_fraction=float(probe_cfg.get("min_fraction", 0.01)))
        with placement.autocast():
            metrics |= probe_metrics(bundle, probe)
    write_metrics(p["metrics"], {k: metrics[k] for k in ("final_loss", "masked_acc", "masked_acc_unseen") if k in metrics},
                  metrics)
    ctx.publish_table("metrics", [{"key": k, "value": v} for k, v in metrics.items()],
                      "CLIP pretraining: zero-shot accuracy (%) of whole scenes, boxes, masked crops")
    return {**metrics, **run_figures}


if __name__ == "__main__":
    main("pretrain_clip")
