"""Stage `sweep`: the ensemble's scores over a λ × crop-mask-threshold grid on one held-out set, one CLIP.

Proposals run once per image, CLIP's crop scores once per image and threshold (`evaluation.sweep`);
image chunks fan out through `ctx.map` and their confusion matrices are summed.

Writes `<metrics>` (the best cell by `select`, flat scalars), `<plots>/grid.csv` (every cell, long
form) and `<plots>/heatmap.png` (the selected score over the grid, best cell framed).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on the machines that run the pipeline
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ovseg_core.atomic import atomic_dir, write_csv  # noqa: E402
from ovseg_core.datasets.prepared import PreparedDataset  # noqa: E402
from ovseg_core.evaluation import SweepResult, sweep  # noqa: E402
from stages.common import StageContext, main, write_metrics  # noqa: E402
from stages.evaluate import segmenter_for  # noqa: E402

SCORES = ("mIoU", "fwIoU", "pACC", "mACC", "seen_mIoU", "unseen_mIoU", "hIoU")


def sweep_unit(spec_json: str, unit: tuple[int, int]) -> SweepResult:
    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["torch_threads"]))
    segmenter, dataset = segmenter_for(spec_json, spec["name"])
    start, stop = unit
    return sweep(segmenter, dataset, spec["lambdas"], spec["thresholds"], seen_lambda=spec["seen_lambda"],
                 indices=range(start, stop), desc=f"sweep {start}-{stop - 1}",
                 loader_workers=spec["compute"]["loader_workers"], batch_images=int(spec["batch_images"]))


def best_cell(rows: list[dict[str, Any]], select: str) -> dict[str, Any]:
    """The row with the highest `select` score (undefined scores rank last; ties: the first in grid order)."""
    if select not in SCORES:
        raise KeyError(f"params.yaml sweep.select: {select!r} is not one of {list(SCORES)}")
    return max(rows, key=lambda r: -np.inf if r[select] is None else r[select])


def heatmap(path: Path, values: np.ndarray, lambdas: list[float], thresholds: list[float], select: str,
            title: str) -> None:
    """values [thresholds, lambdas] (NaN where undefined) as an annotated heat map; the best cell framed."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(lambdas), 1.2 + 0.5 * len(thresholds)), dpi=120)
    image = ax.imshow(values, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(lambdas)), [f"{v:g}" for v in lambdas])
    ax.set_yticks(range(len(thresholds)), [f"{v:g}" for v in thresholds])
    ax.set_xlabel("ensemble weight λ (0 = MaskFormer, 1 = CLIP)")
    ax.set_ylabel("crop mask threshold")
    ax.set_title(title, fontsize=9)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="black" if v > middle else "white")
    if finite.size:
        i, j = np.unravel_index(np.nanargmax(values), values.shape)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(image, ax=ax, label=select)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def run(ctx: StageContext) -> dict[str, Any]:
    s = ctx.section("sweep")
    root = Path(s["dataset"]).resolve()
    dataset = PreparedDataset.load(root)
    name = dataset.name
    spec = {
        "name": name,
        "proposal_net": str(Path(s["proposal_net"]).resolve()),
        "clip": str(Path(s["clip"]).resolve()),
        "clip_arch": s["clip_arch"],
        "compute": dataclasses.asdict(ctx.compute),
        # the evaluate stage's per-set layout, so that its model loading is shared
        "datasets": {name: {"root": str(root), "mask_threshold": float(s["thresholds"][0]),
                            "size": s.get("size"), "mode": s.get("mode", "resize")}},
        "lambdas": [float(v) for v in s["lambdas"]],
        "thresholds": [float(v) for v in s["thresholds"]],
        "seen_lambda": bool(s.get("seen_lambda", False)),
        "batch_images": int(s.get("batch_images", 8)),
        "torch_threads": ctx.unit_threads(),
    }
    select = s.get("select", "mIoU")
    chunk = int(s.get("chunk_images", 100))
    units = [(start, min(start + chunk, len(dataset))) for start in range(0, len(dataset), chunk)]
    parts = ctx.map(functools.partial(sweep_unit, json.dumps(spec, sort_keys=True)), units, desc="sweep")
    result = SweepResult.merge(parts)
    rows = result.rows(dataset.classes, dataset.seen)
    best = best_cell(rows, select)

    score = {(r["threshold"], r["lambda"]): r[select] for r in rows}
    values = np.array([[np.nan if score[t, lam] is None else score[t, lam] for lam in result.lambdas]
                       for t in result.thresholds])
    with atomic_dir(s["plots"]) as tmp:
        write_csv(tmp / "grid.csv", rows)
        heatmap(tmp / "heatmap.png", values, result.lambdas, result.thresholds, select,
                f"{select} of the ensemble on {name} ({s.get('variant', Path(s['clip']).name)}, "
                f"{result.images} images)")
    metrics = {"best_lambda": best["lambda"], "best_threshold": best["threshold"], "images": result.images,
               **{f"best_{k}": best[k] for k in SCORES}}
    write_metrics(s["metrics"], {k: metrics[k] for k in ("best_lambda", "best_threshold", "best_mIoU", "best_hIoU")},
                  metrics)
    ctx.publish_table("best-cell", [best], f"Best λ × threshold cell by {select} on {name}")
    return metrics


if __name__ == "__main__":
    main("sweep")
