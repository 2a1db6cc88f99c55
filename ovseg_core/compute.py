"""Where and how a stage computes: device, numeric precision, processes, data-loader workers, CPU threads.

params.yaml's `compute:` section holds the values every stage uses; `compute.stages.<stage>` (or
`<stage>@<variant>`, e.g. `adapt_clip@ft`) overrides them for one stage. `ComputeConfig.for_stage` merges
them. A config says what is *asked for* ("auto" included); `Placement` is what one process resolved
it to on the machine it runs on:

- device `auto` takes the GPU when one is visible, else the CPU; `cuda` without a visible GPU is an
  error that says so (never a silent CPU run of a GPU recipe);
- precision `auto` is bf16 where the device computes bf16 natively (a GPU from Ampere on; a CPU with
  AVX512-BF16 or AMX), fp32 otherwise. bf16 means autocast around forward passes (parameters,
  gradients and optimizer state stay fp32: FT's lr 5e-6 would vanish in bf16 weights; losses are
  computed in fp32);
- processes: DDP ranks per node for the training stages (`ovseg_core.distributed.launch`), worker
  processes for the units of mining, evaluation and the sweep; on CUDA each process takes one GPU;
- loader_workers: DataLoader processes decoding and preparing batches beside each compute process;
- threads: torch CPU threads per process (None: the CPUs this process may use, shared out among the
  processes and the units each runs at once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Mapping

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, not here: stages that never compute with it (world) start seconds
# faster without it, and every stage reads its compute section.

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
RDZV_BACKENDS = ("static", "c10d")


class ComputeError(RuntimeError):
    """The compute section asks for what this machine does not have."""


@dataclass(frozen=True)
class ComputeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:<index>
    precision: str = "auto"  # auto | fp32 | bf16
    processes: int | str = 1  # per node: DDP ranks (training) or unit worker processes; "auto": one per GPU
    loader_workers: int = 0  # DataLoader worker processes per compute process
    threads: int | None = None  # torch CPU threads per compute process; None = cores / concurrent work
    grad_checkpointing: bool = False  # CLIP training: recompute activations in backward (memory for time)
    nodes: int = 1  # training across machines: every node runs the stage with the same settings
    node_rank: int = 0  # this machine's place among them (0 writes the outputs)
    master: str | None = None  # "host:port" that node 0 listens on for the rendezvous (nodes > 1)
    rdzv_backend: str = "static"  # torchrun rendezvous: static (node_rank decides) or c10d

    def __post_init__(self) -> None:
        kind = self.device.split(":")[0]
        if kind not in DEVICES or (":" in self.device and (kind != "cuda" or not self.device[5:].isdigit())):
            raise ValueError(f"compute.device must be one of {DEVICES} or cuda:<index>, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"compute.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.processes == "auto":  # one process per visible GPU (one on a machine without)
            import torch

            gpus = torch.cuda.device_count() if self.device.split(":")[0] in ("auto", "cuda") else 0
            object.__setattr__(self, "processes", max(1, gpus if ":" not in self.device else 1))
        if not isinstance(self.processes, int) or self.processes < 1 or self.nodes < 1 or self.loader_workers < 0:
            raise ValueError(f"compute: processes ({self.processes!r}) must be >= 1 or auto, nodes >= 1, "
                             "loader_workers >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"compute.threads must be >= 1 or null, got {self.threads}")
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"compute.node_rank {self.node_rank} must lie in 0..nodes-1 ({self.nodes} nodes)")
        if self.nodes > 1 and not self.master:
            raise ValueError("compute.master (host:port of node 0) is needed for a multi-node run")
        if self.rdzv_backend not in RDZV_BACKENDS:
            raise ValueError(f"compute.rdzv_backend must be one of {RDZV_BACKENDS}, got {self.rdzv_backend!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ComputeConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown compute option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def for_stage(cls, params: Mapping[str, Any], stage: str, variant: str | None = None) -> "ComputeConfig":
        """params.yaml's `compute` values, overridden by `compute.stages.<stage>`, then `<stage>@<variant>`."""
        section = dict(params.get("compute") or {})
        overrides = section.pop("stages", None) or {}
        merged = {**section, **(overrides.get(stage) or {})}
        if variant is not None:
            merged.update(overrides.get(f"{stage}@{variant}") or {})
        return cls.from_dict(merged)

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes

    def cpu_threads(self, concurrent: int = 1) -> int:
        """torch threads for each of `concurrent` units running at once in each of the node's processes."""
        if self.threads is not None:
            return self.threads
        return max(1, usable_cpus() // (self.processes * max(1, concurrent)))

    def placement(self, device: torch.device | str | None = None) -> "Placement":
        """Resolve device and precision in this process (`device` pins a resolved device, e.g. a DDP rank's)."""
        import torch

        resolved = torch.device(device) if device is not None else resolve_device(self.device)
        return Placement(resolved, resolve_precision(self.precision, resolved))


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a batch scheduler's CPU binding, a
    container's cpuset), not the machine's count: a job given 8 CPUs of a 128-core node must not start 128
    threads per process (oversubscribed threads spin-wait for each other: ~1.8x slower on this 2-core machine
    with two 2-thread processes against two 1-thread ones)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS)
        return os.cpu_count() or 1


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when visible, else cpu; `cuda` on a machine without a visible GPU is a ComputeError."""
    import torch

    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ComputeError(
                f"compute.device is {name!r} but no CUDA device is visible to this process (torch "
                f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                "run on a GPU machine, or set compute.device to auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ComputeError(f"compute.device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a GPU with bf16 support (Ampere and newer), or a CPU with
    AVX512-BF16 or AMX instructions (where oneDNN's bf16 kernels beat fp32: measured 1.3-2.3x here)."""
    import torch

    if device.type == "cuda":  # not is_bf16_supported(): by default it also counts GPUs that only emulate bf16
        return torch.cuda.get_device_capability(device)[0] >= 8
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` → bf16 where the device computes in bf16 natively (`native_bf16`), fp32 otherwise; bf16 on a
    GPU without bf16 support is a ComputeError (a CPU without it only runs bf16 slowly)."""
    import torch

    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ComputeError(f"compute.precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                           "use fp32")
    return name


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision: where one process computes, and in which number format."""

    device: torch.device
    precision: str  # fp32 | bf16

    def autocast(self) -> ContextManager[Any]:
        """bf16 autocast around forward passes (fp32 parameters stay fp32); a no-op for fp32."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "precision": self.precision}


def autocast_off(device: torch.device) -> ContextManager[Any]:
    """Autocast off, inside a caller's `Placement.autocast`: for the small computations after the networks (cosine
    logits over a vocabulary, a semantic map's sums), which bf16 would round enough to change labels."""
    import torch

    return torch.autocast(device.type, enabled=False)


def __getattr__(name: str) -> Any:
    """`CPU_FP32`, the placement of the library's defaults, made when first asked for (it needs torch)."""
    if name == "CPU_FP32":
        import torch

        globals()["CPU_FP32"] = Placement(torch.device("cpu"), "fp32")
        return globals()["CPU_FP32"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_claim_lock = threading.Lock()
_claimed: list[tuple[int, Any]] = []  # (GPU index, open lock file): held for as long as this process lives


def claim_gpu() -> int:
    """The CUDA device index this worker process takes: the first GPU no other live process of this user
    has claimed on this machine (an flock per GPU, released when the process exits), so a pool of N
    processes on N GPUs spreads one per GPU whatever started it (a process pool, Dask workers). With more
    processes than GPUs, the extra ones share them round robin. One claim per process (threads share it)."""
    import torch

    count = torch.cuda.device_count()
    if count <= 1:
        return 0
    with _claim_lock:
        if _claimed:
            return _claimed[0][0]
        directory = Path(tempfile.gettempdir()) / f"ovseg-gpu-claims-{os.getuid()}"
        directory.mkdir(exist_ok=True)
        for index in range(count):
            handle = open(directory / f"cuda{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _claimed.append((index, handle))
            return index
        return os.getpid() % count


def worker_placement(cfg: ComputeConfig) -> Placement:
    """The placement of a unit worker process (mining, evaluation): its own GPU on CUDA (`claim_gpu`)."""
    import torch

    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", claim_gpu())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return cfg.placement(device)
