"""The data engine at the mission's size: the embedded world at COCO's size, end to end, every step measured.

In a fresh clone of this repository (`--clone`, created here) with `configs/embedded-coco-size.yaml` as its
params.yaml (118,287 images, 5 captions each), run and time, with the peak memory of each step's whole
process tree:

1. `dvc repro` of world, prepare, pretrain_clip, train_maskformer;
2. `dvc repro mine@proposals-nouns`, killed with SIGKILL once at least half of its units are complete, then
   `dvc repro mine@proposals-nouns` again: it resumes (units complete before the kill are kept);
3. `dvc commit` of the mined out after its files' timestamps change (DVC rehashes every byte);
4. `dvc push` of the mined out to a local remote, a teammate's fresh `git clone` of the run and `dvc pull` of
   that out alone, and the mined set read there by open_clip's own webdataset loader (one pass) and by
   adapt_clip's data path (one epoch of its training batches);
5. checks that the shards are what an uninterrupted run gives: units mined before and after the kill are
   mined again from scratch (`mine-units`), and the first tenth of the units is mined by the stage on
   Prefect's thread runner and on a local Dask cluster of two worker processes: all byte-identical;
6. linearity: world and prepare at a tenth of the size (`--fraction`), and the tenth's mining time, ×10
   against the full run.

`linearity` separates what grows with the number of images from what does not (interpreter and DVC start-up,
the 8,000-image web split, the evaluation sets): world and prepare at three sizes in one clone, the cost per
image between the smallest and each larger size, and the tenth's ×10 against the full run, raw and for the
size-dependent part alone.

    python -m scripts.bench_coco_size --clone /work/coco-run --out benchmarks/coco-size-cpu.json
    python -m scripts.bench_coco_size linearity --clone /work/lin --sizes 1000 11829 118287 --out F.json
    python -m scripts.bench_coco_size --clone /tmp/small --images 3000 --out /tmp/small.json   # a quick rehearsal
    python -m scripts.bench_coco_size slices --clone /work/coco-run --units 12 --out F.json   # threads vs Dask

`slices` repeats step 5's thread-runner and Dask mining of the first units in a clone where the models exist.

Subcommands used by the above (each runs in its own process, so that its memory is its own):
`loader-pass --kind open_clip|adapt_clip --shards DIR`, `mine-units --params FILE --units U... --out DIR`.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from scripts import measure

REPO = Path(__file__).resolve().parents[1]
PROFILE = "configs/embedded-coco-size.yaml"
VARIANT = "proposals-nouns"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Run:
    """Steps in one working directory, each measured and recorded."""

    def __init__(self, record: dict[str, Any]):
        self.record = record
        self.env = dict(measure.tool_env(), PYTHONPATH="")

    def step(self, name: str, cmd: list[str], cwd: Path, **kwargs: Any) -> measure.Measured:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {' '.join(cmd)}", flush=True)
        result = measure.run(cmd, cwd, self.env, **kwargs)
        self.record["steps"][name] = {"seconds": result.seconds, "peak_rss_gib": result.peak_rss_gib,
                                      "peak_pss_gib": result.peak_pss_gib, "returncode": result.returncode}
        print(f"    {self.record['steps'][name]}", flush=True)
        if result.returncode and "kill_when" not in kwargs:
            raise RuntimeError(f"{name} failed:\n{result.output[-4000:]}")
        return result


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def profile(clone: Path, images: int | None) -> dict[str, Any]:
    params = yaml.safe_load((clone / PROFILE).read_text())
    if images:
        params["world"]["coco_images"] = images
    return params


def shard_digests(directory: Path, units: range | list[int]) -> dict[str, str]:
    return {f"pairs-{u:06d}.tar": sha256(directory / f"pairs-{u:06d}.tar") for u in units}


def slice_params(base: dict[str, Any], clone: Path, name: str, units: int, **prefect: Any) -> Path:
    """The run's params with mining limited to its first `units` units, into directories of its own."""
    params = json.loads(json.dumps(base))
    mine = params["mine"]
    mine["common"]["max_images"] = units * mine["common"]["images_per_unit"]
    mine.update(out=f"bench/{name}/mined", work=f"bench/{name}/work", metrics=f"bench/{name}/metrics")
    params["runs"] = f"bench/{name}/runs"
    params["prefect"].update(prefect)
    path = clone / "bench" / name / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def new_run(clone: Path) -> tuple[Path, dict[str, Any]]:
    """A new directory for a run's clone (an existing one is refused) and the run's record, no steps yet."""
    clone = clone.resolve()
    if clone.exists():
        raise SystemExit(f"{clone} exists: give a new directory")
    return clone, new_record()


