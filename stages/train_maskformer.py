"""Stage `train_maskformer`: the proposal network (paper §3.1) on the prepared COCO-Stuff form.

MaskFormer (transformers) whose class head is 100 · cosine against the frozen CLIP text features of
the training classes plus a learnable "no object" embedding. Resumes from `checkpoints/` after an
interruption. Multi-GPU: `torchrun --nproc_per_node N -m stages.train_maskformer` (DDP; rank 0 writes).

Metrics: MaskFormer-only mIoU on part of the training split (seen classes) and on the held-out set
(seen / unseen / hIoU), so the proposal network's quality is known before mining.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ovseg_core.atomic import write_json
from ovseg_core.clip.models import load_clip
from ovseg_core.clip.text import text_features
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.inference import segment
from ovseg_core.maskformer.data import SemanticDataset
from ovseg_core.maskformer.model import build_model, preset_config, save_model
from ovseg_core.maskformer.train import TrainConfig, process_rank, train
from ovseg_core.metrics import evaluate_dataset
from stages.common import StageContext, main


def maskformer_only_miou(model, prepared: PreparedDataset, text: torch.Tensor, max_images: int) -> dict[str, Any]:
    model.set_vocabulary(text)
    metrics, _, ips = evaluate_dataset(prepared.head(max_images), lambda image: segment(model, image).labels.numpy(),
                                       progress_desc=f"maskformer-only {prepared.name}")
    return {**metrics.to_dict(), "images_per_s": round(ips, 1)}


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.section("train_maskformer")
    torch.set_num_threads(int(p.get("torch_threads", 2)))
    dataset = PreparedDataset.load(p["dataset"])
    clip = load_clip(p["clip_arch"], p["clip"])
    text = text_features(clip, dataset.classes)
    net = preset_config(p["preset"], **(p.get("net") or {}))
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["train"].items()})
    torch.manual_seed(cfg.seed)  # the random initialisation: the same params give the same model
    model = build_model(net, text, backbone_weights=p.get("backbone_weights"))
    t0 = time.perf_counter()
    log = train(model, SemanticDataset(dataset), cfg, p["checkpoints"], log_path=p["plots"])
    train_s = time.perf_counter() - t0
    if process_rank() != 0:
        return {}
    save_model(Path(p["out"]) / "model.pt", model, meta={"classes": dataset.classes, "clip": p["clip"],
                                                        "preset": p["preset"], "train": p["train"]})
    model.eval()
    n = int(p.get("eval_images", 200))
    metrics: dict[str, Any] = {
        "steps": cfg.steps, "train_s": round(train_s, 1), "final_loss": log[-1]["loss"] if log else None,
        "parameters": sum(q.numel() for q in model.parameters()),
        "train_split": maskformer_only_miou(model, dataset, text, n),
    }
    for name in p.get("heldout") or []:
        held = PreparedDataset.load(name)
        metrics[held.name] = maskformer_only_miou(model, held, text_features(clip, held.classes), n)
    write_json(p["metrics"], metrics)
    ctx.publish_table("metrics", [{"split": k, **v} for k, v in metrics.items() if isinstance(v, dict)],
                      "MaskFormer-only segmentation after training")
    return {"steps": cfg.steps, "train_s": metrics["train_s"], "train_mIoU": metrics["train_split"]["mIoU"]}


if __name__ == "__main__":
    main("train_maskformer")
