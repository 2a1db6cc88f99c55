"""Training the proposal network: AdamW, poly schedule, resumable, single process or DDP, fp32 or bf16.

Determinism: the batch of global step s is `batch_order(len(dataset), batch_size, s, seed)`, split
into `micro_batches` equal micro-batches shared out among the ranks (rank r runs micro-batches
r·m .. (r+1)·m − 1, m = micro_batches / world size, accumulating gradients); the augmentation of the
sample at position p of the batch draws from a Generator seeded by (seed, s, p); the dropout /
drop-path randomness of micro-batch j is seeded by (seed, s, j). All are functions of (seed, step,
position) only, so a killed-and-resumed run reaches the same weights as an uninterrupted one (also on
CUDA, whose RNG state checkpoints do not hold), and with `micro_batches` fixed the result does not
depend on the number of processes: 1 process accumulating 8 micro-batches, 2 ranks accumulating 4 or
8 ranks with one each compute the same step (equal up to float summation order).

Under a launcher (`ovseg_core.distributed.launch`; WORLD_SIZE > 1) training runs under torch's
DistributedDataParallel, nccl on CUDA and gloo on CPU; otherwise the same code runs in one process.
Only rank 0 writes checkpoints and the log. Precision: in bf16, forward passes run under autocast
while weights, gradients and AdamW state stay fp32, and the loss (matching included) is fp32
(`OpenVocabMaskFormer.get_loss_dict`). Batches are prepared by `compute.loader_workers` DataLoader
processes and copied to the GPU from pinned memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import write_csv
from ..compute import ComputeConfig
from ..distributed import init_distributed, shutdown
from ..progress import Progress
from ..training.checkpoint import batch_order, load_checkpoint, save_checkpoint
from ..loading import step_loader
from .augment import AugmentConfig, augment
from .data import SemanticDataset
from .model import OpenVocabMaskFormer, fingerprint
from .targets import semantic_targets

log = logging.getLogger(__name__)

LOG_FIELDS = ("step", "loss", "loss_cross_entropy", "loss_mask", "loss_dice", "grad_norm", "lr")


@dataclass
class TrainResult:
    resumed_from_step: int  # steps already done (in the checkpoint) when this call started
    log: list[dict[str, float]] = field(default_factory=list)  # rank 0: one row per step, LOG_FIELDS


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
    micro_batches: int | None = None  # slices of each batch (gradients summed); None = one per rank
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    checkpoint_every: int = 100
    seed: int = 0

    def slices(self, world_size: int) -> int:
        """Micro-batches per step for a run on `world_size` ranks (a multiple of it)."""
        slices = self.micro_batches or world_size
        if slices % world_size or self.batch_size % slices:
            raise ValueError(f"micro_batches {slices} must be a multiple of the {world_size} process(es) and divide "
                             f"the batch size {self.batch_size}")
        return slices


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
        self.dataset, self.cfg = dataset, cfg
        slices = cfg.slices(world_size)
        self.per_rank = slices // world_size  # micro-batches this rank runs
        self.first = rank * self.per_rank  # global index of its first micro-batch
        self.micro = cfg.batch_size // slices  # samples per micro-batch
        self.augment = AugmentConfig(cfg.crop_size, tuple(cfg.scale_range), cfg.flip)

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> list[tuple[Tensor, list[Tensor], list[Tensor]]]:
        cfg, ignore = self.cfg, self.dataset.ignore_label
        order = batch_order(len(self.dataset), cfg.batch_size, step, cfg.seed)
        batches = []
        for j in range(self.first, self.first + self.per_rank):
            images, masks, classes = [], [], []
            for pos in range(j * self.micro, (j + 1) * self.micro):
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


def run_fingerprint(model: OpenVocabMaskFormer, cfg: TrainConfig, num_items: int, slices: int) -> str:
    """What decides the weights: the recipe, architecture, vocabulary, data size and the batch's split
    into micro-batches (not the number of processes sharing them, nor checkpointing)."""
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "micro_batches")}
    facts = {"train": recipe, "model": fingerprint(model.net, model.class_predictor.text_features),
             "items": num_items, "micro_batches": slices}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def train(model: OpenVocabMaskFormer, dataset: SemanticDataset, cfg: TrainConfig, checkpoint_dir: str | Path,
          log_path: str | Path | None = None, compute: ComputeConfig | None = None) -> TrainResult:
    """Train `model` (in place) for cfg.steps steps on `compute`'s device and precision, resuming from
    `checkpoint_dir` when it holds a checkpoint of the same run. The vocabulary of `model` must follow
    the dataset's class order. Returns the per-step log (rank 0; other ranks get an empty one) and the step
    this call resumed from."""
    compute = compute or ComputeConfig()
    if model.num_classes != len(dataset.classes):
        raise ValueError(f"model vocabulary has {model.num_classes} classes, dataset {len(dataset.classes)}")
    ctx = init_distributed(compute.device)
    placement = compute.placement(ctx.device)
    slices = cfg.slices(ctx.world_size)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"dataset has {len(dataset)} samples, fewer than the batch size {cfg.batch_size}")
    checkpoint_dir = Path(checkpoint_dir)
    model.to(ctx.device).train()
    # fused: one kernel over all parameters; the per-tensor loop PyTorch takes on CPUs by default cost 9.8 ms a step
    # here (223 tensors), fused 2.5 ms; on CUDA it is the fastest implementation too
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.steps, power=cfg.poly_power)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    run_id = run_fingerprint(model, cfg, len(dataset), slices)
    start, rows = 0, []
    found = load_checkpoint(checkpoint_dir, {}, restore_rng=False)
    if found is not None and found[1].get("fingerprint") == run_id:
        start, extra = load_checkpoint(checkpoint_dir, state)
        rows = extra["log"] if ctx.is_main else []
        log.info("resuming from step %d of %d (%s)", start, cfg.steps, checkpoint_dir)
    elif found is not None:
        log.warning("%s holds a checkpoint of a different run (config, vocabulary or data changed); starting over",
                    checkpoint_dir)

    net: nn.Module = model
    if ctx.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    per_rank = slices // ctx.world_size
    batches = step_loader(StepBatches(dataset, cfg, ctx.rank, ctx.world_size), start, cfg.steps,
                          compute.loader_workers, pin=ctx.device.type == "cuda")
    progress = Progress(cfg.steps, "maskformer") if ctx.is_main else None
    if progress is not None and start:
        progress.update(start)
    try:
        for step, micro_batches in zip(range(start, cfg.steps), batches):
            optimizer.zero_grad(set_to_none=True)
            terms = torch.zeros(4, device=ctx.device)  # loss, cross entropy, mask, dice (last decoder layer)
            for j, (images, masks, classes) in enumerate(micro_batches):
                sync = j == per_rank - 1 or ctx.world_size == 1
                with (contextlib.nullcontext() if sync else net.no_sync()), \
                        seeded_rng([cfg.seed, step, ctx.rank * per_rank + j], ctx.device):
                    with placement.autocast():
                        out = net(pixel_values=model.normalize(images.to(ctx.device, non_blocking=True)),
                                  mask_labels=[m.to(ctx.device, non_blocking=True) for m in masks],
                                  class_labels=[c.to(ctx.device, non_blocking=True) for c in classes])
                    (out.loss / per_rank).backward()  # DDP then averages over the ranks: the mean of all slices
                parts = model.loss_components
                terms += torch.stack([out.loss.detach(), parts["loss_cross_entropy"], parts["loss_mask"],
                                      parts["loss_dice"]]) / per_rank
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
            lr = optimizer.param_groups[0]["lr"]  # groups are sorted: the first is a head (non-backbone) group
            optimizer.step()
            scheduler.step()
            if ctx.world_size > 1:
                dist.all_reduce(terms)
                terms /= ctx.world_size
            done = step + 1
            if ctx.is_main:
                values = terms.tolist()
                rows.append({"step": done, "loss": values[0], "loss_cross_entropy": values[1],
                             "loss_mask": values[2], "loss_dice": values[3], "grad_norm": float(grad_norm), "lr": lr})
                progress.update(1, loss=values[0])
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    save_checkpoint(checkpoint_dir, done, state, extra={"fingerprint": run_id, "log": rows})
                    if log_path is not None:
                        write_csv(log_path, rows, LOG_FIELDS)
        if ctx.is_main and log_path is not None and start == cfg.steps:
            write_csv(log_path, rows, LOG_FIELDS)  # already complete: still (re)write the log output
        if ctx.world_size > 1:
            dist.barrier()  # every rank returns only once rank 0 has written its files
    finally:
        if progress is not None:
            progress.close()
        shutdown(ctx)
    return TrainResult(resumed_from_step=start, log=rows)
