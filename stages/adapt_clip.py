"""Stage `adapt_clip` (one per variant): adapt CLIP to masked images on mined pairs (paper §3.3, Table 3).

Modes: `mpt` (mask prompt tuning: only the prompts train, every CLIP weight frozen), `ft` (full
fine-tuning of the image tower, text tower locked). FT→MPT is `mpt` whose `init` is the `ft`
variant's output. Settings: `adapt_clip.common` ⊕ `adapt_clip.modes.<mode>` ⊕ `adapt_clip.variants.<name>`.

Outputs `<out>/<variant>/` as an adapted-CLIP directory (`ovseg_core.clip.adapted`), training log
for `dvc plots`, and metrics: trainable parameters, loss, samples/s and zero-shot accuracy of masked
crops of a held-out set, seen vs unseen classes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ovseg_core.atomic import atomic_dir, write_json
from ovseg_core.clip.adapted import load_adapted, weights_file, write_adapted
from ovseg_core.clip.models import save_clip
from ovseg_core.clip.mpt import save_prompts
from ovseg_core.clip.pairs import MinedPairSamples
from ovseg_core.clip.probe import probe_metrics
from ovseg_core.clip.train import ClipTrainConfig, train_clip
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.errors import DataError
from stages.common import StageContext, file_digest, main, resumable_dir

TRAIN_KEYS = {f for f in ClipTrainConfig.__dataclass_fields__}


def settings(ctx: StageContext) -> tuple[str, dict[str, Any]]:
    section = ctx.section("adapt_clip")
    variant = ctx.variant
    if variant not in (section.get("variants") or {}):
        raise KeyError(f"params.yaml adapt_clip.variants has no {variant!r}; known: {sorted(section['variants'])}")
    chosen = section["variants"][variant]
    mode = chosen.get("mode")
    if mode not in (section.get("modes") or {}):
        raise KeyError(f"adapt_clip.variants.{variant}.mode must be one of {sorted(section['modes'])}, got {mode!r}")
    return variant, {**(section.get("common") or {}), **section["modes"][mode], **chosen}


def run(ctx: StageContext) -> dict[str, Any]:
    variant, s = settings(ctx)
    paths = ctx.section("adapt_clip")
    config = ClipTrainConfig(**{k: v for k, v in s.items() if k in TRAIN_KEYS})
    torch.set_num_threads(int(s.get("torch_threads", 2)))

    base = load_adapted(s["init"], arch=paths["clip_arch"])
    if base.prompts is not None:
        raise ValueError(f"adapt_clip {variant}: init {s['init']} already has mask prompts; adapt from a CLIP "
                         "without prompts (original or fine-tuned)")
    samples = MinedPairSamples(Path(paths["pairs"]) / s["pairs"], base.bundle.image_size,
                               base.bundle.mean, base.bundle.std)
    if len(samples) == 0:
        raise DataError(Path(paths["pairs"]) / s["pairs"], "no mined pairs to adapt CLIP on (see the mine stage's "
                        "metrics: the proposal network may give no mask above the threshold)")
    out = Path(paths["out"]) / variant
    plots = Path(paths["plots"]) / f"{variant}.json"
    t0 = time.perf_counter()
    checkpoints = resumable_dir(Path(paths["checkpoints"]) / variant, {
        "settings": s, "init": file_digest(weights_file(s["init"])),
        "pairs": file_digest(Path(paths["pairs"]) / s["pairs"] / "index.parquet")})
    result = train_clip(base.bundle, samples, config, checkpoints, log_path=plots)
    train_s = time.perf_counter() - t0

    with atomic_dir(out) as tmp:
        if config.mode == "mpt":
            assert result.prompts is not None
            save_prompts(result.prompts, tmp / "prompts.pt", arch=paths["clip_arch"])
            # tmp and out are siblings, so the relative path written here stays right after the rename
            write_adapted(tmp, variant, paths["clip_arch"], weights_file(s["init"]), tmp / "prompts.pt")
        else:
            save_clip(base.bundle, tmp / "clip.pt")
            write_adapted(tmp, variant, paths["clip_arch"], tmp / "clip.pt", None)
    adapted = load_adapted(out)

    probe = probe_metrics(adapted, PreparedDataset.load(paths["probe_dataset"]), int(paths.get("probe_images", 100)))
    metrics = {
        "mode": config.mode,
        "pairs": len(samples),
        "steps": result.step,
        "trainable_params": result.trainable_params,
        "final_loss": float(result.log[-1]["loss"]) if result.log else None,
        "samples_per_s": round(config.batch_size * config.steps / max(train_s, 1e-9), 1),
        **probe,
    }
    write_json(Path(paths["metrics"]) / f"{variant}.json", metrics)
    ctx.publish_table("metrics", [{"key": k, "value": v} for k, v in metrics.items()],
                      f"CLIP adaptation {variant}")
    return {"variant": variant, **metrics}


if __name__ == "__main__":
    main("adapt_clip")
