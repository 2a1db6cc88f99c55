"""bf16 autocast (compute.precision) on the CPU, where torch supports it too: the GPU's number format,
tested here. Trainings in bf16 follow the fp32 losses; weights stay fp32, so an update as small as FT's lr 5e-6
is kept. (Evaluation in bf16 against fp32 with trained models: tests/test_trained_run.py.)"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.train import train_clip
from ovseg_core.compute import ComputeConfig, ComputeError, Placement, native_bf16, resolve_precision, usable_cpus
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.maskformer import build_model, preset_config
from ovseg_core.maskformer.data import SemanticDataset
from ovseg_core.maskformer.train import TrainConfig, train
from test_clip_train import SyntheticPairs, config
from test_maskformer import class_text, make_prepared

CPU = torch.device("cpu")
LOSS_RTOL = 0.02  # per-step CLIP training loss, bf16 vs fp32
# MaskFormer: the first step (same weights) within LOSS_RTOL; later steps within 5%, since after an update
# the Hungarian matching may pair a ground-truth mask with another query in the two runs (measured: 2.3%).
MASKFORMER_LATER_RTOL = 0.05


def test_auto_precision_is_bf16_where_native_and_can_be_set():
    assert ComputeConfig(device="cpu").placement().precision == ("bf16" if native_bf16(CPU) else "fp32")
    assert ComputeConfig(device="cpu", precision="fp32").placement() == Placement(CPU, "fp32")
    assert ComputeConfig(device="cpu", precision="bf16").placement() == Placement(CPU, "bf16")
    with Placement(CPU, "bf16").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with Placement(CPU, "fp32").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_auto_precision_takes_bf16_only_on_gpus_that_compute_it_natively(monkeypatch):
    """torch.cuda.is_bf16_supported() also says yes for GPUs that only emulate bf16 (V100, T4: compute capability
    7.x); those run fp32. The capability is the hardware's answer, stood in for here (no GPU on this machine)."""
    cuda = torch.device("cuda", 1)
    asked = []
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: asked.append(d) or c)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "GPU")
        assert native_bf16(cuda) is native and asked[-1] == cuda  # the device asked about, not the current one
        assert resolve_precision("auto", cuda) == ("bf16" if native else "fp32")
        if not native:
            with pytest.raises(ComputeError, match="no bf16 support"):
                resolve_precision("bf16", cuda)


def test_the_maskformer_class_logits_stay_fp32_inside_a_bf16_autocast():
    """100 × a bf16 cosine is off by up to ~0.3: p_mf and the class loss would be quantised."""
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", num_queries=4), class_text(5)).eval()
    queries = torch.randn(2, 4, model.net.hidden_dim)
    head = model.class_predictor
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inside = head(queries)
        embedded = head.projection(queries)  # the MLP before the cosine runs in bf16
    classes = torch.cat([head.text_features, F.normalize(head.void_embedding.detach(), dim=0)[None]])
    expected = head.logit_scale * F.normalize(embedded.float(), dim=-1) @ classes.T
    assert embedded.dtype == torch.bfloat16 and inside.dtype == torch.float32 and inside.shape == (2, 4, 6)
    assert torch.allclose(inside, expected, atol=1e-5)


def test_cpu_threads_share_out_the_cpus_this_process_may_use():
    """Not the machine's CPU count: a process bound to some CPUs (taskset, a batch job) starts as many threads."""
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mask)})
        assert usable_cpus() == 1 and ComputeConfig().cpu_threads() == 1
    finally:
        os.sched_setaffinity(0, mask)
    assert usable_cpus() == len(mask) and ComputeConfig().cpu_threads() == len(mask)
    assert ComputeConfig().cpu_threads(concurrent=len(mask)) == 1 and ComputeConfig(threads=3).cpu_threads() == 3


@pytest.mark.parametrize("mode", ["ft", "mpt", "pretrain"])
def test_bf16_clip_training_follows_the_fp32_losses(mode, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        bundle = load_clip("ovseg-tiny-vit")
        lr = {"mpt": 2e-2}.get(mode, 1e-3)
        result = train_clip(bundle, SyntheticPairs(with_masks=mode == "mpt"), config(mode, steps=4, lr=lr),
                            tmp_path / precision, compute=ComputeConfig(device="cpu", precision=precision))
        losses[precision] = [row["loss"] for row in result.log]
        assert all(p.dtype == torch.float32 for p in bundle.model.parameters())
    assert losses["fp32"][0] != losses["fp32"][-1]
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) <= LOSS_RTOL * abs(a), (losses["fp32"], losses["bf16"])


def test_bf16_fine_tuning_keeps_updates_of_lr_5e_6(tmp_path):
    """bf16 weights could not hold them: near 0.02 a bf16 step is ~1e-4, twenty times such an update."""
    torch.manual_seed(0)
    bundle = load_clip("ovseg-tiny-vit")
    before = bundle.model.visual.proj.detach().clone()
    train_clip(bundle, SyntheticPairs(), config("ft", steps=2, lr=5e-6, warmup_steps=0, weight_decay=0.0),
               tmp_path, compute=ComputeConfig(device="cpu", precision="bf16"))
    step = (bundle.model.visual.proj.detach() - before).abs()
    assert bundle.model.visual.proj.dtype == torch.float32
    assert step.max() > 1e-6 and step.median() > 1e-7  # Adam moves every entry by ~lr per step


def test_bf16_maskformer_training_follows_the_fp32_losses(tmp_path):
    data = SemanticDataset(PreparedDataset.load(make_prepared(tmp_path, 8)))
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-4, weight_decay=1e-4, crop_size=48)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(preset_config("tiny", num_queries=8, decoder_layers=2), class_text(4))
        rows = train(model, data, cfg, tmp_path / precision, compute=ComputeConfig(device="cpu", precision=precision)).log
        losses[precision] = [row["loss"] for row in rows]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    for step, (a, b) in enumerate(zip(losses["fp32"], losses["bf16"])):
        assert abs(a - b) <= (LOSS_RTOL if step == 0 else MASKFORMER_LATER_RTOL) * abs(a), (losses["fp32"], losses["bf16"])
