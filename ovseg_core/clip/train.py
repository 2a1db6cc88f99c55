"""One contrastive training loop for CLIP: pretraining from scratch, fine-tuning, mask prompt tuning.

Modes (paper §3.3 / §4.1):
* `pretrain` — both towers train, image + caption pairs (the embedded world's stand-in for OpenAI's pretraining);
* `ft` — image tower trains, text tower locked (open_clip's `lock_text_tower`);
* `mpt` — only the mask prompts train; every CLIP weight, the logit scale included, is frozen.

Loss: open_clip's `ClipLoss` logits. Mined data repeats nouns within a batch, so texts are
deduplicated per batch: each image's target is the index of its text (image→text cross-entropy) and
each unique text's target is the uniform distribution over the images carrying it (text→image, as a
KL divergence so a perfect match scores 0), so the same noun is never a negative of itself. With all
texts distinct this is exactly `ClipLoss`.

In `ft` and `mpt` the text tower is frozen, so text features come from a per-noun cache, ensembled
over the ViLD templates (as at inference) unless `text_templates` is off.

Devices, precision, processes (`compute`): the batch of a step is shared out among the DDP ranks in
equal contiguous slices; every rank encodes its own images, the image features of all ranks are
gathered (with their gradients: `torch.distributed.nn.all_gather`) and every rank computes the loss
of the whole batch, with the text features of the whole batch's unique texts (cached in ft/mpt,
encoded by every rank in pretraining). DDP's gradient average then equals the one-process gradient
of the same global batch, so N processes reproduce one process up to float rounding. In bf16,
forward passes run under autocast; weights, gradients and AdamW state stay fp32 (FT's lr 5e-6 would
vanish in bf16 weights) and the loss is computed in fp32. Batches are prepared by
`compute.loader_workers` DataLoader processes.

Resumable: batches come from `batch_order(seed, step)`, the LR from open_clip's stateless cosine
schedule, and model/optimizer/prompts/RNG are checkpointed, so a killed run resumed from its
checkpoint reaches the same weights as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import torch
import torch.distributed.nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip_train.scheduler import cosine_lr
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import write_json
from ..compute import ComputeConfig, Placement
from ..distributed import init_distributed, shutdown
from ..errors import DataError
from ..progress import Progress
from ..training.checkpoint import batch_order, load_checkpoint, save_checkpoint, seed_everything
from ..loading import step_loader
from .models import ClipBundle
from .mpt import MaskPrompts, encode_masked
from .text import VILD_TEMPLATES, TextFeatureCache

log = logging.getLogger(__name__)

Mode = Literal["pretrain", "ft", "mpt"]
MODES: tuple[str, ...] = ("pretrain", "ft", "mpt")


class ClipSampleDataset(Protocol):
    """Indexable: item i is (normalised image [3, S, S], mask [S, S] bool or None, text); `text(i)` is
    item i's text alone (cheap: every rank needs the texts of the whole batch)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, str]: ...

    def text(self, index: int) -> str: ...


@dataclass
class ClipTrainConfig:
    mode: Mode
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 100
    prompt_depth: int = 3  # mpt only
    prompt_init_std: float = 0.0  # mpt only; 0 = zero-initialised prompts
    text_templates: bool = True  # ft/mpt: encode nouns through the 14 ViLD templates
    init_logit_scale: float | None = None  # pretrain/ft: set exp(logit_scale) to this at step 0
    learn_logit_scale: bool = True  # pretrain/ft (mpt never changes CLIP); clamped to <= 100 like open_clip
    grad_clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be >= 1")


@dataclass
class ClipTrainResult:
    step: int  # steps done so far (== config.steps when finished)
    finished: bool
    trainable_params: int
    resumed_from_step: int = 0  # steps that were already done when this call started
    log: list[dict[str, float]] = field(default_factory=list)  # one row per step: step, loss, lr
    prompts: MaskPrompts | None = None


class DedupClipLoss(ClipLoss):
    """ClipLoss with deduplicated texts: image i's positive is text `text_index[i]`; a text's positives
    are all images carrying it."""

    def forward(  # type: ignore[override]
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        text_index: torch.Tensor,
    ) -> torch.Tensor:
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        image_loss = F.cross_entropy(logits_per_image, text_index)
        owners = F.one_hot(text_index, num_classes=text_features.shape[0]).T.to(logits_per_text.dtype)
        counts = owners.sum(dim=1, keepdim=True)
        # KL to the uniform target (cross-entropy minus the target's entropy log(count)): 0 at the optimum
        text_loss = F.cross_entropy(logits_per_text, owners / counts) - counts.log().mean()
        return (image_loss + text_loss) / 2