def new_record() -> dict[str, Any]:
    return {
        "date": datetime.date.today().isoformat(),
        "machine": measure.machine(),
        "command": "python -m scripts.bench_coco_size " + " ".join(sys.argv[1:]),
        "commit": measure.commit(REPO),
        "steps": {},
    }


def with_peaks(record: dict[str, Any]) -> dict[str, Any]:
    """The record with the largest peak memory (RSS and PSS) of all its steps."""
    for kind in ("rss", "pss"):
        record[f"peak_{kind}_gib_max"] = max(s[f"peak_{kind}_gib"] for s in record["steps"].values())
    return record


def mine_slices(run: "Run", params: dict[str, Any], clone: Path, units: int) -> dict[str, Path]:
    """The first `units` units mined by the stage on Prefect's thread runner and on a local Dask cluster of two
    worker processes, each into directories of its own; their summaries go into the record, their shard
    directories are returned."""
    mined = {}
    for name, prefect in (("slice-threads", {}), ("slice-dask", {"task_runner": "dask"})):
        params_file = slice_params(params, clone, name, units, **prefect)
        if name == "slice-dask":  # a local Dask cluster of two worker processes
            sliced = yaml.safe_load(params_file.read_text())
            sliced["compute"]["processes"] = 2
            params_file.write_text(yaml.safe_dump(sliced, sort_keys=False))
        result = run.step(f"mine first {units} units ({name})", [sys.executable, "-m", "flows.stage", "mine",
                                                                 "--variant", VARIANT, "--params", str(params_file)],
                          clone)
        run.record[name] = {"units": units, "summary": measure.last_json(result.output)}
        mined[name] = clone / "bench" / name / "mined" / VARIANT
    return mined


def slices(args: argparse.Namespace) -> dict[str, Any]:
    """Thread runner against local Dask cluster on the first `--units` units, in a clone where the full run (or
    `dvc repro train_maskformer`) has run: time, images/s, memory, and whether their shards are byte-identical."""
    clone, record = args.clone.resolve(), new_record()
    run = Run(record)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    mined = mine_slices(run, params, clone, args.units)
    threads, dask = (shard_digests(d, range(args.units)) for d in mined.values())
    record["slices_byte_identical"] = threads == dask
    return with_peaks(record)


