"""Stage `train_maskformer`: the proposal network (paper §3.1) on the prepared COCO-Stuff form.

MaskFormer (transformers) whose class head is 100 · cosine against the frozen CLIP text features of
the training classes plus a learnable "no object" embedding. Resumes from `checkpoints/` after an
interruption. Runs where `compute` says (params.yaml): with `processes` > 1 the stage launches that
many DDP ranks itself (one per GPU; gloo on CPU), every rank builds the same model, and rank 0
writes the checkpoints and the model; with `nodes` > 1 the same command runs on every node.

Metrics: MaskFormer-only mIoU on part of the training split (seen classes) and on the held-out set
(seen / unseen / hIoU), so the proposal network's quality is known before mining.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.text import text_features
from ovseg_core.compute import ComputeConfig, Placement
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.distributed import launch, process_rank
from ovseg_core.inference import segment
from ovseg_core.maskformer.data import SemanticDataset
from ovseg_core.maskformer.model import OpenVocabMaskFormer, build_model, load_model, preset_config, save_model
from ovseg_core.maskformer.train import TrainConfig, train
from ovseg_core.metrics import evaluate_dataset
from ovseg_core.training.checkpoint import seed_everything
from stages.common import StageContext, main, training_figures, write_metrics

MODEL_FILE = "model.pt"


def maskformer_only_miou(model: OpenVocabMaskFormer, prepared: PreparedDataset, text: torch.Tensor, max_images: int,
                         placement: Placement) -> tuple[dict[str, Any], float]:
    """The scores and images/s of MaskFormer alone on `prepared`'s first `max_images` images."""
    model.set_vocabulary(text.to(placement.device))

    def predict(image):
        with placement.autocast():
            return segment(model, image).labels.cpu().numpy()

    metrics, _, ips = evaluate_dataset(prepared.head(max_images), predict,
                                       progress_desc=f"maskformer-only {prepared.name}")
    return metrics.to_dict(), round(ips, 1)


def train_process(p: dict[str, Any], compute: ComputeConfig) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """One training rank (or the only process): builds the model as every rank must, trains it; rank 0
    writes the model and returns the training metrics and this run's figures (what it resumed, its time
    and throughput: they differ from run to run, so they are no metrics)."""
    torch.set_num_threads(compute.cpu_threads())
    dataset = PreparedDataset.load(p["dataset"])
    clip = load_clip(p["clip_arch"], p["clip"])
    text = text_features(clip, dataset.classes)
    net = preset_config(p["preset"], **(p.get("net") or {}))
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["train"].items()})
    # the random initialisation: the same params give the same model; numpy's global generator too, which
    # training never draws from but whose state the checkpoint keeps (unseeded, it differed in every process)
    seed_everything(cfg.seed)
    model = build_model(net, text, backbone_weights=p.get("backbone_weights"))
    t0 = time.perf_counter()
    result = train(model, SemanticDataset(dataset), cfg, p["checkpoints"], log_path=p["plots"], compute=compute)
    train_s = time.perf_counter() - t0
    if process_rank() != 0:
        return None
    save_model(Path(p["out"]) / MODEL_FILE, model, meta={"classes": dataset.classes, "clip": p["clip"],
                                                        "preset": p["preset"], "train": p["train"]})
    return ({"final_loss": result.log[-1]["loss"] if result.log else None},
            training_figures(result.resumed_from_step, cfg.steps, cfg.batch_size, train_s))


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.section("train_maskformer")
    p = {**p, "train": ctx.seeded(p["train"])}
    compute = ctx.compute
    trained = launch(train_process, (p, compute), compute, name="train_maskformer")
    if trained is None:
        ctx.log.info("this node ran no rank 0: node 0 writes the model and metrics")
        return {}
    placement = compute.placement()
    torch.set_num_threads(compute.cpu_threads())
    model, _ = load_model(Path(p["out"]) / MODEL_FILE, placement.device)
    dataset = PreparedDataset.load(p["dataset"])
    clip = load_clip(p["clip_arch"], p["clip"], device=placement.device)
    n = int(p.get("eval_images", 200))
    metrics, run_figures = trained
    sets = [("train_split", dataset), *((d.name, d) for d in map(PreparedDataset.load, p.get("heldout") or []))]
    scores, ips = {}, {}
    for key, ds in sets:
        scores[key], ips[key] = maskformer_only_miou(model, ds, text_features(clip, ds.classes), n, placement)
    metrics = {"steps": int(p["train"]["steps"]), **metrics, "processes": compute.world_size, **placement.describe(),
               "parameters": sum(q.numel() for q in model.parameters()), **scores}
    run_figures["eval_images_per_s"] = ips
    write_metrics(p["metrics"], {"final_loss": metrics.get("final_loss"),
                                 **{key: {k: scores[key][k] for k in ("mIoU", "hIoU")} for key in scores}}, metrics)
    ctx.publish_table("metrics", [{"split": k, **v} for k, v in metrics.items() if isinstance(v, dict)],
                      "MaskFormer-only segmentation after training")
    return {"steps": metrics["steps"], "train_mIoU": metrics["train_split"]["mIoU"], **run_figures}


if __name__ == "__main__":
    main("train_maskformer")
