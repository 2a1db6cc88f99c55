"""Several processes inside a stage: with `compute.processes: 2` the training stages launch two DDP ranks
themselves (gloo on CPU, as nccl would on GPUs) and reach the weights of one process that runs the same
global batches. The comparisons run in fp32: they are about how the processes share the work; bf16 is
tested on its own (test_precision.py).

Tolerance: the ranks sum gradients in another order than one process does, and AdamW turns those
float-rounding differences into small weight differences. Per tensor, the difference between the two
runs must stay below REL of how far training moved the tensor (measured on 2026-12-02: at most 1.7e-4
for CLIP FT, smaller for MaskFormer and the prompts). One kind of parameter is left out: attention key
biases, whose true gradient is exactly zero (a softmax does not change when every logit of a row moves
by the same amount), so their gradient is pure rounding noise that Adam normalises into full-size,
random-sign steps (measured: 1-2% relative difference, as expected of noise).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.mpt import load_prompts
from stages.common import StageContext, details_path, run_stage
from test_stage_pretrain_clip import params as pretrain_params
from test_stage_train_maskformer import stage_params as maskformer_params

pytestmark = pytest.mark.slow  # minutes: real stages, several processes

REL = 1e-3
REPO = Path(__file__).resolve().parents[1]


def run(stage: str, params: dict, variant: str | None = None) -> dict:
    return run_stage(stage, StageContext(stage, copy.deepcopy(params), variant))


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor without its attention key biases (see the module docstring); None when it is one."""
    if name.endswith("k_proj.bias"):
        return None
    if name.endswith("in_proj_bias"):  # [q; k; v] biases of torch's fused attention projection
        third = tensor.shape[0] // 3
        return torch.cat([tensor[:third], tensor[2 * third:]])
    return tensor


