"""Training the proposal network: AdamW, poly schedule, resumable, single process or DDP.

Determinism: the batch of global step s is `batch_order(len(dataset), batch_size, s, seed)`; the
augmentation of the sample at position p of that batch draws from a Generator seeded by
(seed, s, p); the dropout / drop-path randomness of micro-batch j (numbered across all ranks) is
seeded by (seed, s, j). All are functions of (seed, step, position) only, so a killed-and-resumed
run reaches the same weights as an uninterrupted one (also on CUDA, whose RNG state checkpoints do
not hold), and a batch splits into the same micro-batches whether they run on `world_size` DDP ranks
or as `accumulation` steps of one process (equal up to float summation order).

Launched by `torchrun` (WORLD_SIZE > 1 in the environment) training runs under torch's
DistributedDataParallel — gloo on CPU, nccl on CUDA — each rank taking its contiguous slice of every
batch; otherwise the same code runs in one process. Only rank 0 writes checkpoints and the log.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import write_text
from ..progress import Progress
from ..training.checkpoint import batch_order, load_checkpoint, save_checkpoint
from .augment import AugmentConfig, augment
from .data import SemanticDataset
from .model import OpenVocabMaskFormer, fingerprint
from .targets import semantic_targets

log = logging.getLogger(__name__)

LOG_FIELDS = ("step", "loss", "loss_cross_entropy", "loss_mask", "loss_dice", "grad_norm", "lr")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe. Paper: Swin-B lr 6e-5, wd 1e-2; R101c lr 2e-4, wd 1e-4, backbone ×0.1;
    both batch 32, 120K steps, poly 0.9, full-model gradient clipping at norm 0.01 (MaskFormer)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    crop_size: int
    backbone_lr_multiplier: float = 1.0
    poly_power: float = 0.9
    grad_clip: float | None = 0.01
    accumulation: int = 1  # micro-batches per rank and step (gradients are averaged)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    checkpoint_every: int = 100
    seed: int = 0
    num_workers: int = 0  # DataLoader processes preparing batches (results do not depend on it)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    started_here: bool  # this call initialised the process group (and so tears it down)


def process_rank() -> int:
    """This process's rank under torchrun (0 when not distributed), without touching the process group."""
    return int(os.environ.get("RANK", "0"))


def init_distributed() -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1, else describe a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if world <= 1:
        return Distributed(0, 1, device, False)
    started = not dist.is_initialized()
    if cuda:
        torch.cuda.set_device(device)
    if started:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device, started)


def parameter_groups(model: OpenVocabMaskFormer, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: backbone at lr × multiplier; no weight decay on norms, embeddings, Swin's relative
    position tables and the void embedding (detectron2's MaskFormer recipe)."""
    no_decay: set[str] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.Embedding)):
            no_decay.update(f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False))
    backbone = model.backbone_parameter_names()
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (name in no_decay or name.endswith(("relative_position_bias_table", "void_embedding")))
        groups.setdefault((name in backbone, decay), []).append(p)
    return [{"params": ps, "lr": cfg.lr * (cfg.backbone_lr_multiplier if is_bb else 1.0),
             "weight_decay": cfg.weight_decay if decay else 0.0} for (is_bb, decay), ps in sorted(groups.items())]


class StepBatches(torch.utils.data.Dataset):
    """Item s: this rank's micro-batches of global step s, each (images uint8 [b, 3, c, c], target masks,
    target classes). A function of (seed, step) only, so a DataLoader's workers may build them."""

    def __init__(self, dataset: SemanticDataset, cfg: TrainConfig, rank: int, world_size: int):
        self.dataset, self.cfg, self.rank = dataset, cfg, rank
        self.per_rank = cfg.batch_size // world_size
        self.micro = self.per_rank // cfg.accumulation
        self.augment = AugmentConfig(cfg.crop_size, tuple(cfg.scale_range), cfg.flip)

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> list[tuple[Tensor, list[Tensor], list[Tensor]]]:
        cfg, ignore = self.cfg, self.dataset.ignore_label
        order = batch_order(len(self.dataset), cfg.batch_size, step, cfg.seed)
        batches = []
        for j in range(cfg.accumulation):
            first = self.rank * self.per_rank + j * self.micro
            images, masks, classes = [], [], []
            for pos in range(first, first + self.micro):
                image, label = self.dataset[int(order[pos])]
                image, label = augment(image, label, self.augment, ignore, np.random.default_rng([cfg.seed, step, pos]))
                m, c = semantic_targets(label, ignore)
                images.append(image)
                masks.append(m)
                classes.append(c)
            batches.append((torch.stack(images), masks, classes))
        return batches


