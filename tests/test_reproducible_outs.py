"""Identical inputs give identical bytes, so DVC sees no change where there is none: `pretrain_clip` and
`train_maskformer`, run as DVC runs them (a new process per run) in two fresh working directories, and
rerun after DVC removed their outs (the persistent checkpoint is then complete, so the rerun resumes it),
write models, metrics and plots with the same md5 each time, and the two directories' checkpoints too. Only
the run record differs: it says what the run resumed and gives no throughput for steps the run did not do."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ovseg_core.datasets.prepared import PreparedDataset
from stages.common import details_path
from test_stage_mine import kill_when
from test_stage_pretrain_clip import params as pretrain_params
from test_stage_train_maskformer import stage_params as maskformer_params

REPO = Path(__file__).resolve().parents[1]
RUNS = "runs"  # the params' run-record directory, relative to the working directory like every out
HERE = Path("")  # out paths relative to the working directory, as in params.yaml


def stage_setup(name: str, tiny_world, tiny_models) -> tuple[dict[str, Any], list[str], int]:
    """(params, the stage's outs other than checkpoints and run record, its training steps)."""
    if name == "pretrain_clip":
        world = {"web": PreparedDataset.load(tiny_world.web), "eval": PreparedDataset.load(tiny_world.eval)}
        params = pretrain_params(world, HERE)
        section = params["pretrain_clip"]
        outs = [section["out"], section["metrics"], section["plots"], details_path(section["metrics"]).as_posix()]
    else:
        params = maskformer_params(tiny_world, tiny_models, HERE)
        section = params["train_maskformer"]
        section["heldout"] = [str(tiny_world.eval)]
        outs = [section["out"], section["metrics"], section["plots"], details_path(section["metrics"]).as_posix()]
    return {**params, "runs": RUNS}, outs, int(section["train"]["steps"])


def run_in_new_process(name: str, params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """`python -m stages.<name>` in `workdir`; returns its run record."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=workdir, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((workdir / RUNS / f"{name}.json").read_text())


def md5s(workdir: Path, outs: list[str]) -> dict[str, str]:
    found = {}
    for out in outs:
        root = workdir / out
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            found[f.relative_to(workdir).as_posix()] = hashlib.md5(f.read_bytes()).hexdigest()
    return found


@pytest.mark.parametrize("name", ["pretrain_clip", "train_maskformer"])
def test_reruns_in_new_processes_write_the_same_bytes(name, tiny_world, tiny_models, tmp_path):
    params, outs, steps = stage_setup(name, tiny_world, tiny_models)
    first = run_in_new_process(name, params, tmp_path / "a")
    reference = md5s(tmp_path / "a", outs)
    assert any(k.endswith(".pt") for k in reference) and any(k.endswith(".json") for k in reference)
    assert first["resumed_from_step"] == 0 and first["samples_per_s"] > 0

    second = run_in_new_process(name, params, tmp_path / "b")  # a second clone
    assert md5s(tmp_path / "b", outs) == reference
    checkpoints = [params[name]["checkpoints"]]  # a DVC out too: the same training state, the same bytes
    assert md5s(tmp_path / "b", checkpoints) == md5s(tmp_path / "a", checkpoints) != {}
    assert second["resumed_from_step"] == 0

    for out in [*outs, RUNS]:  # what DVC removes before a rerun; the persistent checkpoints stay
        path = tmp_path / "a" / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_in_new_process(name, params, tmp_path / "a")
    assert md5s(tmp_path / "a", outs) == reference
    assert resumed["resumed_from_step"] == steps and resumed["samples_per_s"] is None
    for metrics_file in (outs[1], outs[3]):  # headline and details: run figures stay out of both
        assert not {"resumed_from_step", "samples_per_s", "train_s"} & set(json.loads((tmp_path / "a" / metrics_file).read_text()))


def adapt_setup(mode: str, tiny_mined, tiny_models, tiny_world) -> tuple[dict[str, Any], list[str], int]:
    """(params, outs, steps) of `adapt_clip@<mode>` on the tiny mined pairs, paths relative to the working dir."""
    section = {
        "clip_arch": tiny_models.clip_arch, "pairs": str(tiny_mined.out.parent), "out": "out",
        "checkpoints": "ckpt", "metrics": "metrics", "plots": "plots",
        "probe_dataset": str(tiny_world.eval), "probe_images": 2,
        "common": {"steps": 8, "batch_size": 8, "seed": 0, "checkpoint_every": 2},
        "modes": {"ft": {"mode": "ft", "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 1},
                  "mpt": {"mode": "mpt", "lr": 2e-2, "weight_decay": 0.0, "warmup_steps": 1, "prompt_depth": 2}},
        "variants": {mode: {"mode": mode, "init": str(tiny_models.clip), "pairs": tiny_mined.variant}},
    }
    outs = [f"out/{mode}", f"metrics/{mode}.json", f"plots/{mode}.json", f"metrics/details/{mode}.json"]
    return {"compute": {"threads": 1, "precision": "fp32"}, "adapt_clip": section, "runs": RUNS}, outs, 8


@pytest.mark.parametrize("stage", ["pretrain_clip", "adapt_clip@ft", "adapt_clip@mpt"])
def test_killed_clip_stage_resumes_to_the_uninterrupted_bytes(stage, tiny_world, tiny_models, tiny_mined, tmp_path):
    """kill -9 of `python -m stages.<name>` mid-training (as a crash or a preempted node does it), then the same
    command again: it resumes from its checkpoint and writes the bytes of a run that was never interrupted."""
    name, _, mode = stage.partition("@")
    if name == "pretrain_clip":
        params, outs, _ = stage_setup(name, tiny_world, tiny_models)
        params["pretrain_clip"]["train"].update(steps=8, checkpoint_every=2)
        steps, checkpoints = 8, params["pretrain_clip"]["checkpoints"]
        cmd, record = [sys.executable, "-m", "stages.pretrain_clip"], f"{name}.json"
    else:
        params, outs, steps = adapt_setup(mode, tiny_mined, tiny_models, tiny_world)
        checkpoints = params["adapt_clip"]["checkpoints"]
        cmd, record = [sys.executable, "-m", "stages.adapt_clip", "--variant", mode], f"adapt_clip/{mode}.json"
    for workdir in (tmp_path / "whole", tmp_path / "killed"):
        workdir.mkdir()
        (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    whole = subprocess.run(cmd, cwd=tmp_path / "whole", capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = md5s(tmp_path / "whole", outs)
    assert any(k.endswith(".pt") or k.endswith(".safetensors") for k in reference)

    checkpoint_dir = tmp_path / "killed" / checkpoints
    kill_when(cmd, lambda: bool(list(checkpoint_dir.rglob("last.pt"))), tmp_path / "killed.log",
              dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), cwd=tmp_path / "killed", what="a checkpoint")
    assert not (tmp_path / "killed" / outs[0]).exists() or not any((tmp_path / "killed" / outs[0]).iterdir())
    rerun = subprocess.run(cmd, cwd=tmp_path / "killed", capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads((tmp_path / "killed" / RUNS / record).read_text())["resumed_from_step"]
    assert 0 < resumed < steps  # it really was interrupted mid-training, and resumed there
    assert md5s(tmp_path / "killed", outs) == reference
