"""What every stage shares: params loading, the stage context, and the plain command-line runner."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import yaml

from ovseg_core.atomic import write_json, write_text
from ovseg_core.compute import ComputeConfig
from ovseg_core.progress import Progress

T = TypeVar("T")
R = TypeVar("R")

PARAMS_FILE = Path("params.yaml")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found (run from the repository root)")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params


DEPTH_VARIANT_PREFIX = "mpt-depth-"


def depth_variant(depth: int) -> str:
    """The variant `ablations.prompt_depths` adds for one depth (Table 5: `mpt` at that prompt depth)."""
    return f"{DEPTH_VARIANT_PREFIX}{int(depth)}"


def variant_depth(variant: str) -> int | None:
    """The prompt depth of a `depth_variant` name; None for any other variant."""
    rest = variant.removeprefix(DEPTH_VARIANT_PREFIX)
    return int(rest) if rest != variant and rest.isdigit() else None


GT_MASK_PREFIX = "gt-"  # Table 2's pairs: `gt-nouns` (GT masks, caption nouns), `gt-classes` (GT masks, GT classes)


def gt_mask_variants(params: dict[str, Any]) -> list[str]:
    """The mining variants `ablations.gt_masks` switches on: `gt-<labels>` for each listed labelling."""
    return [f"{GT_MASK_PREFIX}{labels}" for labels in (params.get("ablations") or {}).get("gt_masks") or []]


def ablation_variants(params: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """Variants that params.yaml's `ablations` adds to the repeated stage `key`. dvc.yaml runs them as stage
    groups of their own, one stage per listed item, so that one setting switches an ablation on:

    - `prompt_depths: [d, ...]` (Table 5; groups `adapt_clip-mpt-depth`, `evaluate-mpt-depth`) adds `mpt-depth-<d>`:
      to adapt_clip the `mpt` variant with prompt depth d, to evaluate the `mpt` evaluation of that CLIP;
    - `gt_masks: [labels, ...]` (Table 2; groups `mine-gt`, `adapt_clip-ft-gt`, `evaluate-ft-gt`) adds, for labels
      `nouns` or `classes`: to mine the pairs `gt-<labels>` (ground-truth masks labelled with caption nouns or
      with the ground-truth class names: `mine.ablation_variants`), to adapt_clip `ft-gt-<labels>`, the `ft`
      variant on those pairs, and to evaluate the evaluation of that CLIP."""
    added: dict[str, dict[str, Any]] = {}
    if key == "mine":
        known = params["mine"].get("ablation_variants") or {}
        for name in gt_mask_variants(params):
            if name not in known:
                raise KeyError(f"params.yaml ablations.gt_masks: no mine.ablation_variants.{name}; "
                               f"known: {sorted(known)}")
            added[name] = known[name]
        return added
    if key not in ("adapt_clip", "evaluate"):
        return added
    for d in (params.get("ablations") or {}).get("prompt_depths") or []:
        name, base = depth_variant(d), params[key]["variants"]["mpt"]
        added[name] = ({**base, "prompt_depth": int(d)} if key == "adapt_clip"
                       else {**base, "clip": f"{params['adapt_clip']['out']}/{name}"})
    for pairs in gt_mask_variants(params):
        name = f"ft-{pairs}"
        adapted = f"{params['adapt_clip']['out']}/{name}"
        added[name] = ({**params[key]["variants"]["ft"], "pairs": pairs} if key == "adapt_clip"
                       else {"clip": adapted, "weights": adapted})
    return added


class StageContext:
    """What a stage may ask of whoever runs it.

    This base class runs the work units in this process, or in `compute.processes` spawned worker
    processes (plain `python -m stages.<name>`); the Prefect runner in `flows.stage` overrides `map`
    with monitored, retried tasks on a task runner and the `publish_*` methods with UI artifacts.
    Stages never import Prefect themselves.
    """

    def __init__(self, name: str, params: dict[str, Any], variant: str | None = None):
        self.name = name
        self.params = params
        self.variant = variant  # the `foreach` key of a repeated stage (e.g. a mining or adaptation variant)
        self.log = logging.getLogger(f"ovseg.stages.{name}")

    def section(self, key: str) -> dict[str, Any]:
        if key not in self.params:
            raise KeyError(f"params.yaml has no '{key}' section (stage {self.name})")
        return self.params[key]

    def variant_params(self, key: str) -> tuple[str, dict[str, Any]]:
        """(variant name, merged settings) of a repeated stage: `<key>.common`, overlaid with
        `<key>.modes.<mode>` when the variant names a mode, then with `<key>.variants.<variant>` (or the
        variant an `ablations` setting adds)."""
        section = self.section(key)
        variants = {**(section.get("variants") or {}), **ablation_variants(self.params, key)}
        if self.variant not in variants:
            raise KeyError(f"params.yaml {key}.variants has no {self.variant!r}; known: {sorted(variants)}")
        chosen = variants[self.variant] or {}
        mode = {}
        if "modes" in section:
            modes = section["modes"] or {}
            if chosen.get("mode") not in modes:
                raise KeyError(f"{key}.variants.{self.variant}.mode must be one of {sorted(modes)}, "
                               f"got {chosen.get('mode')!r}")
            mode = modes[chosen["mode"]]
        return self.variant, {**(section.get("common") or {}), **mode, **chosen}

    def settings(self) -> dict[str, Any]:
        """This stage's params section as the stage reads it: for a repeated stage, the section's own keys
        with the variant's merged settings (`variant_params`) in place of `common`, `modes` and `variants`."""
        section = self.section(self.name)
        if self.variant is None:
            return section
        shared = {k: v for k, v in section.items() if k not in ("common", "modes", "variants")}
        return {**shared, **self.variant_params(self.name)[1]}

    def seeded(self, settings: dict[str, Any]) -> dict[str, Any]:
        """`settings` with its `seed` offset by params.yaml's top-level `seed`, the run seed: `dvc exp run -S
        seed=1` repeats the whole chain (pretraining, MaskFormer, adaptation) with other random draws on the same
        world (which has its own `world.seed`); run seed 0 leaves every stage's seed as written."""
        return {**settings, "seed": int(settings.get("seed", 0)) + int(self.params.get("seed") or 0)}

    @property
    def compute(self) -> ComputeConfig:
        """Where and how this stage computes (params.yaml `compute`, with this stage's overrides)."""
        return ComputeConfig.for_stage(self.params, self.name, self.variant)

    @property
    def concurrent_units(self) -> int:
        """Work units each process runs at once (they share its CPU threads)."""
        return 1

    def unit_threads(self) -> int:
        """torch CPU threads for each work unit of `map`."""
        return self.compute.cpu_threads(self.concurrent_units)

    def map(self, fn: Callable[[T], R], items: Iterable[T], desc: str) -> list[R]:
        """Apply `fn` (picklable) to independent work units; results in input order."""
        items = list(items)
        processes = min(self.compute.processes, len(items))
        with Progress(len(items), desc) as p, contextlib.ExitStack() as stack:
            if processes > 1:
                pool = stack.enter_context(ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")))
                results = pool.map(fn, items)
            else:
                results = map(fn, items)
            out = []
            for result in results:
                out.append(result)
                p.update(1)
        return out

    def publish_table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        self.log.info("%s: %s", key, json.dumps(rows)[:2000])

    def publish_markdown(self, key: str, markdown: str, description: str = "") -> None:
        self.log.info("%s:\n%s", key, markdown[:4000])


def resumable_dir(base: str | Path, fingerprint: Any) -> Path:
    """The persistent work directory of a resumable run (checkpoints, completed shards).

    DVC keeps `base` between runs (`persist: true`), so a crashed run resumes. The directory is tied to
    a fingerprint of everything that decides the result: when the settings change (a new experiment),
    the old state is removed and the run starts afresh instead of resuming someone else's work.
    """
    base = Path(base)
    marker = base / "fingerprint.json"
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    if base.exists() and (not marker.exists() or marker.read_text() != text):
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(text)
    return base


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


StageFn = Callable[[StageContext], dict[str, Any]]


def details_path(metrics: str | Path) -> Path:
    """Where every number of a stage's metrics lives: `metrics/evaluate/ft.json` -> `metrics/evaluate/details/ft.json`."""
    metrics = Path(metrics)
    return metrics.parent / "details" / metrics.name


def write_metrics(path: str | Path, headline: dict[str, Any], details: dict[str, Any]) -> None:
    """The stage's DVC `metrics:` file gets its headline numbers only, so that `dvc metrics show` and `dvc exp show`
    compare runs in one screen; all numbers go to `details_path(path)` (an uncached out, read by the report)."""
    write_json(details_path(path), details)
    write_json(path, headline)


def stage_function(name: str) -> StageFn:
    module = importlib.import_module(f"stages.{name}")
    return module.run


def per_second(done: int, seconds: float) -> float | None:
    """A throughput over the work this process did: None when it did none (e.g. it resumed a finished run)."""
    return round(done / seconds, 1) if done and seconds > 0 else None


def training_figures(resumed_from_step: int, steps: int, batch_size: int, seconds: float) -> dict[str, Any]:
    """A training run's own figures: the step it resumed from, its time, and samples/s over the steps it did."""
    return {"resumed_from_step": resumed_from_step, "train_s": round(seconds, 1),
            "samples_per_s": per_second((steps - resumed_from_step) * batch_size, seconds)}


def run_record_path(params: dict[str, Any], name: str, variant: str | None = None) -> Path | None:
    """Where a stage run's summary goes: `<runs>/<stage>.json`, or `<runs>/<stage>/<variant>.json` for a
    repeated stage; None when params name no `runs` directory."""
    runs = params.get("runs")
    if not runs:
        return None
    return Path(runs) / name / f"{variant}.json" if variant else Path(runs) / f"{name}.json"


def run_stage(name: str, ctx: StageContext) -> dict[str, Any]:
    """Run a stage; its summary (this run's figures: what it resumed, wall times, throughput, next to its
    headline results) is returned and written as the run record. The run record differs from run to run,
    so no stage depends on it; the stage's metrics, plots and other outs are reproducible."""
    start = time.perf_counter()
    summary = stage_function(name)(ctx) or {}
    summary.setdefault("wall_s", round(time.perf_counter() - start, 2))
    record = run_record_path(ctx.params, name, ctx.variant)
    if record is not None:
        write_text(record, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def main(name: str, argv: list[str] | None = None) -> None:
    """Plain runner: `python -m stages.<name> [--params params.yaml]` (no Prefect)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default=str(PARAMS_FILE))
    parser.add_argument("--variant", default=None, help="variant of a repeated (foreach) stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    summary = run_stage(name, StageContext(name, load_params(args.params), args.variant))
    json.dump(summary, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
