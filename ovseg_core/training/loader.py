"""Batches of training steps prepared ahead by DataLoader worker processes.

Both training loops index their data by step (`dataset[step]` is that step's whole batch for this
rank, a function of (seed, step) alone), so the loader walks the steps still to do in order; with
`workers` > 0 worker processes decode and augment the next batches while the current one trains,
and the result does not depend on how many there are.
"""
from __future__ import annotations

import torch.utils.data


def step_loader(steps: torch.utils.data.Dataset, start: int, stop: int, workers: int, pin: bool = False
                ) -> torch.utils.data.DataLoader:
    """Items start..stop-1 of a step-indexed dataset, prepared by `workers` processes (0: in this one);
    `pin`: page-locked host memory, for asynchronous copies to a GPU."""
    return torch.utils.data.DataLoader(steps, batch_size=None, sampler=range(start, stop), num_workers=workers,
                                       pin_memory=pin)
