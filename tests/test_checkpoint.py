"""Checkpoint files: the same training state gives the same bytes, whatever else the process did."""
from __future__ import annotations

import random

import numpy as np
import torch

from ovseg_core.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, seed_everything


def test_checkpoint_bytes_do_not_depend_on_draws_from_pythons_global_random(tmp_path):
    """Prefect's clients draw from Python's `random` in the training process (more with an ephemeral server than
    with a project server), so a checkpoint holding its state had other bytes in every orchestration."""
    model = torch.nn.Linear(3, 2)
    for name, draws in (("a", 0), ("b", 5)):
        seed_everything(0)
        for _ in range(draws):
            random.random()
        save_checkpoint(tmp_path / name, 7, {"model": model})
    assert (tmp_path / "a" / CHECKPOINT_NAME).read_bytes() == (tmp_path / "b" / CHECKPOINT_NAME).read_bytes()


def test_resuming_restores_the_numpy_and_torch_generators(tmp_path):
    seed_everything(3)
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 11, {"model": model}, extra={"note": "x"})
    expected = (np.random.rand(), torch.rand(1).item())
    seed_everything(99)
    restored = torch.nn.Linear(3, 2)
    assert load_checkpoint(tmp_path, {"model": restored}) == (11, {"note": "x"})
    assert (np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(restored.weight, model.weight)