def assert_close(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    assert one.keys() == two.keys() and one
    compared, bad = 0, {}
    for name in one:
        a, b, start = (without_key_bias(name, t[name].float()) for t in (one, two, initial))
        if a is None or not (moved := (a - start).norm().item()):
            continue  # not trained (frozen, or a buffer)
        compared += 1
        if (a - b).norm().item() > REL * moved + 1e-7:
            bad[name] = (a - b).norm().item() / moved
    assert compared, "training changed no weight: the comparison would say nothing"
    assert not bad, f"{len(bad)} tensors differ beyond float rounding (relative to their change): {sorted(bad.items())[:3]}"


def test_train_maskformer_two_processes_match_one(tiny_world, tiny_models, tmp_path):
    results, logs = {}, {}
    for processes in (1, 2):
        p = maskformer_params(tiny_world, tiny_models, tmp_path / f"p{processes}", processes=processes,
                              precision="fp32")
        p["train_maskformer"]["net"] = {"num_queries": 8, "decoder_layers": 2, "dropout": 0.1, "drop_path_rate": 0.1}
        p["train_maskformer"]["train"].update(steps=3, batch_size=4, micro_batches=2)
        run("train_maskformer", p)
        section = p["train_maskformer"]
        results[processes] = torch.load(Path(section["out"]) / "model.pt")["state_dict"]
        logs[processes] = Path(section["plots"]).read_text().splitlines()
        assert json.loads(details_path(section["metrics"]).read_text())["processes"] == processes
    torch.manual_seed(0)  # the stage's initialisation, for the "weights moved" check
    from ovseg_core.maskformer import build_model, preset_config
    initial = build_model(preset_config("tiny", **p["train_maskformer"]["net"]), results[1]["class_predictor.text_features"])
    assert_close(results[1], results[2], initial.state_dict())
    assert len(logs[2]) == len(logs[1]) == 4  # header + 3 steps, written once (by rank 0)


@pytest.mark.parametrize("mode", ["ft", "mpt"])
def test_adapt_clip_two_processes_match_one(mode, tiny_mined, tiny_models, tiny_world, tmp_path):
    outs = {}
    for processes in (1, 2):
        base = tmp_path / f"p{processes}"
        p = {"compute": {"threads": 1, "processes": processes, "precision": "fp32"}, "adapt_clip": {
            "clip_arch": tiny_models.clip_arch, "pairs": str(tiny_mined.out.parent), "out": str(base / "out"),
            "checkpoints": str(base / "ckpt"), "metrics": str(base / "metrics"), "plots": str(base / "plots"),
            "probe_dataset": str(tiny_world.eval), "probe_images": 2,
            "common": {"steps": 3, "batch_size": 8, "seed": 0, "checkpoint_every": 2},
            "modes": {"ft": {"mode": "ft", "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 1},
                      "mpt": {"mode": "mpt", "lr": 2e-2, "weight_decay": 0.0, "warmup_steps": 1, "prompt_depth": 2}},
            "variants": {mode: {"mode": mode, "init": str(tiny_models.clip), "pairs": tiny_mined.variant}},
        }}
        metrics = run("adapt_clip", p, mode)
        assert metrics["processes"] == processes and metrics["steps"] == 3
        outs[processes] = base / "out" / mode
    if mode == "ft":
        initial = load_clip(tiny_models.clip_arch, tiny_models.clip).model.state_dict()
        one, two = (load_clip(tiny_models.clip_arch, outs[n] / "clip.pt").model.state_dict() for n in (1, 2))
        assert_close(one, two, initial)
    else:
        one, two = (load_prompts(outs[n] / "prompts.pt").state_dict() for n in (1, 2))
        assert_close(one, two, {k: torch.zeros_like(v) for k, v in one.items()})


def test_pretrain_clip_two_processes_match_one(tiny_world, tmp_path):
    world = {"web": type("W", (), {"root": tiny_world.web})(), "eval": type("W", (), {"root": tiny_world.eval})()}
    states = {}
    for processes in (1, 2):
        p = pretrain_params(world, tmp_path / f"p{processes}", probe={"images": 1})
        p["compute"].update(processes=processes, precision="fp32")
        run("pretrain_clip", p)
        states[processes] = load_clip("ovseg-tiny-vit", Path(p["pretrain_clip"]["out"]) / "clip.pt").model.state_dict()
    torch.manual_seed(0)
    assert_close(states[1], states[2], load_clip("ovseg-tiny-vit").model.state_dict())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_as_one_job(tiny_world, tiny_models, tmp_path):
    """`compute.nodes: 2`: the same stage started on two "nodes" (here two processes on this machine, as on two
    machines) meets at `compute.master`; node 0 writes the model, node 1 nothing, and the weights are those
    of one node running both ranks."""
    net = {"num_queries": 8, "decoder_layers": 2, "dropout": 0.1, "drop_path_rate": 0.1}
    master = f"127.0.0.1:{free_port()}"
    nodes = []
    for rank in (0, 1):
        p = maskformer_params(tiny_world, tiny_models, tmp_path / "job", nodes=2, node_rank=rank, master=master,
                              precision="fp32")
        p["train_maskformer"]["net"] = net
        p["train_maskformer"]["train"].update(steps=3, batch_size=4, micro_batches=2)
        p["train_maskformer"]["out"] = str(tmp_path / f"node{rank}" / "models")
        (tmp_path / f"node{rank}").mkdir(parents=True)
        (tmp_path / f"node{rank}" / "params.yaml").write_text(yaml.safe_dump(p))
        nodes.append(subprocess.Popen([sys.executable, "-m", "stages.train_maskformer", "--params",
                                       str(tmp_path / f"node{rank}" / "params.yaml")], cwd=REPO,
                                      env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert (tmp_path / "node0" / "models" / "model.pt").is_file()
    assert not (tmp_path / "node1" / "models").exists()  # only the node of global rank 0 writes

    single = maskformer_params(tiny_world, tiny_models, tmp_path / "single", processes=2, precision="fp32")
    single["train_maskformer"]["net"] = net
    single["train_maskformer"]["train"].update(steps=3, batch_size=4, micro_batches=2)
    run("train_maskformer", single)
    one = torch.load(Path(single["train_maskformer"]["out"]) / "model.pt")["state_dict"]
    two = torch.load(tmp_path / "node0" / "models" / "model.pt")["state_dict"]
    from ovseg_core.maskformer import build_model, preset_config

    torch.manual_seed(0)
    assert_close(one, two, build_model(preset_config("tiny", **net), one["class_predictor.text_features"]).state_dict())
