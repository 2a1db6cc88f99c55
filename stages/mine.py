"""Stage `mine` (one per variant): mask–category pairs as WebDataset shards (DESIGN.md §4).

Units (shards) are mined into a persistent work directory, `<work>/<variant>`, that survives a crash:
a rerun keeps every complete shard and mines only the rest. The work directory is tied to a
fingerprint of everything that decides the pairs (mining settings, models, dataset); when that
changes, it starts afresh. When all units are complete, the shards are linked into the DVC out
`<out>/<variant>` with sizes.json, the parquet index and the dataset card.

Units fan out through `ctx.map`: Prefect tasks with retries on a thread pool, on `compute.processes`
worker processes (one GPU each on CUDA), or on Dask workers (`prefect.task_runner: dask`), each
process loading the models once onto its device. A unit streams its images through the miner
(`ovseg_core.mining`), so its memory does not grow with `images_per_unit`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ovseg_core.atomic import atomic_dir
from ovseg_core.clip.models import load_clip
from ovseg_core.compute import ComputeConfig, worker_placement
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.maskformer.model import load_model, read_meta
from ovseg_core.mining import Miner, MiningConfig
from ovseg_core.shards import INDEX_FILE, completed_units, finalize_dataset, shard_name, stats_name
from stages.common import StageContext, file_digest, main, per_second, resumable_dir, write_metrics


_building = threading.Lock()


def miner_for(spec_json: str) -> Miner:
    """One Miner per process and spec: threads share it (the first builds it while the others wait); each
    worker process builds its own, on its own GPU."""
    with _building:
        return _miner(spec_json)


@functools.lru_cache(maxsize=2)
def _miner(spec_json: str) -> Miner:
    spec = json.loads(spec_json)
    cfg = MiningConfig.from_dict(spec["mining"])
    compute = ComputeConfig.from_dict(spec["compute"])
    placement = worker_placement(compute)
    clip = load_clip(spec["clip_arch"], spec["clip"], device=placement.device)
    net = load_model(spec["proposal_net"], placement.device)[0] if cfg.masks == "proposals" else None
    return Miner(cfg, PreparedDataset.load(spec["dataset"]), clip, net, placement, compute.loader_workers)


def mine_unit(spec_json: str, work: str, unit: int) -> dict[str, int]:
    torch.set_num_threads(int(json.loads(spec_json)["torch_threads"]))
    return miner_for(spec_json).mine_unit(unit, work)


def fingerprint(spec: dict[str, Any], precision: str) -> dict[str, Any]:
    """What decides the pairs (not where they are computed): settings, models, data and precision."""
    files = {k: file_digest(spec[k]) for k in ("clip", "proposal_net") if spec.get(k) and Path(spec[k]).is_file()}
    if spec["mining"].get("mask_file") and Path(spec["mining"]["mask_file"]).is_file():
        files["mask_file"] = file_digest(spec["mining"]["mask_file"])
    files["dataset"] = file_digest(Path(spec["dataset"]) / "dataset.json")
    return {"mining": spec["mining"], "clip_arch": spec["clip_arch"], "files": files, "precision": precision}


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def mining_spec(ctx: StageContext) -> dict[str, Any]:
    """Everything a unit worker needs to build the miner (JSON: it travels to worker processes)."""
    _, settings = ctx.variant_params("mine")
    paths = ctx.section("mine")
    return {
        "mining": settings,
        "dataset": paths["dataset"],
        "clip_arch": paths["clip_arch"],
        "clip": paths["clip"],
        "proposal_net": paths["proposal_net"],
        "compute": dataclasses.asdict(ctx.compute),
        "torch_threads": ctx.unit_threads(),
    }


def run(ctx: StageContext) -> dict[str, Any]:
    variant, settings = ctx.variant_params("mine")
    paths = ctx.section("mine")
    compute = ctx.compute
    spec = mining_spec(ctx)
    fp = fingerprint(spec, compute.placement().precision)
    work = resumable_dir(Path(paths["work"]) / variant, fp)
    out = Path(paths["out"]) / variant

    cfg = MiningConfig.from_dict(settings)
    dataset = PreparedDataset.load(paths["dataset"])
    num_units = cfg.num_units(len(dataset))
    done = set(completed_units(work))
    todo = [u for u in range(num_units) if u not in done]
    ctx.log.info("mine %s: %d units, %d already complete, %d to mine (%d process(es), %s)", variant, num_units,
                 len(done), len(todo), compute.processes, compute.device)
    spec_json = json.dumps(spec, sort_keys=True)
    t0 = time.perf_counter()
    ctx.map(functools.partial(mine_unit, spec_json, str(work)), todo, desc=f"mine {variant} units")
    mine_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        for unit in range(num_units):
            for name in (shard_name(unit), stats_name(unit)):
                link_or_copy(work / name, tmp / name)
        summary = finalize_dataset(tmp, {"variant": variant, **settings, "fingerprint": fp},
                                   expected_units=num_units)
    finalize_s = time.perf_counter() - t0
    nouns = set(pc.unique(pq.read_table(out / INDEX_FILE, columns=["noun"]).column("noun")).to_pylist())
    # the training vocabulary: the classes the proposal network learnt; for GT or file masks, the set's own classes
    vocabulary = set(read_meta(paths["proposal_net"])["classes"] if cfg.masks == "proposals" else dataset.classes)
    summary["nouns_outside_training_vocabulary"] = len(nouns - vocabulary)
    summary["training_classes_mined"] = len(nouns & vocabulary)
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    write_metrics(Path(paths["metrics"]) / f"{variant}.json",
                  {k: metrics[k] for k in ("pairs", "unique_nouns", "nouns_outside_training_vocabulary")}, metrics)
    rows = [{"key": k, "value": v} for k, v in summary.items() if isinstance(v, (int, float, str))]
    ctx.publish_table("card", rows, f"Mined pairs ({variant}); dataset card: {out}/README.md")
    card = (out / "README.md").read_text()
    ctx.publish_markdown("dataset-card", card, f"Dataset card of {out}")
    # this run's figures: the units it resumed, and its throughput over the units it mined
    mined_images = sum(len(cfg.unit_images(u, len(dataset))) for u in todo)
    return {"variant": variant, "units": num_units, "resumed_units": len(done), **metrics, "mine_s": round(mine_s, 1),
            "images_per_s": per_second(mined_images, mine_s), "finalize_s": round(finalize_s, 1)}


if __name__ == "__main__":
    main("mine")
