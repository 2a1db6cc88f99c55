"""Check a params file before any stage starts, and select a recipe.

    python -m stages.validate                                   # check params.yaml
    python -m stages.validate --use configs/paper-swinb-vitl14.yaml   # check it, then make it params.yaml

Everything a run needs from outside the pipeline is checked at once — the GPUs the compute section
asks for, dataset roots in their official layouts, CLIP weights (open_clip tag in the local cache, or
a file), MaskFormer backbone weights, NLTK data for the chosen tagger — and reported in ONE error
listing every missing item and what to put where. Paths the pipeline itself produces (the embedded world) are not required.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ovseg_core.compute import ComputeConfig, ComputeError
from ovseg_core.datasets.registry import DATASETS
from ovseg_core.errors import MissingWeightsError
from ovseg_core.nouns import NounConfig, NounExtractor
from stages.common import PARAMS_FILE, load_params
from stages.prepare import EVAL_DIR


def produced_by_pipeline(path: str, params: dict[str, Any]) -> bool:
    world_out = params.get("world", {}).get("out")
    return bool(world_out) and Path(path).is_relative_to(Path(world_out))


def check_compute(params: dict[str, Any]) -> list[str]:
    """The compute section (and every stage's override) resolves on this machine: a GPU where CUDA is
    asked for, no more processes than GPUs on CUDA."""
    problems = []
    overrides = (params.get("compute") or {}).get("stages") or {}
    for where, stage, variant in [("compute", "", None),
                                  *((f"compute.stages.{k}", *k.partition("@")[::2]) for k in overrides)]:
        try:
            compute = ComputeConfig.for_stage(params, stage, variant or None)
            device = compute.placement().device
        except (ComputeError, ValueError, TypeError) as e:
            problems.append(f"{where}: {e}")
            continue
        gpus = torch.cuda.device_count()
        if device.type == "cuda" and device.index is None and compute.processes > gpus:
            problems.append(f"{where}: {compute.processes} processes per node asked for, but {gpus} GPU(s) are visible "
                            "(one process per GPU; set processes to auto or at most the GPU count)")
    return problems


def check_tracked_roots(params: dict[str, Any]) -> list[str]:
    """Sets a stage reads lie inside the folder dvc.yaml declares as its dep, so that DVC reruns it when they
    change: held-out sets in `<prepare.out>/eval`, evaluation sets in `evaluate.common.prepared`."""
    problems = []
    eval_root = Path((params.get("prepare") or {}).get("out", "data/prepared")) / EVAL_DIR
    for path in (params.get("train_maskformer") or {}).get("heldout") or []:
        if not Path(path).is_relative_to(eval_root):
            problems.append(f"train_maskformer.heldout: {path} is not inside {eval_root}, the folder of evaluation "
                            "sets that dvc.yaml declares as the stage's dep (prepare writes them there)")
    common = (params.get("evaluate") or {}).get("common") or {}
    for name, entry in (common.get("datasets") or {}).items():
        root = (entry or {}).get("root")
        if root and common.get("prepared") and not Path(root).is_relative_to(Path(common["prepared"])):
            problems.append(f"evaluate.common.datasets.{name}.root: {root} is not inside evaluate.common.prepared "
                            f"({common['prepared']}), the folder dvc.yaml declares as the evaluate stages' dep")
    return problems


def check(params: dict[str, Any]) -> list[str]:
    """Every problem found (empty when the run can start)."""
    problems: list[str] = check_compute(params) + check_tracked_roots(params)
    prepare = params.get("prepare", {})
    entries = [("prepare.train", prepare.get("train"))]
    if prepare.get("web"):
        entries.append(("prepare.web", prepare["web"]))
    for section in ("captioned", "eval"):
        entries += [(f"prepare.{section}.{name}", entry) for name, entry in (prepare.get(section) or {}).items()]
    for where, entry in entries:
        if not entry:
            problems.append(f"{where}: missing")
            continue
        if entry.get("reader") not in DATASETS:
            problems.append(f"{where}.reader: unknown reader {entry.get('reader')!r} (known: {', '.join(DATASETS)})")
            continue
        root = str(entry.get("root"))
        if not produced_by_pipeline(root, params) and not Path(root).is_dir():
            problems.append(f"{where}: dataset root {root} not found; expected "
                            f"{DATASETS[entry['reader']].description}")
    for variant, settings in ((params.get("mine") or {}).get("variants") or {}).items():
        mask_file = (settings or {}).get("mask_file")
        if mask_file and not Path(mask_file).is_file():
            problems.append(f"mine.variants.{variant}.mask_file: {mask_file} not found (a COCO RLE JSON of your "
                            "masks; see README 'Bring your own masks')")
    clip = params.get("pretrain_clip", {})
    if clip.get("pretrained"):
        from ovseg_core.clip.models import resolve_pretrained  # here: open_clip's import is 3-6 s of the check

        try:
            resolve_pretrained(clip["arch"], clip["pretrained"])
        except (MissingWeightsError, ValueError) as e:
            problems.append(f"pretrain_clip.pretrained: {e}")
    weights = params.get("train_maskformer", {}).get("backbone_weights")
    if weights and not Path(weights).is_file():
        problems.append(f"train_maskformer.backbone_weights: {weights} not found (a Swin-B / ResNet-101 ImageNet "
                        "checkpoint; see README 'Paper recipe')")
    nouns = (params.get("mine", {}).get("common") or {}).get("nouns") or {}
    tagger = str(nouns.get("tagger", "nltk-default"))
    if not tagger.startswith("trained:"):  # a trained tagger's corpus is produced by the world stage
        try:
            NounExtractor(NounConfig.from_dict(nouns)).nouns("a dog on the grass")
        except Exception as e:  # noqa: BLE001 - report any missing NLTK resource with its install command
            problems.append(f"mine.common.nouns: {e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", nargs="?", default=str(PARAMS_FILE))
    parser.add_argument("--use", metavar="RECIPE", help="validate RECIPE, then copy it over params.yaml")
    args = parser.parse_args(argv)
    path = Path(args.use or args.params)
    problems = check(load_params(path))
    if problems:
        print(f"{path}: this run cannot start; provide:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    if args.use:
        shutil.copyfile(path, PARAMS_FILE)
        print(f"{path} is valid and is now {PARAMS_FILE}; run `python -m flows.pipeline` (or `dvc repro`)")
    else:
        print(f"{path}: everything the run needs is in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
