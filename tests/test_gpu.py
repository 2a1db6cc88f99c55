"""What needs a CUDA device (marker `gpu`: skipped, with the reason, where none is visible; run them with
`pytest -m gpu` on a GPU machine): the embedded stages on the GPU in bf16, NCCL DDP across two GPUs, and
one step of every paper-size unit in bf16 with its FLOPs and memory."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ovseg_core.compute import CPU_FP32, ComputeConfig, Placement
from ovseg_core.crops import masked_crops
from stages.common import StageContext, details_path, run_stage
from test_mining_scale import assert_same_regions_in_bf16, mined, miner
from test_stage_train_maskformer import stage_params as maskformer_params

pytestmark = pytest.mark.gpu
CUDA_BF16 = Placement(torch.device("cuda"), "bf16")


def test_compute_auto_takes_the_gpu_in_bf16():
    placement = ComputeConfig().placement()
    assert placement.device.type == "cuda" and placement.precision == "bf16"


def test_mining_on_the_gpu_in_bf16_finds_the_cpu_pairs(tiny_world, tiny_models):
    on_cpu = mined(miner(tiny_world, tiny_models, placement=CPU_FP32))
    on_gpu = mined(miner(tiny_world, tiny_models, placement=CUDA_BF16))
    assert_same_regions_in_bf16(on_gpu, on_cpu)


def test_an_image_whose_masks_all_vanish_has_its_empty_crops_on_the_gpu_beside_the_others():
    """Mining concatenates the crops of a batch's images; one with no mask above the threshold must not bring
    CPU tensors into it."""
    image = torch.full((3, 8, 8), 128, dtype=torch.uint8, device="cuda")
    none = masked_crops(image, torch.zeros(2, 8, 8, device="cuda"), 4, (0.5,) * 3, (0.25,) * 3)
    one = masked_crops(image, torch.ones(1, 8, 8, device="cuda"), 4, (0.5,) * 3, (0.25,) * 3)
    assert len(none) == 0 and {t.device.type for t in (none.crops, none.masks, none.keep, none.boxes)} == {"cuda"}
    assert torch.cat([none.crops, one.crops]).shape == (1, 3, 4, 4)
    assert torch.cat([none.masks, one.masks]).all()


def test_train_maskformer_stage_on_the_gpu(tiny_world, tiny_models, tmp_path):
    p = maskformer_params(tiny_world, tiny_models, tmp_path)
    run_stage("train_maskformer", StageContext("train_maskformer", copy.deepcopy(p)))
    metrics = json.loads(details_path(p["train_maskformer"]["metrics"]).read_text())
    assert metrics["device"].startswith("cuda") and metrics["precision"] == "bf16"
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))


@pytest.mark.parametrize("mode", ["ft", "mpt"])
def test_adapt_clip_stage_on_the_gpu(mode, tiny_mined, tiny_models, tiny_world, tmp_path):
    p = {"compute": {}, "adapt_clip": {
        "clip_arch": tiny_models.clip_arch, "pairs": str(tiny_mined.out.parent), "out": str(tmp_path / "out"),
        "checkpoints": str(tmp_path / "ckpt"), "metrics": str(tmp_path / "metrics"), "plots": str(tmp_path / "plots"),
        "probe_dataset": str(tiny_world.eval), "probe_images": 2,
        "common": {"steps": 3, "batch_size": 8, "seed": 0, "checkpoint_every": 2},
        "modes": {"ft": {"mode": "ft", "lr": 5e-6, "weight_decay": 0.2, "warmup_steps": 1},
                  "mpt": {"mode": "mpt", "lr": 2e-2, "weight_decay": 0.0, "warmup_steps": 1}},
        "variants": {mode: {"mode": mode, "init": str(tiny_models.clip), "pairs": tiny_mined.variant}},
    }}
    metrics = run_stage("adapt_clip", StageContext("adapt_clip", p, mode))
    assert metrics["device"].startswith("cuda") and metrics["precision"] == "bf16" and metrics["steps"] == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_train_maskformer_on_two_gpus_matches_one(tiny_world, tiny_models, tmp_path):
    states = {}
    for processes in (1, 2):
        p = maskformer_params(tiny_world, tiny_models, tmp_path / f"p{processes}", processes=processes,
                              precision="fp32")
        p["train_maskformer"]["train"].update(batch_size=4, micro_batches=2)
        run_stage("train_maskformer", StageContext("train_maskformer", copy.deepcopy(p)))
        states[processes] = torch.load(Path(p["train_maskformer"]["out"]) / "model.pt")["state_dict"]
    worst = max((states[1][k].float() - states[2][k].float()).abs().max().item() for k in states[1])
    assert worst < 1e-3


# The paper's units, one run each on the GPU in bf16 (scripts/bench_paper_scale.py times them properly):
# FLOPs as counted on the CPU on 2026-12-02 (DESIGN.md §7), per image or per training sample.
PAPER_TFLOPS = {"mine_20": 3.75, "train_maskformer": 1.15, "mpt": 0.33, "ft": 0.49}


@pytest.fixture(scope="module")
def vit_l14():
    from ovseg_core.clip.models import load_clip

    torch.manual_seed(0)
    clip = load_clip("ViT-L-14", device="cuda")
    clip.model.requires_grad_(False)
    return clip


def test_paper_size_units_run_in_bf16(vit_l14):
    from scripts import bench_paper_scale as bench

    units = {"mine_20": bench.bench_mine(vit_l14, CUDA_BF16, 20, images=4, loader_workers=2, repeat=1),
             "train_maskformer": bench.bench_maskformer_step(vit_l14, CUDA_BF16, batch=2, repeat=1),
             "mpt": bench.bench_clip_step(vit_l14, CUDA_BF16, "mpt", batch=8, repeat=1),
             "ft": bench.bench_clip_step(vit_l14, CUDA_BF16, "ft", batch=8, repeat=1),
             "evaluate": bench.bench_evaluate(vit_l14, CUDA_BF16, repeat=1)}
    for name, expected in PAPER_TFLOPS.items():
        assert units[name]["tflops"] == pytest.approx(expected, rel=0.15), name
    assert all(u["peak_gpu_memory_gib"] < 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
               for u in units.values())
    assert units["mine_20"]["pairs_per_image"] > 0 and units["evaluate"]["crops"] > 0
