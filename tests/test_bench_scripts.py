"""The benchmark scripts measure what they say and write nothing into the tree they measure."""
import subprocess
from pathlib import Path

import pytest

from scripts.bench_mine import REPO, stage_params
from scripts.bench_noop import noop_repro
from scripts import measure


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