def full_run(args: argparse.Namespace) -> dict[str, Any]:
    clone, record = new_run(args.clone)
    run = Run(record)
    git("clone", "-q", str(REPO), str(clone), cwd=REPO.parent)
    run.step("nltk data", ["bash", "scripts/install_nltk_data.sh"], clone)
    params = profile(clone, args.images)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run.step("validate", [sys.executable, "-m", "stages.validate"], clone)
    for stage in ("world", "prepare", "pretrain_clip", "train_maskformer"):
        run.step(f"dvc repro {stage}", ["dvc", "repro", stage], clone)

    images = len(json.loads((clone / "data/prepared/world-coco/dataset.json").read_text())["samples"])
    per_unit = params["mine"]["common"]["images_per_unit"]
    units = math.ceil(images / per_unit)
    work = clone / params["mine"]["work"] / VARIANT
    kill_at = units // 2 + 1
    killed = run.step("dvc repro mine (killed)", ["dvc", "repro", f"mine@{VARIANT}"], clone,
                      kill_when=lambda: len(list(work.glob("*.stats.json"))) >= kill_at)
    complete_at_kill = sorted(int(p.name[6:12]) for p in work.glob("*.stats.json"))
    record["kill"] = {"returncode": killed.returncode, "units": units, "complete_at_kill": len(complete_at_kill)}
    run.step("dvc repro mine (resumed)", ["dvc", "repro", f"mine@{VARIANT}"], clone)
    metrics = json.loads((clone / params["mine"]["metrics"] / "details" / f"{VARIANT}.json").read_text())
    resumed = json.loads((clone / params["runs"] / "mine" / f"{VARIANT}.json").read_text())  # its run record
    out = clone / params["mine"]["out"] / VARIANT
    record["mined"] = {"images": images, "units": units, **metrics,
                       **{k: resumed[k] for k in ("resumed_units", "images_per_s", "finalize_s")}}
    run.step("dvc status (nothing to do)", ["dvc", "status"], clone)

    for path in out.iterdir():  # new timestamps: DVC's hash cache no longer vouches for the files
        os.utime(path)
    run.step("dvc commit (rehash the mined out)", ["dvc", "commit", "--force", f"mine@{VARIANT}"], clone)
    remote = clone.parent / f"{clone.name}-remote"
    subprocess.run(["dvc", "remote", "add", "-d", "team", str(remote)], cwd=clone, env=run.env, check=True)
    git("add", "params.yaml", "dvc.lock", ".dvc/config", "metrics", cwd=clone)
    git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", "coco-size run",
        cwd=clone)
    run.step("dvc push (mined out)", ["dvc", "push", f"mine@{VARIANT}"], clone)
    mate = clone.parent / f"{clone.name}-teammate"
    git("clone", "-q", str(clone), str(mate), cwd=clone.parent)
    run.step("teammate: dvc pull (mined out)", ["dvc", "pull", f"mine@{VARIANT}"], mate)
    pulled = mate / params["mine"]["out"] / VARIANT
    record["teammate_pull_identical"] = all(
        sha256(out / name) == sha256(pulled / name) for name in ("index.parquet", "sizes.json", "README.md"))
    for kind in ("open_clip", "adapt_clip"):
        result = run.step(f"teammate: {kind} loader, one pass",
                          [sys.executable, "-m", "scripts.bench_coco_size", "loader-pass", "--kind", kind,
                           "--shards", str(pulled), "--clip-arch", params["adapt_clip"]["clip_arch"]], REPO)
        record[f"{kind}_loader"] = measure.last_json(result.output)

    # shards byte-identical to uninterrupted mining: units from before and after the kill, mined afresh
    after = [u for u in range(units) if u not in complete_at_kill]
    check = sorted({complete_at_kill[0], complete_at_kill[-1], after[0], after[len(after) // 2], units - 1})
    result = run.step("mine units afresh (uninterrupted)",
                      [sys.executable, "-m", "scripts.bench_coco_size", "mine-units", "--params",
                       str(clone / "params.yaml"), "--units", *map(str, check), "--out", str(clone / "bench/units")],
                      clone)
    record["resume_check"] = {"units": check, "byte_identical":
                              shard_digests(clone / "bench/units", check) == shard_digests(out, check)}

    tenth = max(1, round(units * args.fraction))
    for name, mined in mine_slices(run, params, clone, tenth).items():
        record[name]["byte_identical"] = shard_digests(mined, range(tenth)) == shard_digests(out, range(tenth))

    # linearity of world and prepare: the same profile at a tenth of the images, in a clone of its own
    small = clone.parent / f"{clone.name}-tenth"
    git("clone", "-q", str(REPO), str(small), cwd=REPO.parent)
    (small / ".ovseg").mkdir(exist_ok=True)
    (small / ".ovseg" / "nltk_data").symlink_to(clone / ".ovseg" / "nltk_data")
    (small / "params.yaml").write_text(yaml.safe_dump(profile(small, round(images * args.fraction)), sort_keys=False))
    for stage in ("world", "prepare"):
        run.step(f"tenth: dvc repro {stage}", ["dvc", "repro", stage], small)
    steps = record["steps"]
    full_mining = steps["dvc repro mine (killed)"]["seconds"] + steps["dvc repro mine (resumed)"]["seconds"]
    record["linearity"] = {
        "world": round(10 * steps["tenth: dvc repro world"]["seconds"] / steps["dvc repro world"]["seconds"], 3),
        "prepare": round(10 * steps["tenth: dvc repro prepare"]["seconds"] / steps["dvc repro prepare"]["seconds"], 3),
        "mine": round(10 * steps[f"mine first {tenth} units (slice-threads)"]["seconds"] / full_mining, 3),
        "note": "10 x (a tenth's seconds) / full seconds; 1 = linear. Full mining = killed + resumed runs "
                "(two start-ups), the tenth one stage run",
    }
    return with_peaks(record)


def linearity(args: argparse.Namespace) -> dict[str, Any]:
    """world and prepare of the profile at each of `args.sizes` COCO images, one after another in one clone."""
    clone, record = new_run(args.clone)
    run = Run(record)
    git("clone", "-q", str(REPO), str(clone), cwd=REPO.parent)
    run.step("nltk data", ["bash", "scripts/install_nltk_data.sh"], clone)
    sizes = sorted(args.sizes)
    if len(sizes) < 3:
        raise SystemExit("linearity needs three sizes: the smallest one gives the fixed cost")
    for n in sizes:
        (clone / "params.yaml").write_text(yaml.safe_dump(profile(clone, n), sort_keys=False))
        for stage in ("world", "prepare"):
            result = run.step(f"{n}: dvc repro {stage}", ["dvc", "repro", stage], clone)
            # the stage's own time (its flow), apart from DVC hashing and caching its outputs
            record["steps"][f"{n}: dvc repro {stage}"]["stage_s"] = measure.last_json(result.output)["wall_s"]
    steps, small, full = record["steps"], sizes[0], sizes[-1]
    record["linearity"] = {}
    for stage in ("world", "prepare"):
        for part in ("seconds", "stage_s"):
            seconds = {n: steps[f"{n}: dvc repro {stage}"][part] for n in sizes}
            per_image_ms = {n: round(1000 * (seconds[n] - seconds[small]) / (n - small), 3) for n in sizes[1:]}
            record["linearity"][f"{stage} ({'dvc repro' if part == 'seconds' else 'stage alone'})"] = {
                "seconds": seconds,
                "fixed_s": round(seconds[small] - small * per_image_ms[full] / 1000, 1),
                "ms_per_image_above_smallest": per_image_ms,
                # 1 = linear: the middle size's cost per image against the full size's
                "per_image_ratio": round(per_image_ms[sizes[-2]] / per_image_ms[full], 3),
                "raw_ratio": round(full / sizes[-2] * seconds[sizes[-2]] / seconds[full], 3),
            }
    return with_peaks(record)


def loader_pass(args: argparse.Namespace) -> None:
    """One pass over the mined shards with open_clip's webdataset loader or adapt_clip's data path."""
    import torch

    start = time.perf_counter()
    samples = 0
    if args.kind == "open_clip":
        import open_clip
        from open_clip_train.data import get_wds_dataset

        import ovseg_core.clip.models  # noqa: F401  (registers the tiny architecture)

        sizes = json.loads((args.shards / "sizes.json").read_text())
        urls = "::".join(str(args.shards / name) for name in sorted(sizes))
        _, _, preprocess = open_clip.create_model_and_transforms(args.clip_arch)
        # its evaluation pipeline: the training one's decoding and tokenising, every sample exactly once (the
        # training one shuffles and rounds the epoch up to whole batches)
        ns = argparse.Namespace(val_data=urls, val_num_samples=sum(sizes.values()), batch_size=256, workers=2,
                                world_size=1)
        info = get_wds_dataset(ns, preprocess, is_train=False, tokenizer=open_clip.get_tokenizer(args.clip_arch))
        for images, _ in info.dataloader:
            samples += images.shape[0]
        expected = sum(sizes.values())
    else:
        from ovseg_core.clip.models import load_clip
        from ovseg_core.clip.pairs import MinedPairSamples
        from ovseg_core.clip.train import ClipTrainConfig, StepBatches
        from ovseg_core.loading import step_loader

        bundle = load_clip(args.clip_arch)
        data = MinedPairSamples(args.shards, bundle.image_size, bundle.mean, bundle.std)
        steps = len(data) // 256
        config = ClipTrainConfig(mode="mpt", steps=steps, batch_size=256, lr=0.0, weight_decay=0.0)
        for images, _, _ in step_loader(StepBatches(data, config, 0, 1), 0, steps, workers=2):
            samples += images.shape[0]
        expected = steps * 256
    seconds = time.perf_counter() - start
    assert samples == expected, (samples, expected)
    print(json.dumps({"samples": samples, "seconds": round(seconds, 1), "samples_per_s": round(samples / seconds),
                      "peak_rss_gib_this_process": round(psutil.Process().memory_info().rss / 2**30, 3),
                      "torch_threads": torch.get_num_threads()}))


def mine_units(args: argparse.Namespace) -> None:
    """Mine the given units from scratch, as the run's mine stage mines a unit: its settings, models and torch
    threads per unit (another thread count sums in another order, and float rounding may flip a mask pixel)."""
    from flows.prefect_stage import PrefectStageContext
    from stages.common import load_params
    from stages.mine import mine_unit, mining_spec

    # the stage's own context: it shares the CPUs among the units it runs at once (prefect.max_workers)
    ctx = PrefectStageContext("mine", load_params(args.params), VARIANT)
    spec_json = json.dumps(mining_spec(ctx), sort_keys=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for unit in args.units:
        mine_unit(spec_json, str(args.out), unit)
    print(json.dumps({"units": args.units}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--clone", type=Path, help="a new directory for the run's clone")
    parser.add_argument("--images", type=int, default=None, help="COCO split size (default: the profile's)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path)
    lp = sub.add_parser("loader-pass")
    lp.add_argument("--kind", choices=("open_clip", "adapt_clip"), required=True)
    lp.add_argument("--shards", type=Path, required=True)
    lp.add_argument("--clip-arch", default="ovseg-tiny-vit")
    mu = sub.add_parser("mine-units")
    mu.add_argument("--params", type=Path, required=True)
    mu.add_argument("--units", type=int, nargs="+", required=True)
    mu.add_argument("--out", type=Path, required=True)
    sl = sub.add_parser("slices")
    sl.add_argument("--clone", type=Path, required=True)
    sl.add_argument("--units", type=int, required=True)
    sl.add_argument("--out", type=Path)
    li = sub.add_parser("linearity")
    li.add_argument("--clone", type=Path, required=True)
    li.add_argument("--sizes", type=int, nargs="+", required=True)
    li.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.command == "loader-pass":
        return loader_pass(args)
    if args.command == "mine-units":
        return mine_units(args)
    if args.command != "linearity" and not args.clone:
        parser.error("--clone is needed for a run")
    record = {"linearity": linearity, "slices": slices}.get(args.command, full_run)(args)
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
