"""Stage `adapt_clip` (one per variant): adapt CLIP to masked images on mined pairs (paper §3.3, Table 3).

Modes: `mpt` (mask prompt tuning: only the prompts train, every CLIP weight frozen), `ft` (full
fine-tuning of the image tower, text tower locked). FT→MPT is `mpt` whose `init` is the `ft`
variant's output. Settings: `adapt_clip.common` ⊕ `adapt_clip.modes.<mode>` ⊕ `adapt_clip.variants.<name>`.

Outputs `<out>/<variant>/` as an adapted-CLIP directory (`ovseg_core.clip.adapted`), training log
for `dvc plots`, and metrics: trainable parameters, loss and zero-shot accuracy of masked crops of a
held-out set, seen vs unseen classes (the run record adds the resumed step, time and samples/s). Runs
where `compute` says: with `processes` > 1 the stage launches that many DDP ranks itself (one per GPU),
which share every batch; rank 0 writes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ovseg_core.atomic import atomic_dir
from ovseg_core.clip.adapted import load_adapted, weights_file, write_adapted
from ovseg_core.clip.models import save_clip
from ovseg_core.clip.mpt import save_prompts
from ovseg_core.clip.pairs import MinedPairSamples
from ovseg_core.clip.probe import probe_metrics
from ovseg_core.clip.train import ClipTrainConfig, train_clip
from ovseg_core.compute import ComputeConfig
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.distributed import launch, process_rank
from ovseg_core.errors import DataError
from stages.common import StageContext, file_digest, main, resumable_dir, training_figures, write_metrics

TRAIN_KEYS = {f for f in ClipTrainConfig.__dataclass_fields__}


def train_process(paths: dict[str, Any], variant: str, s: dict[str, Any], checkpoints: str,
                  compute: ComputeConfig) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """One training rank (or the only process); rank 0 writes the adapted CLIP and returns its training
    metrics and this run's figures (what it resumed, its time and throughput: they differ from run to
    run, so they are no metrics)."""
    torch.set_num_threads(compute.cpu_threads())
    config = ClipTrainConfig(**{k: v for k, v in s.items() if k in TRAIN_KEYS})
    base = load_adapted(s["init"], arch=paths["clip_arch"])
    if base.prompts is not None:
        raise ValueError(f"adapt_clip {variant}: init {s['init']} already has mask prompts; adapt from a CLIP "
                         "without prompts (original or fine-tuned)")
    samples = MinedPairSamples(Path(paths["pairs"]) / s["pairs"], base.bundle.image_size,
                               base.bundle.mean, base.bundle.std)
    if len(samples) == 0:
        raise DataError(Path(paths["pairs"]) / s["pairs"], "no mined pairs to adapt CLIP on (see the mine stage's "
                        "metrics: the proposal network may give no mask above the threshold)")
    t0 = time.perf_counter()
    result = train_clip(base.bundle, samples, config, checkpoints, log_path=Path(paths["plots"]) / f"{variant}.json",
                        compute=compute)
    train_s = time.perf_counter() - t0
    if process_rank() != 0:
        return None
    with atomic_dir(Path(paths["out"]) / variant) as tmp:
        if config.mode == "mpt":
            assert result.prompts is not None
            save_prompts(result.prompts, tmp / "prompts.pt", arch=paths["clip_arch"])
            # tmp and out are siblings, so the relative path written here stays right after the rename
            write_adapted(tmp, variant, paths["clip_arch"], weights_file(s["init"]), tmp / "prompts.pt")
        else:
            save_clip(base.bundle, tmp / "clip.pt")
            write_adapted(tmp, variant, paths["clip_arch"], tmp / "clip.pt", None)
    metrics = {
        "mode": config.mode,
        "pairs": len(samples),
        "steps": result.step,
        "trainable_params": result.trainable_params,
        "final_loss": float(result.log[-1]["loss"]) if result.log else None,
    }
    return metrics, training_figures(result.resumed_from_step, result.step, config.batch_size, train_s)


def run(ctx: StageContext) -> dict[str, Any]:
    variant, s = ctx.variant_params("adapt_clip")  # common ⊕ modes.<mode> ⊕ variants.<variant>
    s = ctx.seeded(s)
    paths = ctx.section("adapt_clip")
    compute = ctx.compute
    pairs = Path(paths["pairs"]) / s["pairs"]
    checkpoints = resumable_dir(Path(paths["checkpoints"]) / variant, {
        "settings": s, "init": file_digest(weights_file(s["init"])), "pairs": file_digest(pairs / "index.parquet"),
        "precision": compute.placement().precision})
    trained = launch(train_process, (paths, variant, s, str(checkpoints), compute), compute,
                     name=f"adapt_clip-{variant}")
    if trained is None:
        ctx.log.info("this node ran no rank 0: node 0 writes the adapted CLIP and metrics")
        return {}
    placement = compute.placement()
    torch.set_num_threads(compute.cpu_threads())
    adapted = load_adapted(Path(paths["out"]) / variant, device=placement.device)
    probe = probe_metrics(adapted, PreparedDataset.load(paths["probe_dataset"]), int(paths.get("probe_images", 100)),
                          placement=placement)
    metrics = {**trained[0], "processes": compute.world_size, **placement.describe(), **probe}
    write_metrics(Path(paths["metrics"]) / f"{variant}.json",
                  {k: metrics[k] for k in ("final_loss", "masked_acc", "masked_acc_unseen") if k in metrics}, metrics)
    ctx.publish_table("metrics", [{"key": k, "value": v} for k, v in metrics.items()],
                      f"CLIP adaptation {variant}")
    return {"variant": variant, **metrics, **trained[1]}


if __name__ == "__main__":
    main("adapt_clip")
