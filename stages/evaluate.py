"""Stage `evaluate` (one per CLIP variant): zero-shot segmentation scores of MaskFormer only, CLIP only and
the ensemble on every evaluation set, from one pass of proposals and CLIP crop scores per image.

The variant's CLIP is `evaluate.variants.<variant>.clip`: an adapted-CLIP directory, or the pretrained
CLIP checkpoint for `original`. Each set's vocabulary is its class names through the ViLD templates
with that CLIP's (frozen) text tower. Images are cut into chunks that fan out through `ctx.map` and
whose confusion matrices are summed.

Writes
- `<metrics>/<variant>.json`: {dataset: {mIoU, hIoU}} of the ensemble; beside it, the details
  {dataset: {branch: {mIoU, fwIoU, pACC, mACC, seen_mIoU, unseen_mIoU, hIoU, <each of the last four>_se, images}}}
  where `_se` is the bootstrap standard error over the images (`metrics.bootstrap_se`: how much the score would
  move on another draw of evaluation images of the same kind); images/s, of each branch alone and of all three
  together, are this run's figures: in the summary;
- `<plots>/<variant>/per-class/<dataset>.csv` (class, seen, IoU per branch) and
  `<plots>/<variant>/confusion/<dataset>.csv` (the ensemble's `confusion_plot_rows`), one directory per
  kind so that dvc.yaml gives each kind its template once;
- `<predictions>/<variant>/<dataset>/`: the first `examples` images, their ground truth and each branch's
  raw label PNG, with `index.json`, for the report's qualitative figure.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ovseg_core.atomic import atomic_dir, write_csv, write_json
from ovseg_core.clip.adapted import AdaptedClip, load_adapted
from ovseg_core.compute import ComputeConfig, worker_placement
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.evaluation import BRANCHES, BranchResult, BranchSegmenter, evaluate_branches
from ovseg_core.maskformer.model import load_model
from ovseg_core.metrics import confusion_plot_rows
from ovseg_core.visualize import EXAMPLES_INDEX, save_label_png
from stages.common import StageContext, main, write_metrics

# Per-set settings that a dataset entry may override (e.g. λ 0.7 for ADE, 0.6 for Pascal Context).
DATASET_KEYS = ("lambda", "mask_threshold", "seen_lambda", "size", "mode")


def dataset_settings(settings: dict[str, Any], name: str) -> dict[str, Any]:
    """One evaluation set's settings: its root (default `<prepared>/<name>`) and the common values of
    `DATASET_KEYS`, overridden by the set's own entry."""
    entry = settings["datasets"][name] or {}
    unknown = set(entry) - {"root", *DATASET_KEYS}
    if unknown:
        raise KeyError(f"params.yaml evaluate datasets.{name}: unknown keys {sorted(unknown)}")
    merged = {k: settings.get(k) for k in DATASET_KEYS} | entry
    merged.setdefault("root", Path(settings["prepared"]) / name)
    merged["root"] = str(Path(merged["root"]).resolve())
    if merged["lambda"] is None or merged["mask_threshold"] is None:
        raise KeyError(f"params.yaml evaluate: no lambda / mask_threshold for dataset {name}")
    return merged


@functools.lru_cache(maxsize=2)
def clip_for(path: str, arch: str, device: str) -> AdaptedClip:
    return load_adapted(path, arch, device)


_building = threading.Lock()


def segmenter_for(spec_json: str, name: str) -> tuple[BranchSegmenter, PreparedDataset]:
    """One proposal network per dataset (each holds that set's vocabulary), so that units of different
    sets can run side by side in threads; the CLIP is shared. Built once per process (threads wait)."""
    with _building:
        return _segmenter(spec_json, name)


@functools.lru_cache(maxsize=8)
def _segmenter(spec_json: str, name: str) -> tuple[BranchSegmenter, PreparedDataset]:
    spec = json.loads(spec_json)
    ds = spec["datasets"][name]
    dataset = PreparedDataset.load(ds["root"])
    placement = worker_placement(ComputeConfig.from_dict(spec["compute"]))  # this process's GPU on CUDA
    model, _ = load_model(spec["proposal_net"], placement.device)
    adapted = clip_for(spec["clip"], spec["clip_arch"], str(placement.device))
    segmenter = BranchSegmenter.build(model, adapted, dataset.classes, ds["mask_threshold"], ds["size"], ds["mode"],
                                      placement)
    return segmenter, dataset


def evaluate_unit(spec_json: str, unit: tuple[str, int, int]) -> BranchResult:
    """Evaluate images start..stop-1 of one set (a `ctx.map` work unit)."""
    name, start, stop = unit
    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["torch_threads"]))
    segmenter, dataset = segmenter_for(spec_json, name)
    ds = spec["datasets"][name]
    return evaluate_branches(segmenter, dataset, float(ds["lambda"]), seen_lambda=bool(ds["seen_lambda"]),
                             indices=range(start, stop), keep_examples=int(spec["examples"]),
                             desc=f"{name} {start}-{stop - 1}", loader_workers=spec["compute"]["loader_workers"],
                             batch_images=int(spec["batch_images"]))


