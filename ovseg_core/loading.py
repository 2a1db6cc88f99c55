"""DataLoaders: worker processes that decode, augment and extract nouns beside the compute process.

Workers start from a fork server (a clean process that imports torch and the data modules once), not
by fork() of the calling process: stages run their work units in threads (Prefect's thread runner),
and on Python 3.11 a child fork()ed from a thread-pool thread exits with code 1 (concurrent.futures'
exit hook tries to join the thread the child was forked from), which the DataLoader reports as a
crashed worker. The data set object is pickled to each worker; with `workers` = 0 everything runs in
the calling process. Results never depend on the number of workers.
"""
from __future__ import annotations

import multiprocessing
from typing import Any

import torch.utils.data

PRELOAD = ["torch", "numpy", "PIL.Image", "ovseg_core.datasets.prepared", "ovseg_core.mining",
           "ovseg_core.maskformer.augment", "ovseg_core.clip.pairs"]


def data_loader(dataset: torch.utils.data.Dataset, workers: int, **options: Any) -> torch.utils.data.DataLoader:
    """torch's DataLoader over `dataset` with `workers` worker processes started from the fork server."""
    context = None
    if workers > 0:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
    return torch.utils.data.DataLoader(dataset, num_workers=workers, multiprocessing_context=context, **options)


def step_loader(steps: torch.utils.data.Dataset, start: int, stop: int, workers: int, pin: bool = False
                ) -> torch.utils.data.DataLoader:
    """Items start..stop-1 of a step-indexed dataset (`dataset[step]` is that step's whole batch for this
    rank, a function of (seed, step) alone), prepared ahead by `workers` processes; `pin`: page-locked
    host memory, for asynchronous copies to a GPU."""
    return data_loader(steps, workers, batch_size=None, sampler=range(start, stop), pin_memory=pin)
