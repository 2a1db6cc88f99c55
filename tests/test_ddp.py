"""DDP: two CPU processes (torchrun, gloo) train the tiny proposal network to identical weights, equal to
one process that runs the same two per-rank slices of every batch as gradient-accumulation steps."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.maskformer import build_model, preset_config
from ovseg_core.maskformer.data import SemanticDataset
from ovseg_core.maskformer.train import TrainConfig, train
from test_maskformer import class_text, make_prepared

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
NET = dict(num_queries=8, decoder_layers=2, dropout=0.1, drop_path_rate=0.1)
STEPS = 3

DRIVER = """
import os, sys, torch
torch.set_num_threads(1)
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.maskformer import build_model, preset_config
from ovseg_core.maskformer.data import SemanticDataset
from ovseg_core.maskformer.train import TrainConfig, train
from test_ddp import NET, STEPS, config
from test_maskformer import class_text
data, ckpt, log, out = sys.argv[1:]
torch.manual_seed(int(os.environ["RANK"]))  # different inits per rank: DDP must broadcast rank 0's
model = build_model(preset_config("tiny", **NET), class_text(4))
rows = train(model, SemanticDataset(PreparedDataset.load(data)), config(accumulation=1), ckpt, log)
torch.save({"state": model.state_dict(), "rows": rows}, f"{out}/rank{os.environ['RANK']}.pt")
"""


def config(accumulation: int) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=4, lr=1e-3, weight_decay=1e-4, crop_size=48,
                       accumulation=accumulation, checkpoint_every=2)


def test_two_process_ddp_matches_single_process_accumulation(tmp_path):
    data = make_prepared(tmp_path, 8)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(data), str(tmp_path / "ckpt"), str(tmp_path / "loss.csv"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    assert len(rank0["rows"]) == STEPS and rank1["rows"] == []  # only rank 0 keeps (and writes) the log
    with open(tmp_path / "loss.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, STEPS + 1))

    # One process, rank 0's initial weights, each batch as two accumulation steps of the ranks' slices.
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", **NET), class_text(4))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    rows = train(model, SemanticDataset(PreparedDataset.load(data)), config(accumulation=2), tmp_path / "single")
    reference = model.state_dict()
    changed = [k for k in reference if not torch.equal(reference[k], initial[k])]
    assert len(changed) > 50  # training moved the weights, so agreement below is not trivial
    for k in reference:
        assert torch.allclose(rank0["state"][k], reference[k], rtol=1e-4, atol=1e-5), k
    for a, b in zip(rows, rank0["rows"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"]))