@contextlib.contextmanager
def seeded_rng(seed: list[int], device: torch.device) -> Iterator[None]:
    """Torch RNG (CPU and the current CUDA device) seeded from `seed`, restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] % 2**63))
        yield


def write_log(path: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def run_fingerprint(model: OpenVocabMaskFormer, cfg: TrainConfig, num_items: int, world_size: int) -> str:
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "num_workers")}
    facts = {"train": recipe, "model": fingerprint(model.net, model.class_predictor.text_features),
             "items": num_items, "world_size": world_size}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def train(model: OpenVocabMaskFormer, dataset: SemanticDataset, cfg: TrainConfig, checkpoint_dir: str | Path,
          log_path: str | Path | None = None) -> list[dict[str, float]]:
    """Train `model` (in place) for cfg.steps steps, resuming from `checkpoint_dir` when it holds a
    checkpoint of the same run. The vocabulary of `model` must follow the dataset's class order.
    Returns the per-step log (rank 0; other ranks return an empty list)."""
    if model.num_classes != len(dataset.classes):
        raise ValueError(f"model vocabulary has {model.num_classes} classes, dataset {len(dataset.classes)}")
    ctx = init_distributed()
    slices = ctx.world_size * cfg.accumulation
    if cfg.batch_size % slices:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by world size × accumulation = {slices}")
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"dataset has {len(dataset)} samples, fewer than the batch size {cfg.batch_size}")
    checkpoint_dir = Path(checkpoint_dir)
    model.to(ctx.device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.steps, power=cfg.poly_power)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    run_id = run_fingerprint(model, cfg, len(dataset), ctx.world_size)
    start, rows = 0, []
    found = load_checkpoint(checkpoint_dir, {}, restore_rng=False)
    if found is not None and found[1].get("fingerprint") == run_id:
        start, extra = load_checkpoint(checkpoint_dir, state)
        rows = extra["log"] if ctx.rank == 0 else []
        log.info("resuming from step %d of %d (%s)", start, cfg.steps, checkpoint_dir)
    elif found is not None:
        log.warning("%s holds a checkpoint of a different run (config, vocabulary or data changed); starting over",
                    checkpoint_dir)

    net: nn.Module = model
    if ctx.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = torch.utils.data.DataLoader(StepBatches(dataset, cfg, ctx.rank, ctx.world_size), batch_size=None,
                                          sampler=range(start, cfg.steps), num_workers=cfg.num_workers)
    progress = Progress(cfg.steps, "maskformer") if ctx.rank == 0 else None
    if progress is not None and start:
        progress.update(start)
    try:
        for step, micro_batches in zip(range(start, cfg.steps), batches):
            optimizer.zero_grad(set_to_none=True)
            terms = torch.zeros(4, device=ctx.device)  # loss, cross entropy, mask, dice (last decoder layer)
            for j, (images, masks, classes) in enumerate(micro_batches):
                sync = j == cfg.accumulation - 1 or ctx.world_size == 1
                with (contextlib.nullcontext() if sync else net.no_sync()), \
                        seeded_rng([cfg.seed, step, ctx.rank * cfg.accumulation + j], ctx.device):
                    out = net(pixel_values=model.normalize(images.to(ctx.device)),
                              mask_labels=[m.to(ctx.device) for m in masks],
                              class_labels=[c.to(ctx.device) for c in classes])
                    (out.loss / cfg.accumulation).backward()
                parts = model.loss_components
                terms += torch.stack([out.loss.detach(), parts["loss_cross_entropy"], parts["loss_mask"],
                                      parts["loss_dice"]]) / cfg.accumulation
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
            lr = optimizer.param_groups[0]["lr"]  # groups are sorted: the first is a head (non-backbone) group
            optimizer.step()
            scheduler.step()
            if ctx.world_size > 1:
                dist.all_reduce(terms)
                terms /= ctx.world_size
            done = step + 1
            if ctx.rank == 0:
                values = terms.tolist()
                rows.append({"step": done, "loss": values[0], "loss_cross_entropy": values[1],
                             "loss_mask": values[2], "loss_dice": values[3], "grad_norm": float(grad_norm), "lr": lr})
                progress.update(1, loss=values[0])
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    save_checkpoint(checkpoint_dir, done, state, extra={"fingerprint": run_id, "log": rows})
                    if log_path is not None:
                        write_log(Path(log_path), rows)
        if ctx.rank == 0 and log_path is not None and start == cfg.steps:
            write_log(Path(log_path), rows)  # already complete: still (re)write the log output
        if ctx.world_size > 1:
            dist.barrier()  # every rank returns only once rank 0 has written its files
    finally:
        if progress is not None:
            progress.close()
        if ctx.started_here:
            dist.destroy_process_group()
    return rows
