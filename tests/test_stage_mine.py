"""The `mine` stage end to end on the tiny world: a killed run resumes to exactly the uninterrupted
result, Prefect's Dask and thread task runners mine the same pairs, and the work directory is tied to
the mining settings (changed settings start afresh, same settings resume)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ovseg_core.shards import INDEX_FILE, SIZES_FILE
from stages.common import StageContext, run_stage

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "proposals-nouns"


def pair_set(out: Path) -> dict[str, tuple]:
    """key → (image id, noun, score, proposal, bbox, crop bytes, mask bytes), read through the index's
    byte ranges into the shards."""
    shards: dict[str, bytes] = {}
    pairs = {}
    for row in pq.read_table(out / INDEX_FILE).to_pylist():
        data = shards.setdefault(row["shard"], (out / row["shard"]).read_bytes())
        crop = data[row["image_offset"]:row["image_offset"] + row["image_size"]]
        mask = data[row["mask_offset"]:row["mask_offset"] + row["mask_size"]]
        assert row["key"] not in pairs
        pairs[row["key"]] = (row["image_id"], row["noun"], row["score"], row["proposal_index"], tuple(row["bbox"]),
                             crop, mask)
    return pairs


def assert_same_pairs(out: Path, reference: Path) -> None:
    got, expected = pair_set(out), pair_set(reference)
    assert len(expected) > 0
    assert got.keys() == expected.keys()
    different = [k for k in expected if got[k] != expected[k]]
    assert not different, f"{len(different)} pairs differ, e.g. {different[:3]}"
    assert json.loads((out / SIZES_FILE).read_text()) == json.loads((reference / SIZES_FILE).read_text())


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


def stats_mtimes(work: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in work.glob("*.stats.json")}


def run_in_process(params: dict[str, Any], run: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The plain stage runner (or `run`), restoring the torch thread count the stage sets."""
    threads = torch.get_num_threads()
    try:
        return run() if run else run_stage("mine", StageContext("mine", params, VARIANT))
    finally:
        torch.set_num_threads(threads)


def kill_when(cmd: list[str], ready: Callable[[], bool], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path = ROOT, what: str = "the awaited state") -> None:
    """Run `cmd` until `ready()` (polled every 5 ms), then kill -9 it, as a crash or a preempted node does."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not ready():
                assert proc.poll() is None, f"the command ended before {what}; see {log_path}"
                assert time.monotonic() < deadline, f"no {what} in time; see {log_path}"
                time.sleep(0.005)
        finally:
            proc.kill()  # SIGKILL: no clean-up code runs
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def kill_when_a_unit_is_complete(cmd: list[str], work: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run the mining command `cmd` until its first unit is complete in `work`, then kill -9 it."""
    kill_when(cmd, lambda: bool(list(work.glob("*.stats.json"))), log_path, env, what="a complete unit")


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_mined, mine_params, tmp_path):
    params = mine_params(tmp_path)  # the settings tiny_mined used, other directories
    units = tiny_mined.summary["units"]
    assert units >= 4
    cmd = [sys.executable, "-m", "stages.mine", "--params", str(write_params(tmp_path / "params.yaml", params)),
           "--variant", VARIANT]  # the stage's command line, as DVC runs it without Prefect
    work = tmp_path / "work" / VARIANT
    out = tmp_path / "mined" / VARIANT

    kill_when_a_unit_is_complete(cmd, work, tmp_path / "killed.log")
    kept = stats_mtimes(work)
    assert 1 <= len(kept) < units and not out.exists()

    summary = run_in_process(params)  # the rerun (in-process: saves the interpreter start-up)
    assert summary["resumed_units"] == len(kept) and summary["units"] == units
    assert {k: v for k, v in stats_mtimes(work).items() if k in kept} == kept  # complete units were not redone
    assert_same_pairs(out, tiny_mined.out)


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_prefect_task_runners_mine_the_same_pairs(runner, tiny_mined, mine_params, tmp_path):
    from flows.prefect_stage import stage_flow  # imports Prefect: after conftest has isolated its state
    from stages.mine import _miner

    params = mine_params(tmp_path, prefect={"task_runner": runner, "max_workers": 2})
    before = _miner.cache_info()
    summary = run_in_process(params, stage_flow("mine", params, VARIANT))
    units = summary["units"]
    assert units == tiny_mined.summary["units"] and summary["resumed_units"] == 0
    # threads: every unit asks this process's Miner cache, which builds at most one (tiny_mined's spec is the
    # same, so it may exist already); dask: none here (each worker process builds its own)
    after = _miner.cache_info()
    built, reused = after.misses - before.misses, after.hits - before.hits
    assert (built <= 1 and built + reused == units) if runner == "threads" else (built, reused) == (0, 0)
    assert_same_pairs(tmp_path / "mined" / VARIANT, tiny_mined.out)


def test_changed_settings_start_afresh_same_settings_resume(tiny_mined, mine_params, tmp_path):
    work = tmp_path / "work" / VARIANT
    shutil.copytree(tiny_mined.work, work)  # a complete work directory of tiny_mined's settings
    before = stats_mtimes(work)
    units = tiny_mined.summary["units"]
    assert len(before) == units

    same = run_in_process(mine_params(tmp_path))
    assert same["resumed_units"] == units and stats_mtimes(work) == before
    assert_same_pairs(tmp_path / "mined" / VARIANT, tiny_mined.out)

    top = 2
    assert max(p[3] for p in pair_set(tiny_mined.out).values()) >= top  # the old shards hold proposals >= top
    changed = run_in_process(mine_params(tmp_path, top_proposals=top))
    assert changed["resumed_units"] == 0 and changed["units"] == units
    after = stats_mtimes(work)
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)
    assert json.loads((work / "fingerprint.json").read_text())["mining"]["top_proposals"] == top
    pairs = pair_set(tmp_path / "mined" / VARIANT)
    assert pairs and all(p[3] < top for p in pairs.values())  # only the top-2 proposals: nothing stale
