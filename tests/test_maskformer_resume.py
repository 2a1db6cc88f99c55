"""Resumable, deterministic training: a killed run resumes to the same weights as an uninterrupted one,
a checkpoint of another run is not resumed, and DataLoader workers do not change the result."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ovseg_core.compute import ComputeConfig
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.maskformer import build_model, preset_config
from ovseg_core.maskformer.data import SemanticDataset
from ovseg_core.maskformer.train import TrainConfig, train
from ovseg_core.training.checkpoint import load_checkpoint
from test_maskformer import class_text, make_prepared

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def run_training(data: str | Path, checkpoints: str | Path, log: str | Path, steps: int) -> dict[str, torch.Tensor]:
    """The run under test (also what the subprocesses execute): tiny model, seed 0, one torch thread (other
    thread counts round differently, and tests run before may have changed this process's)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # dropout and drop-path on, so that the seeded per-step randomness is exercised too
    net = preset_config("tiny", num_queries=8, decoder_layers=2, dropout=0.1, drop_path_rate=0.1)
    model = build_model(net, class_text(4))
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-3, weight_decay=1e-4, crop_size=48, checkpoint_every=4)
    train(model, SemanticDataset(PreparedDataset.load(data)), cfg, checkpoints, log)
    return model.state_dict()


DRIVER = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
from test_maskformer_resume import run_training
data, ckpt, log, out, steps = sys.argv[1:]
torch.save(run_training(data, ckpt, log, int(steps)), out)
"""


def _launch(tmp_path: Path, name: str, data: Path, steps: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", DRIVER, str(data), str(tmp_path / f"{name}_ckpt"), str(tmp_path / f"{name}.csv"),
            str(tmp_path / f"{name}.pt"), str(steps)]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_and_resumed_training_equals_uninterrupted(tmp_path):
    data = make_prepared(tmp_path, 6)
    steps = 24
    whole = run_training(data, tmp_path / "whole_ckpt", tmp_path / "whole.csv", steps)  # in this process

    killed = _launch(tmp_path, "resumed", data, steps)
    checkpoint = tmp_path / "resumed_ckpt" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    reached, _ = load_checkpoint(checkpoint.parent, {}, restore_rng=False)
    assert 0 < reached < steps  # really interrupted mid-run
    assert not (tmp_path / "resumed.pt").exists()

    resumed = _launch(tmp_path, "resumed", data, steps)
    stderr = resumed.communicate(timeout=120)[1].decode()
    assert resumed.returncode == 0, stderr[-2000:]
    assert f"resuming from step {reached} of {steps}" in stderr
    resumed_state = torch.load(tmp_path / "resumed.pt")
    assert whole.keys() == resumed_state.keys()
    assert all(torch.equal(whole[k], resumed_state[k]) for k in whole)
    assert (tmp_path / "whole.csv").read_text() == (tmp_path / "resumed.csv").read_text()


def test_checkpoint_of_another_run_is_not_resumed(tmp_path):
    ds = SemanticDataset(PreparedDataset.load(make_prepared(tmp_path, 2)))
    net = preset_config("tiny", num_queries=4, decoder_layers=1)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, weight_decay=0.0, crop_size=32, checkpoint_every=1)
    train(build_model(net, class_text(4)), ds, cfg, tmp_path / "ckpt")
    # Same steps, other learning rate: a different run, so it starts again from step 1.
    other = train(build_model(net, class_text(4)), ds, TrainConfig(**{**cfg.__dict__, "lr": 5e-4}), tmp_path / "ckpt")
    assert [r["step"] for r in other.log] == [1, 2] and other.resumed_from_step == 0
    # The same run again: already complete, nothing to do.
    again = train(build_model(net, class_text(4)), ds, TrainConfig(**{**cfg.__dict__, "lr": 5e-4}), tmp_path / "ckpt")
    assert [r["step"] for r in again.log] == [1, 2] and again.resumed_from_step == 2


def test_dataloader_workers_do_not_change_the_result(tmp_path):
    ds = SemanticDataset(PreparedDataset.load(make_prepared(tmp_path, 4)))
    net = preset_config("tiny", num_queries=4, decoder_layers=1)
    results = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = build_model(net, class_text(4))
        cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, weight_decay=0.0, crop_size=48)
        train(model, ds, cfg, tmp_path / f"ckpt{workers}", compute=ComputeConfig(loader_workers=workers))
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
