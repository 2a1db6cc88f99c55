"""The benchmark scripts measure what they say and write nothing into the tree they measure."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from scripts.bench_mine import REPO, stage_params, use_model_configs
from scripts.bench_noop import noop_repro
from scripts import bench_side_by_side, measure


def test_noop_repro_refuses_a_run_that_did_work_and_times_one_that_did_none(tmp_path):
    env = measure.tool_env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  write:\n    cmd: python -c \"open('out.txt', 'w').write('x')\"\n    outs: [out.txt]\n")

    with pytest.raises(SystemExit, match="ran something"):
        noop_repro(tmp_path, 2, env)  # the first repro runs the stage
    assert (tmp_path / "out.txt").read_text() == "x"

    timed = noop_repro(tmp_path, 2, env)
    assert len(timed["wall_s"]["runs"]) == 2
    assert 0 < timed["wall_s"]["min"] <= timed["wall_s"]["median"] <= timed["wall_s"]["max"]


def test_bench_mine_points_every_output_of_the_stage_into_its_own_work_directory(tmp_path):
    """The stage run by the benchmark must not overwrite the tree's committed outs or run records."""
    params = stage_params(REPO, REPO, "proposals-nouns", tmp_path, {"images_per_unit": 7})
    outputs = [params["mine"][key] for key in ("out", "work", "metrics")] + [params["runs"]]
    assert all(Path(path).is_relative_to(tmp_path) for path in outputs), outputs
    assert params["mine"]["common"]["images_per_unit"] == 7


def test_bench_mine_gives_the_compared_revision_the_model_configs_of_the_run_directorys_models(tmp_path):
    """An older revision whose config names another architecture (c921254: 6 vision layers) must load today's models."""
    configs = tmp_path / "ovseg_core" / "model_configs"
    configs.mkdir(parents=True)
    (configs / "ovseg-tiny-vit.json").write_text(json.dumps({"vision_cfg": {"layers": 6}}))
    use_model_configs(tmp_path)
    ours = REPO / "ovseg_core" / "model_configs" / "ovseg-tiny-vit.json"
    assert json.loads((configs / "ovseg-tiny-vit.json").read_text()) == json.loads(ours.read_text())


def test_bench_side_by_side_pins_each_concurrent_stage_to_one_core_and_clears_then_restores_the_fresh_paths(tmp_path):
    """Stand-in stages (a `flows` package in the run directory) record the cores they may use and whether their
    checkpoint directory was there when they started."""
    run_dir = tmp_path / "run"
    (run_dir / "flows").mkdir(parents=True)
    (run_dir / "flows" / "__init__.py").write_text("")
    (run_dir / "flows" / "server.py").write_text("def start():\n    return 'http://127.0.0.1:9/api'\n")
    (run_dir / "flows" / "stage.py").write_text(
        "import json, os, pathlib, sys\n"
        "ck = pathlib.Path('ck-' + sys.argv[1])  # each stage's own checkpoints\n"
        "with open('runs.jsonl', 'a') as f:\n"
        "    f.write(json.dumps({'args': sys.argv[1:], 'cores': len(os.sched_getaffinity(0)),\n"
        "                        'fresh': ck.exists()}) + '\\n')\n"
        "ck.mkdir(exist_ok=True)\n")
    (run_dir / "ck-a").mkdir()
    (run_dir / "ck-a" / "original.txt").write_text("kept")
    out = tmp_path / "bench.json"
    bound = os.sched_getaffinity(0)  # this pytest worker's CPU: widened, so that pinning makes a difference
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        bench_side_by_side.main(["--run-dir", str(run_dir), "--fresh", "ck-a", "--fresh", "ck-b", "--out", str(out),
                                 "--", "a --x 1", "b"])
        every = len(os.sched_getaffinity(0))
    finally:
        os.sched_setaffinity(0, bound)
    runs = [json.loads(line) for line in (run_dir / "runs.jsonl").read_text().splitlines()]
    assert [r["args"] for r in runs[:2]] == [["a", "--x", "1"], ["b"]]  # one after the other, in order
    assert [r["cores"] for r in runs[:2]] == [every] * 2  # with every core
    assert [r["cores"] for r in runs[2:]] == [1, 1]  # side by side: one core each
    assert not any(r["fresh"] for r in runs)  # each run started without checkpoints to resume from
    assert (run_dir / "ck-a" / "original.txt").read_text() == "kept" and not (run_dir / "ck-b").exists()
    assert not list(run_dir.glob("*.bench-original"))
    record = json.loads(out.read_text())
    assert set(record["rounds"][0]["sequential"]) == set(record["rounds"][0]["side_by_side"]) == {"a --x 1", "b", "total"}
    assert record["speedup"] > 0
