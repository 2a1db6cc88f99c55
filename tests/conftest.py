"""Shared session fixtures: a tiny embedded world, tiny random-init models, and stage params on them.

Everything is built in pytest's temporary directories, once per test session, through the same code
the pipeline runs (world generator, dataset readers, model constructors, the mining stage):

- `tiny_world`      the generated world (official layouts) and its prepared sets (`TinyWorld`)
- `tiny_models`     random-init tiny CLIP + tiny MaskFormer saved to files (`TinyModels`)
- `mine_params`     a factory: params.yaml-shaped dict for the `mine` stage on the tiny world
- `tiny_mined`      the tiny world mined once by the real `mine` stage (plain runner, `TinyMined`)
- `trained_run`     a working directory where the first four stages trained real (small) models (minutes)

Session-scoped fixtures are shared by every test file: treat what they return as read-only (copy a
directory before changing it).

Prefect in tests: this module points the whole test session (and the subprocesses it starts) at a fresh
temporary state directory before anything imports Prefect, so flows run in Prefect's ephemeral mode
with their own database and never touch the project's `.ovseg/` state or a running server.
"""
from __future__ import annotations

import atexit
import copy
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

_PREFECT_STATE = tempfile.mkdtemp(prefix="ovseg-test-state-")
atexit.register(shutil.rmtree, _PREFECT_STATE, True)  # registered first, so it runs after Prefect's server stops
for _key in [k for k in os.environ if k.startswith("PREFECT_")]:
    del os.environ[_key]
