"""Accuracy and latency of `ovseg segment` itself on a prepared evaluation set.

Runs the CLI (in-process, `ovseg_core.cli.main`: the code path of the `ovseg` command) on the first N
images of a prepared set with the set's full vocabulary — its ground-truth class names, seen and
unseen — read back the label PNGs the CLI wrote, and scores them against the ground truth with
`ovseg_core.metrics` (mIoU, seen/unseen mIoU, hIoU, pixel accuracy). Latency is the CLI's own
per-image figure from each `<stem>.json` (segmentation only, model loading excluded; the first image
also pays for encoding the vocabulary's text features, which are cached after).

    python scripts/bench_segment.py --models models --eval data/prepared/eval/world-eval --n 50

`cli_miou` is what an end-to-end test calls to hold the CLI to an accuracy floor.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ovseg_core.atomic import write_text
from ovseg_core.cli import main as ovseg_main
from ovseg_core.cli import output_paths
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.metrics import ConfusionMatrix


def cli_miou(models_dir: str | Path, prepared_eval_dir: str | Path, n_images: int, *,
             clip_variant: str = "ft-mpt", lam: float | None = None, threshold: float | None = None) -> dict[str, Any]:
    """Segment the first `n_images` of the prepared set with the CLI and score its label maps."""
    dataset = PreparedDataset.load(prepared_eval_dir)
    count = min(n_images, len(dataset))
    if count < 1:
        raise ValueError(f"{prepared_eval_dir}: no images to segment (n_images={n_images}, {len(dataset)} samples)")
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        tmp = Path(tmp)
        # Link each image under its (unique) sample id, so output stems never collide.
        images = []
        for i, sample in enumerate(dataset.samples[:count]):
            source = dataset.image_path(i).resolve()
            link = tmp / "images" / f"{sample.id}{source.suffix}"
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(source)
            images.append(link)
        classes_file = tmp / "classes.txt"
        classes_file.write_text("".join(f"{name}\n" for name in dataset.classes))
        out = tmp / "out"
        argv = ["segment", *map(str, images), "--classes-file", str(classes_file), "--model", str(models_dir),
                "--clip-variant", clip_variant, "--out", str(out)]
        argv += ["--lam", str(lam)] if lam is not None else []
        argv += ["--threshold", str(threshold)] if threshold is not None else []
        status = ovseg_main(argv)
        if status != 0:
            raise RuntimeError(f"`ovseg {' '.join(argv)}` exited with status {status}")
        cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_label)
        latencies = []
        for i, (sample, image) in enumerate(zip(dataset.samples[:count], images)):
            files = output_paths(out, image.stem)
            record = json.loads(files["json"].read_text())
            if record["classes"] != dataset.classes:
                raise RuntimeError(f"{files['json']}: the CLI changed the class list to {record['classes']}")
            prediction = np.asarray(Image.open(files["labels"]), dtype=np.int64)
            cm.update(prediction, dataset.load_label(i), source=dataset.root / sample.label)
            latencies.append(record["latency_s"])
    metrics = cm.metrics(dataset.classes, dataset.seen)
    return {
        **metrics.to_dict(),
        "images": count,
        "classes": dataset.num_classes,
        "seen_classes": int(sum(dataset.seen)),
        "clip_variant": clip_variant,
        "latency_s_first": latencies[0],  # includes encoding the vocabulary's text features (cached after)
        "latency_s_mean": statistics.fmean(latencies),
        "latency_s_median": statistics.median(latencies),
        "latency_s_max": max(latencies),
        "iou_by_class": {k: None if v is None else round(v, 4) for k, v in metrics.iou_by_class().items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="a run's models/ directory")
    parser.add_argument("--eval", type=Path, default=Path("data/prepared/eval/world-eval"),
                        help="prepared evaluation set")
    parser.add_argument("--n", type=int, default=50, help="number of images (the first N)")
    parser.add_argument("--clip-variant", default="ft-mpt")
    parser.add_argument("--lam", type=float)
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    result = cli_miou(args.models, args.eval, args.n, clip_variant=args.clip_variant, lam=args.lam,
                      threshold=args.threshold)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
