"""The COCO-sized profile (configs/embedded-coco-size.yaml): it is params.yaml but for its size, and a small
fraction of it runs end to end here (the full run is scripts/bench_coco_size.py: README "At COCO size"):
world → prepare → mine with the profile's settings, the index, sizes.json and card agreeing with the shards,
and both loaders (open_clip's webdataset loader, adapt_clip's data path) reading every pair once."""
from __future__ import annotations

import argparse
import copy
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from stages.common import StageContext, load_params, run_stage

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "configs" / "embedded-coco-size.yaml"
SIZE_KEYS = {"world.coco_images", "mine.common.images_per_unit"}  # what the profile changes, documented there
FRACTION_IMAGES = 2500


def flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, f"{key}.") if isinstance(v, dict) and v else {key: v})
    return out


def test_profile_is_params_yaml_but_for_its_size():
    profile, params = flat(yaml.safe_load(PROFILE.read_text())), flat(load_params(ROOT / "params.yaml"))
    assert profile.keys() == params.keys()
    assert {k for k in params if profile[k] != params[k]} == SIZE_KEYS
    assert profile["world.coco_images"] == 118_287 and profile["world.captions_per_image"] == 5


@pytest.mark.slow
def test_a_fraction_of_the_profile_mines_end_to_end(tiny_models, tmp_path):
    params = yaml.safe_load(PROFILE.read_text())
    params["world"]["coco_images"] = FRACTION_IMAGES
    params["world"]["web_images"] = 200  # the web split only feeds CLIP pretraining, not run here
    params["prefect"]["task_retries"] = 0
    params["mine"].update(clip=str(tiny_models.clip), proposal_net=str(tiny_models.proposal_net))
    params["compute"]["threads"] = 1
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(tmp_path)  # the profile's paths are relative, as under `dvc repro`
    try:
        for stage in ("world", "prepare"):
            run_stage(stage, StageContext(stage, copy.deepcopy(params)))
        summary = run_stage("mine", StageContext("mine", copy.deepcopy(params), "proposals-nouns"))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    out = tmp_path / params["mine"]["out"] / "proposals-nouns"
    per_unit = params["mine"]["common"]["images_per_unit"]
    assert summary["units"] == -(-summary["images"] // per_unit) >= 3 and summary["images"] >= 0.95 * FRACTION_IMAGES
    sizes = json.loads((out / "sizes.json").read_text())
    index = pq.read_table(out / "index.parquet", columns=["shard", "key", "noun"])
    assert sum(sizes.values()) == index.num_rows == summary["pairs"] > 2 * FRACTION_IMAGES
    assert Counter(index.column("shard").to_pylist()) == Counter(sizes)
    assert f"| pairs | {summary['pairs']} |" in (out / "README.md").read_text()

    from scripts.bench_coco_size import loader_pass

    for kind in ("open_clip", "adapt_clip"):
        loader_pass(argparse.Namespace(kind=kind, shards=out, clip_arch=tiny_models.clip_arch))