os.environ["OVSEG_STATE_DIR"] = _PREFECT_STATE  # flows.env finds no project server file there
os.environ["PREFECT_HOME"] = os.path.join(_PREFECT_STATE, "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # first start migrates a new database
os.environ["DVC_NO_ANALYTICS"] = "1"


def _bind_xdist_worker_to_its_cpus() -> None:
    """Give each pytest-xdist worker its own share of the CPUs (worker i of n: every n-th CPU from i). Stages size
    their torch threads from the CPUs they may use (`compute.usable_cpus`), and so do the processes a test starts
    (they inherit the binding): two workers that each ran two-thread torch on 2 cores would spin-wait for each
    other, ~1.8x slower than two one-thread workers."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker is None or count < 2 or len(cpus) < count:
        return
    share = cpus[int(worker.removeprefix("gw")) % count::count]
    os.sched_setaffinity(0, share)
    torch.set_num_threads(len(share))  # torch sized its pool when it loaded, before the binding


_bind_xdist_worker_to_its_cpus()


SUITE_TMP_PEAK_GB = 2.4  # the whole suite's temporary files at their peak (README, measured at 1ff2cdc)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Say up front when the disk the tests write to is too full: otherwise it shows only as hundreds of errors."""
    where = Path(session.config.option.basetemp or tempfile.gettempdir())
    free_gb = shutil.disk_usage(where if where.exists() else where.parent).free / 1e9
    if free_gb < SUITE_TMP_PEAK_GB and not os.environ.get("PYTEST_XDIST_WORKER"):
        session.config.get_terminal_writer().line(
            f"WARNING: {where} has {free_gb:.1f} GB free; the suite's temporary files need ~{SUITE_TMP_PEAK_GB} GB: "
            "expect 'No space left on device'", yellow=True)


ROOT = Path(__file__).resolve().parents[1]  # the repository (stages resolve relative paths from here)
NLTK_DATA = ROOT / ".ovseg" / "nltk_data"  # WordNet for noun lemmas (scripts/install_nltk_data.sh)
TINY_CLIP_ARCH = "ovseg-tiny-vit"
MINE_VARIANTS = {
    "proposals-nouns": {"masks": "proposals", "categories": "nouns"},
    "gt-classes": {"masks": "gt", "categories": "gt_classes"},
}

# Big enough for several mining units with captions naming seen and unseen classes, small enough to
# generate and prepare in a second or two.
TINY_WORLD = {
    "seed": 3,
    "image_size": 64,
    "web_images": 16,
    "web_captions_per_image": 1,
    "coco_images": 24,
    "captions_per_image": 3,
    "eval_sets": {"world-eval": {"images": 8}},
}


@dataclass(frozen=True)
class TinyWorld:
    root: Path  # generate_world output: coco/, web/, eval/world-eval/, world.json, pos_tagged_captions.txt
    coco: Path  # prepared "world-coco" (coco-stuff-171-json with captions): seen classes only
    web: Path  # prepared "world-web" (coco-captions, caption-only)
    eval: Path  # prepared "world-eval" (ade20k-150 layout, all classes, seen flags from coco's classes)
    config: dict[str, Any]  # the WorldConfig mapping it was generated from

    @property
    def tagged_captions(self) -> Path:
        """word/TAG captions for the `trained:<path>` noun tagger."""
        return self.root / "pos_tagged_captions.txt"


@dataclass(frozen=True)
class TinyModels:
    clip_arch: str  # open_clip architecture name of `clip`
    clip: Path  # save_clip file of a random-init tiny CLIP (seed 0)
    proposal_net: Path  # save_model file of a random-init tiny MaskFormer over world-coco's class names
    classes: list[str]  # the proposal network's training vocabulary (world-coco's classes)


@dataclass(frozen=True)
class TinyMined:
    params: dict[str, Any]  # the params it was mined with (see `mine_params`)
    variant: str  # "proposals-nouns"
    out: Path  # the stage's final out: shards, stats, sizes.json, index.parquet, README.md
    work: Path  # the stage's persistent work directory of this variant
    summary: dict[str, Any]  # what the stage returned


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    """A tiny embedded world, generated and prepared as the `world` and `prepare` stages do."""
    from ovseg_core.datasets.registry import prepare_dataset
    from ovseg_core.world import WorldConfig, generate_world

    base = tmp_path_factory.mktemp("tiny-world")
    root = base / "world"
    generate_world(root, WorldConfig.from_dict(TINY_WORLD, source="tests/conftest.py"))
    prepared = base / "prepared"
    coco = prepare_dataset("coco-stuff-171-json", root / "coco", prepared / "world-coco", "train2017",
                           options={"captions": True}, dataset_name="world-coco")
    prepare_dataset("webdataset-captions", root / "web", prepared / "world-web", "", dataset_name="world-web")
    prepare_dataset("ade20k-150", root / "eval" / "world-eval", prepared / "world-eval", "validation",
                    train_vocabulary=coco.classes, dataset_name="world-eval")
    return TinyWorld(root=root, coco=prepared / "world-coco", web=prepared / "world-web",
                     eval=prepared / "world-eval", config=copy.deepcopy(TINY_WORLD))


@pytest.fixture(scope="session")
def tiny_models(tiny_world, tmp_path_factory) -> TinyModels:
    """Random-init stand-ins for the pretrained CLIP and the trained proposal network, saved as the
    pretrain / train_maskformer stages save theirs (deterministic: fixed seeds)."""
    from ovseg_core.clip.models import load_clip, save_clip
    from ovseg_core.clip.text import text_features
    from ovseg_core.datasets.prepared import PreparedDataset
    from ovseg_core.maskformer.model import build_model, preset_config, save_model

    out = tmp_path_factory.mktemp("tiny-models")
    classes = PreparedDataset.load(tiny_world.coco).classes
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clip = load_clip(TINY_CLIP_ARCH)
        save_clip(clip, out / "clip.pt")
        torch.manual_seed(1)
        net = build_model(preset_config("tiny"), text_features(clip, classes))
        save_model(out / "model.pt", net, meta={"classes": classes, "clip": str(out / "clip.pt")})
    return TinyModels(clip_arch=TINY_CLIP_ARCH, clip=out / "clip.pt", proposal_net=out / "model.pt",
                      classes=classes)


@pytest.fixture(scope="session")
def mine_params(tiny_world, tiny_models) -> Callable[..., dict[str, Any]]:
    """Factory `mine_params(base, prefect=None, compute=None, **common)`: params for the `mine` stage on the
    tiny world, with out/work/metrics under `base`; `common` overrides `mine.common` (e.g. images_per_unit),
    `prefect` the `prefect:` section, `compute` the `compute:` section. Variants: proposals-nouns, gt-classes."""

    def make(base: Path, prefect: dict[str, Any] | None = None, compute: dict[str, Any] | None = None,
             **common: Any) -> dict[str, Any]:
        base = Path(base)
        return {
            # no task retries: a failing unit should fail the test, not be retried
            "prefect": {"task_runner": "threads", "max_workers": 2, "task_retries": 0, **(prefect or {})},
            # one torch thread per unit whatever runs the units: other thread counts round floats differently
            "compute": {"threads": 1, **(compute or {})},
            "mine": {
                "dataset": str(tiny_world.coco),
                "clip_arch": tiny_models.clip_arch,
                "clip": str(tiny_models.clip),
                "proposal_net": str(tiny_models.proposal_net),
                "out": str(base / "mined"),
                "work": str(base / "work"),
                "metrics": str(base / "metrics"),
                "common": {
                    "num_captions": 1,
                    "top_proposals": 12,
                    "images_per_unit": 3,
                    "image_format": "png",
                    "nouns": {"tagger": f"trained:{tiny_world.tagged_captions}", "nltk_data": str(NLTK_DATA)},
                    **common,
                },
                "variants": copy.deepcopy(MINE_VARIANTS),
            },
        }

    return make


@pytest.fixture(scope="session")
def tiny_mined(mine_params, tmp_path_factory) -> TinyMined:
    """The tiny world mined (proposals-nouns) by the real `mine` stage, uninterrupted, in-process."""
    from stages.common import StageContext, run_stage

    params = mine_params(tmp_path_factory.mktemp("tiny-mined"))
    threads = torch.get_num_threads()
    try:
        summary = run_stage("mine", StageContext("mine", params, "proposals-nouns"))
    finally:
        torch.set_num_threads(threads)  # the stage sets its per-worker thread count
    section = params["mine"]
    return TinyMined(params=params, variant="proposals-nouns", out=Path(section["out"]) / "proposals-nouns",
                     work=Path(section["work"]) / "proposals-nouns", summary=summary)


TRAINED_RUN_EVAL_IMAGES = 24
TRAINED_RUN = {  # params.yaml keys → values: a smaller world and shorter trainings, the same recipe otherwise
    "world.web_images": 2400,
    "world.coco_images": 400,
    "world.eval_sets": {"world-eval": {"images": TRAINED_RUN_EVAL_IMAGES}, "world-val": {"images": 4},
                        "world-wide": {"images": 4, "vocabulary": "wide"}},
    "pretrain_clip.train.steps": 100,
    "pretrain_clip.train.checkpoint_every": 100,
    "pretrain_clip.probe.images": 8,
    "train_maskformer.train.steps": 250,
    "train_maskformer.train.checkpoint_every": 250,
    "train_maskformer.eval_images": 8,
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A working directory in which the pipeline's first four stages ran from params.yaml with TRAINED_RUN's
    changes (about two minutes): models/ and data/ inside, as `dvc repro` lays them out."""
    from stages.common import StageContext, load_params, run_stage
    from test_pipeline_e2e import set_key

    work = tmp_path_factory.mktemp("trained-run")
    # the offline NLTK data setup.sh installed, where the stages look for it: .ovseg/ of the working directory
    (work / ".ovseg").mkdir()
    (work / ".ovseg" / "nltk_data").symlink_to(ROOT / ".ovseg" / "nltk_data")
    params = load_params(ROOT / "params.yaml")
    for key, value in TRAINED_RUN.items():
        set_key(params, key, copy.deepcopy(value))
    params["prefect"]["task_retries"] = 0
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(work)  # params.yaml's paths are relative to the working directory, as under `dvc repro`
    try:
        for stage in ("world", "prepare", "pretrain_clip", "train_maskformer"):
            run_stage(stage, StageContext(stage, copy.deepcopy(params)))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return work


# Fixtures that cost minutes: every test that uses one is `slow` (`pytest -m "not slow"` is the quick loop). Keep
# each one's tests in one file: pytest-xdist (`--dist loadfile`, pyproject.toml) then builds it on one worker only.
SLOW_FIXTURES = {"trained_run"}


def pytest_collection_modifyitems(config, items) -> None:
    """Tests on a minutes-long fixture are marked `slow`; tests marked `gpu` are skipped, with the reason, on
    machines without a CUDA device."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marker gpu: no CUDA device is visible here; run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Send Prefect's queued logs and stop its temporary API server (if a test started one) now, while
    pytest's captured stderr, to which Prefect's console log handler writes, is still open; at
    interpreter exit it is closed."""
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        for instance in list(server.SubprocessASGIServer._instances.values()):
            instance.stop()


def register_six_layer_tiny_vit(directory: Path) -> str:
    """Register `ovseg-tiny-vit-6l` (the embedded CLIP with 6 vision layers, its architecture before 33bf576) with
    open_clip from a config written to `directory`, for the tests whose cases were chosen with it; its name."""
    import json

    from ovseg_core.clip.models import MODEL_CONFIG_DIR, register_model_configs

    config = json.loads((MODEL_CONFIG_DIR / "ovseg-tiny-vit.json").read_text())
    config["vision_cfg"]["layers"] = 6
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ovseg-tiny-vit-6l.json").write_text(json.dumps(config))
    register_model_configs(directory)
    return "ovseg-tiny-vit-6l"