def param_groups(named: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    # open_clip_train's convention: no decay on gains, biases and the logit scale.
    def no_decay(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    decay = [p for n, p in named if p.requires_grad and not no_decay(n, p)]
    other = [p for n, p in named if p.requires_grad and no_decay(n, p)]
    groups = ({"params": other, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


def prepare_trainables(
    bundle: ClipBundle, config: ClipTrainConfig, prompts: MaskPrompts | None
) -> tuple[list[tuple[str, torch.nn.Parameter]], MaskPrompts | None]:
    """Set requires_grad on the bundle's model for the mode; return the named trainable parameters."""
    model = bundle.model
    if config.init_logit_scale is not None and config.mode != "mpt":
        with torch.no_grad():
            model.logit_scale.fill_(math.log(config.init_logit_scale))
    if config.mode == "mpt":
        model.requires_grad_(False)
        if prompts is None:
            prompts = MaskPrompts.for_visual(model.visual, config.prompt_depth, config.prompt_init_std)
        elif prompts.depth != config.prompt_depth:
            raise ValueError(f"given prompts have depth {prompts.depth}, config says {config.prompt_depth}")
        prompts.requires_grad_(True)
        return [(f"prompts.{n}", p) for n, p in prompts.named_parameters()], prompts
    if prompts is not None:
        raise ValueError(f"prompts are only trained in mode 'mpt', not {config.mode!r}")
    model.requires_grad_(True)
    if config.mode == "ft":
        model.lock_text_tower()
    model.logit_scale.requires_grad_(config.learn_logit_scale)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad], None


class StepBatches(torch.utils.data.Dataset):
    """Item s: (this rank's images [b, 3, S, S], their masks [b, S, S] or None, the texts of the whole
    batch of step s) — a function of (seed, step) only, so DataLoader workers may build it."""

    def __init__(self, dataset: ClipSampleDataset, config: ClipTrainConfig, rank: int, world_size: int):
        if world_size > 1 and len(dataset) < config.batch_size:
            raise ValueError(f"{len(dataset)} samples are fewer than the batch size {config.batch_size}: the "
                             "batch cannot be shared out among processes")
        if config.batch_size % world_size:
            raise ValueError(f"batch size {config.batch_size} is not divisible by the {world_size} processes")
        self.dataset, self.config, self.rank, self.world_size = dataset, config, rank, world_size

    def __len__(self) -> int:
        return self.config.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        order = batch_order(len(self.dataset), self.config.batch_size, step, self.config.seed)
        per_rank = len(order) // self.world_size
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        items = [self.dataset[int(i)] for i in mine]
        masks = [it[1] for it in items]
        if any(m is None for m in masks) and not all(m is None for m in masks):
            raise ValueError("training batch mixes samples with and without masks")
        stacked = None if masks[0] is None else torch.stack(masks)
        return torch.stack([it[0] for it in items]), stacked, [self.dataset.text(int(i)) for i in order]


class TrainedTowers(nn.Module):
    """What one step runs and DDP wraps: CLIP's towers (with the mask prompts in mpt). Its forward gives
    normalised fp32 image features of this rank's crops, and text features when given tokens."""

    def __init__(self, bundle: ClipBundle, prompts: MaskPrompts | None):
        super().__init__()
        self.bundle = bundle
        self.model = bundle.model
        self.prompts = prompts

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None, tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = encode_masked(self.bundle, images, masks if self.prompts is not None else None, self.prompts)
        text = F.normalize(self.model.encode_text(tokens).float(), dim=-1) if tokens is not None else None
        return image, text


def _gather(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's features in rank order, differentiable (each rank's gradient flows back to it)."""
    if world_size == 1:
        return features
    return torch.cat(torch.distributed.nn.all_gather(features))


def batch_loss(net: nn.Module, bundle: ClipBundle, mode: Mode, images: torch.Tensor, masks: torch.Tensor | None,
               texts: list[str], text_cache: TextFeatureCache, placement: Placement, world_size: int = 1
               ) -> torch.Tensor:
    """The loss of one step's whole batch: `net` (`TrainedTowers`, DDP-wrapped or not) encodes this rank's
    images, every rank's features are gathered, and the texts of the whole batch are deduplicated."""
    unique = list(dict.fromkeys(texts))
    text_index = torch.tensor([unique.index(t) for t in texts], device=images.device)
    with placement.autocast():
        if mode == "pretrain":
            image_feats, text_feats = net(images, masks, bundle.tokenize(unique))
        else:
            image_feats, _ = net(images, masks)
            text_feats = text_cache(unique)
    return DedupClipLoss()(_gather(image_feats, world_size), text_feats, bundle.model.logit_scale.exp(), text_index)


def train_clip(
    bundle: ClipBundle,
    dataset: ClipSampleDataset,
    config: ClipTrainConfig,
    checkpoint_dir: str | Path,
    prompts: MaskPrompts | None = None,
    log_path: str | Path | None = None,
    stop_after: int | None = None,
    compute: ComputeConfig | None = None,
) -> ClipTrainResult:
    """Train in place (the bundle's model, or the prompts in mode 'mpt'), resuming from `checkpoint_dir`,
    on `compute`'s device and precision (launched ranks share each batch: see the module docstring).

    `stop_after` ends this call after that global step (a time-boxed or interrupted run); calling again
    with the same config resumes. `log_path` receives the per-step log as a JSON list (for `dvc plots`)
    at every checkpoint. Only rank 0 writes. Sets requires_grad flags on the bundle's model according
    to the mode, and leaves the model (and prompts) on the training device.
    """
    if len(dataset) == 0:
        raise ValueError("train_clip: empty dataset")
    compute = compute or ComputeConfig()
    rank = init_distributed(compute.device)
    placement = compute.placement(rank.device)
    seed_everything(config.seed)
    model = bundle.model.to(rank.device)
    named, prompts = prepare_trainables(bundle, config, prompts)
    if compute.grad_checkpointing:
        model.set_grad_checkpointing(True)
    trainable = sum(p.numel() for _, p in named)
    log.info("clip %s: %d trainable parameters on %s (%s, %d process(es))", config.mode, trainable,
             rank.device, placement.precision, rank.world_size)
    # fused: one kernel over all parameters (the tiny CLIP's 98 tensors: 2.7 ms a step on a CPU, 21.5 ms for the
    # per-tensor loop PyTorch takes there by default; on CUDA the fastest implementation too)
    optimizer = torch.optim.AdamW(param_groups(named, config.weight_decay), lr=config.lr, fused=True)
    schedule = cosine_lr(optimizer, config.lr, config.warmup_steps, config.steps)
    text_cache = TextFeatureCache(bundle, VILD_TEMPLATES if config.text_templates else ("{}",))

    state: dict[str, Any] = {"optimizer": optimizer}
    if config.mode == "mpt":
        state["prompts"] = prompts  # CLIP itself is an input, unchanged by this mode
    else:
        state["model"] = model
    config_dict = asdict(config)
    step, train_log = 0, []
    resumed = load_checkpoint(checkpoint_dir, state)
    if resumed is not None:
        step, extra = resumed
        if extra.get("config") != config_dict:
            raise DataError(
                Path(checkpoint_dir), f"checkpoint was written by a different config: {extra.get('config')} != {config_dict}"
            )
        train_log = list(extra["log"])
        log.info("clip %s: resumed at step %d", config.mode, step)
    start = step

    towers = TrainedTowers(bundle, prompts)
    net: nn.Module = towers
    if rank.world_size > 1:
        net = DistributedDataParallel(towers, device_ids=[rank.device.index] if rank.device.type == "cuda" else None)
    last = config.steps if stop_after is None else min(config.steps, stop_after)
    batches = step_loader(StepBatches(dataset, config, rank.rank, rank.world_size), step, last,
                          compute.loader_workers, pin=rank.device.type == "cuda")
    model.train(config.mode != "mpt")
    progress = Progress(max(0, last - step), desc=f"clip-{config.mode}") if rank.is_main else None
    try:
        for images, masks, texts in batches:
            if config.mode == "mpt" and masks is None:
                raise ValueError("mode 'mpt' needs samples with masks")
            images = images.to(rank.device, non_blocking=True)
            masks = masks.to(rank.device, non_blocking=True) if masks is not None else None
            lr = schedule(step)
            loss = batch_loss(net, bundle, config.mode, images, masks, texts, text_cache, placement, rank.world_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], config.grad_clip_norm)
            optimizer.step()
            if model.logit_scale.requires_grad:
                with torch.no_grad():  # as open_clip's trainer: temperature no lower than 1/100
                    model.logit_scale.clamp_(0, math.log(100))
            step += 1
            train_log.append({"step": step, "loss": float(loss.detach()), "lr": float(lr)})
            if progress is not None:
                progress.update(1, loss=train_log[-1]["loss"])
            if rank.is_main and (step % config.checkpoint_every == 0 or step == last):
                save_checkpoint(checkpoint_dir, step, state, {"config": config_dict, "log": train_log})
                if log_path is not None:
                    write_json(log_path, train_log, indent=None)
        if rank.is_main and log_path is not None:
            write_json(log_path, train_log, indent=None)
        if rank.world_size > 1:
            torch.distributed.barrier()  # every rank returns only once rank 0 has written its files
    finally:
        if progress is not None:
            progress.close()
        shutdown(rank)
    model.eval()
    return ClipTrainResult(step=step, finished=step >= config.steps, trainable_params=trainable,
                           resumed_from_step=start, log=train_log, prompts=prompts)
