"""Identical inputs give identical bytes, so DVC sees no change where there is none: `pretrain_clip` and
`train_maskformer`, run as DVC runs them (a new process per run) in two fresh working directories, and
rerun after DVC removed their outs (the persistent checkpoint is then complete, so the rerun resumes it),
write models, metrics and plots with the same md5 each time. Only the run record differs: it says what
the run resumed and gives no throughput for steps the run did not do."""
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
        outs = [section["out"], section["metrics"], section["plots"]]
    else:
        params = maskformer_params(tiny_world, tiny_models, HERE)
        section = params["train_maskformer"]
        section["heldout"] = [str(tiny_world.eval)]
        outs = [section["out"], section["metrics"], section["plots"]]
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
    assert second["resumed_from_step"] == 0

    for out in [*outs, RUNS]:  # what DVC removes before a rerun; the persistent checkpoints stay
        path = tmp_path / "a" / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_in_new_process(name, params, tmp_path / "a")
    assert md5s(tmp_path / "a", outs) == reference
    assert resumed["resumed_from_step"] == steps and resumed["samples_per_s"] is None
    metrics = json.loads((tmp_path / "a" / outs[1]).read_text())
    assert not {"resumed_from_step", "samples_per_s", "train_s"} & set(metrics)  # run figures stay out of metrics
