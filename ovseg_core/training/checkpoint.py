"""Resumable training state: model, optimizer, scheduler, step and the numpy and torch RNGs, saved atomically.

A run that is killed and restarted with the same seed reaches the same weights as an uninterrupted
one, provided the data order is a function of (seed, step) — see `batch_order` — and not of how
many batches a process has already drawn. Python's `random` is seeded but not saved: training never draws
from it, while libraries in the same process do (Prefect's clients), so its state would make the checkpoint's
bytes depend on how the stage was orchestrated (with a Prefect server or an ephemeral one).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_torch

CHECKPOINT_NAME = "last.pt"


def rng_state() -> dict[str, Any]:
    return {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(
    directory: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module | torch.optim.Optimizer | Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save `step`, each object's state_dict, the RNG states and `extra` to `directory/last.pt` atomically."""
    path = Path(directory) / CHECKPOINT_NAME
    payload = {
        "step": step,
        "state": {name: obj.state_dict() for name, obj in modules.items()},
        "rng": rng_state(),
        "extra": extra or {},
    }
    write_torch(path, payload)
    return path


def load_checkpoint(
    directory: str | Path, modules: dict[str, Any], restore_rng: bool = True
) -> tuple[int, dict[str, Any]] | None:
    """Restore objects from `directory/last.pt`; returns (step, extra), or None when there is none."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    for name, obj in modules.items():
        obj.load_state_dict(payload["state"][name])
    if restore_rng:
        set_rng_state(payload["rng"])
    return int(payload["step"]), payload["extra"]


def batch_order(num_items: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch for global `step`: epoch e is a permutation seeded by (seed, e).

    Stateless, so a resumed run draws exactly the batches the uninterrupted run would have.
    """
    if num_items <= 0:
        raise ValueError("batch_order: no items to draw from")
    per_epoch = max(1, num_items // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_items)
    if num_items < batch_size:
        return perm
    return perm[k * batch_size : (k + 1) * batch_size]