def metrics_entry(result: BranchResult, dataset: PreparedDataset) -> dict[str, Any]:
    """Per branch the scores, their bootstrap standard errors over the images (`<score>_se`) and the image count."""
    errors = result.standard_errors(dataset.seen)
    return {b: {**m.to_dict(), **{f"{k}_se": v for k, v in errors[b].items()}, "images": result.images}
            for b, m in result.metrics(dataset.classes, dataset.seen).items()}


def images_per_s(result: BranchResult) -> dict[str, float]:
    """Each branch's images/s alone, and `all` three together."""
    return {**{b: round(result.images_per_s(b), 2) for b in BRANCHES}, "all": round(result.images_per_s(), 2)}


def per_class_rows(result: BranchResult, dataset: PreparedDataset) -> list[dict[str, Any]]:
    per_branch = result.metrics(dataset.classes, dataset.seen)
    rows = []
    for c, (name, seen) in enumerate(zip(dataset.classes, dataset.seen)):
        row: dict[str, Any] = {"class": name, "seen": seen}
        for b in BRANCHES:
            iou = per_branch[b].iou[c]
            row[b] = None if np.isnan(iou) else round(float(iou), 4)
        rows.append(row)
    return rows


def write_examples(directory: Path, result: BranchResult, dataset: PreparedDataset, lam: float) -> None:
    samples = []
    for ex in result.examples:
        sub = f"{ex.index:05d}"
        (directory / sub).mkdir(parents=True)
        Image.fromarray(ex.image).save(directory / sub / "image.png")
        save_label_png(directory / sub / "gt.png", ex.label, dataset.ignore_label)
        for branch, labels in ex.predictions.items():
            save_label_png(directory / sub / f"{branch}.png", labels, dataset.ignore_label)
        samples.append({"index": ex.index, "id": ex.id, "image": f"{sub}/image.png", "label": f"{sub}/gt.png",
                        "predictions": {b: f"{sub}/{b}.png" for b in ex.predictions}})
    write_json(directory / EXAMPLES_INDEX, {"dataset": dataset.name, "classes": dataset.classes,
                                            "seen": dataset.seen, "ignore_label": dataset.ignore_label,
                                            "lambda": lam, "samples": samples})


def run(ctx: StageContext) -> dict[str, Any]:
    variant, settings = ctx.variant_params("evaluate")
    datasets = {name: dataset_settings(settings, name) for name in settings["datasets"]}
    spec = {
        # absolute paths: the spec keys the per-process model caches and travels to the workers
        "proposal_net": str(Path(settings["proposal_net"]).resolve()),
        "clip": str(Path(settings["clip"]).resolve()),
        "clip_arch": settings["clip_arch"],
        "compute": dataclasses.asdict(ctx.compute),
        "datasets": datasets,
        "examples": int(settings.get("examples", 0)),
        "batch_images": int(settings.get("batch_images", 8)),
        "torch_threads": ctx.unit_threads(),
    }
    spec_json = json.dumps(spec, sort_keys=True)
    chunk = int(settings.get("chunk_images", 100))
    loaded = {name: PreparedDataset.load(ds["root"]) for name, ds in datasets.items()}
    units = [(name, start, min(start + chunk, len(d)))
             for name, d in loaded.items() for start in range(0, len(d), chunk)]
    ctx.log.info("evaluate %s: %d sets, %d units of up to %d images", variant, len(loaded), len(units), chunk)
    parts = ctx.map(functools.partial(evaluate_unit, spec_json), units, desc=f"evaluate {variant}")

    metrics, speed, table = {}, {}, []
    plots_dir, pred_dir = Path(settings["plots"]) / variant, Path(settings["predictions"]) / variant
    with atomic_dir(plots_dir) as plots_tmp, atomic_dir(pred_dir) as pred_tmp:
        for name, dataset in loaded.items():
            result = BranchResult.merge([p for u, p in zip(units, parts) if u[0] == name])
            metrics[name] = metrics_entry(result, dataset)
            speed[name] = images_per_s(result)
            write_csv(plots_tmp / "per-class" / f"{name}.csv", per_class_rows(result, dataset))
            write_csv(plots_tmp / "confusion" / f"{name}.csv",
                      confusion_plot_rows(result.confusion["ensemble"], dataset.classes))
            write_examples(pred_tmp / name, result, dataset, float(datasets[name]["lambda"]))
            table += [{"dataset": name, "branch": b, "lambda": datasets[name]["lambda"] if b == "ensemble" else None,
                       **{k: metrics[name][b][k] for k in ("mIoU", "seen_mIoU", "unseen_mIoU", "hIoU")}}
                      for b in BRANCHES]
    write_metrics(Path(settings["metrics"]) / f"{variant}.json",
                  {name: {k: m["ensemble"][k] for k in ("mIoU", "hIoU")} for name, m in metrics.items()}, metrics)
    ctx.publish_table("scores", table, f"Zero-shot scores with CLIP variant {variant}")
    return {"variant": variant, **{f"{name}_{b}_mIoU": metrics[name][b]["mIoU"] for name in metrics for b in BRANCHES},
            **{f"{name}_images_per_s": speed[name]["all"] for name in speed}, "images_per_s": speed}


if __name__ == "__main__":
    main("evaluate")
