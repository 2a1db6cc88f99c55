"""Several training processes for one stage, launched by the stage itself (DDP inside `dvc repro`).

`launch(fn, args, compute)` runs `fn(*args)` in `compute.processes` ranks on this node through
torch.distributed's elastic launcher, the library behind `torchrun`: one node uses a standalone
rendezvous on a free local port; several nodes each run the same stage with their own
`compute.node_rank` and meet at `compute.master` (static rendezvous: node 0 hosts global rank 0).
With one process on one node, `fn` runs in the calling process and no process group exists.

Inside `fn`, `init_distributed` joins the process group (nccl on CUDA, gloo on CPU, which is how
multi-process training is tested on machines without a GPU) and gives the rank's device: one GPU
per rank (LOCAL_RANK). Only global rank 0 writes files; `launch` returns rank 0's return value on the
node that ran it and None on the others. Rank 0's progress is relayed to this process's progress
hooks (so Prefect's progress artifacts follow a multi-process training).
"""
from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from . import progress
from .compute import ComputeConfig, resolve_device


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    started_here: bool  # this call initialised the process group (and so tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_rank() -> int:
    """This process's global rank under a launcher (0 when not distributed), without the process group."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: str = "auto") -> Rank:
    """Join the launcher's process group when WORLD_SIZE > 1 (else describe a single process); a CUDA
    rank computes on GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda" and world > 1:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world <= 1:
        return Rank(0, 1, 0, resolved, False)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank, resolved, started)


def shutdown(rank: Rank) -> None:
    if rank.started_here and dist.is_initialized():
        dist.destroy_process_group()


@record  # a failing rank's traceback reaches the launcher's error report
def _rank_main(fn: Callable[..., Any], args: tuple[Any, ...], updates: Any) -> tuple[int, Any]:
    rank = process_rank()
    if rank == 0:
        progress.add_hook(lambda desc, done, total: updates.put((desc, done, total)))
    return rank, fn(*args)


def _relay(updates: Any) -> None:
    while (update := updates.get()) is not None:
        progress.notify(*update)


def launch(fn: Callable[..., Any], args: tuple[Any, ...], compute: ComputeConfig, name: str = "ovseg") -> Any:
    """Run `fn(*args)` on `compute.processes` ranks per node (see the module docstring); returns global
    rank 0's result on the node that ran it, None on the others. `fn` must be importable (spawned ranks
    import it by name); every rank gets the same `args`."""
    if compute.world_size == 1:
        return fn(*args)
    if compute.nodes > 1:
        rendezvous = dict(rdzv_backend=compute.rdzv_backend, rdzv_endpoint=compute.master, run_id=f"{name}-job",
                          rdzv_configs={"rank": compute.node_rank} if compute.rdzv_backend == "static" else {})
    else:
        rendezvous = dict(rdzv_backend="c10d", rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()))
    config = LaunchConfig(min_nodes=compute.nodes, max_nodes=compute.nodes, nproc_per_node=compute.processes,
                          max_restarts=0, start_method="spawn", monitor_interval=0.5, **rendezvous)
    updates = mp.get_context("spawn").SimpleQueue()
    relay = threading.Thread(target=_relay, args=(updates,), daemon=True)
    relay.start()
    try:
        results = elastic_launch(config, _rank_main)(fn, args, updates)
    finally:
        updates.put(None)
        relay.join(timeout=5)
    return next((value for rank, value in results.values() if rank == 0), None)
