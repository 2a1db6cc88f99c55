"""Stage `train_maskformer`: the same params give the same model (DVC's promise that a rerun reproduces
an out), also across processes, where the unseeded default would draw a new initialisation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def stage_params(tiny_world, tiny_models, base: Path, **compute) -> dict:
    return {"compute": {"threads": 1, **compute}, "train_maskformer": {
        "dataset": str(tiny_world.coco), "clip_arch": tiny_models.clip_arch, "clip": str(tiny_models.clip),
        "out": str(base / "models"), "checkpoints": str(base / "checkpoints"),
        "metrics": str(base / "metrics.json"), "plots": str(base / "loss.csv"),
        "preset": "tiny", "net": {}, "backbone_weights": None, "heldout": [], "eval_images": 1,
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "weight_decay": 1e-4, "crop_size": 48,
                  "backbone_lr_multiplier": 1.0, "scale_range": [0.75, 1.5], "checkpoint_every": 2, "seed": 0},
    }}


def run_in_new_process(params: dict, workdir: Path) -> dict[str, torch.Tensor]:
    workdir.mkdir(parents=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([sys.executable, "-m", "stages.train_maskformer"], cwd=workdir, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    return torch.load(Path(params["train_maskformer"]["out"]) / "model.pt", map_location="cpu")["state_dict"]


@pytest.mark.slow
def test_two_runs_with_the_same_params_train_the_same_weights(tiny_world, tiny_models, tmp_path):
    first = run_in_new_process(stage_params(tiny_world, tiny_models, tmp_path / "a"), tmp_path / "a")
    second = run_in_new_process(stage_params(tiny_world, tiny_models, tmp_path / "b"), tmp_path / "b")
    assert first.keys() == second.keys() and first
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
