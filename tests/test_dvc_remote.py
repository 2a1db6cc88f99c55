"""A real DVC round trip of mined shards: `dvc repro` runs the mine stage in a fresh git + DVC
repository, `dvc push` sends its out to a local directory remote, and a `git clone` of the repository
gets byte-identical shards, stats, sizes.json, index and card back with `dvc pull`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from ovseg_core.shards import INDEX_FILE, completed_units

DVC = str(Path(sys.executable).with_name("dvc"))
VARIANT = "proposals-nouns"
OUT = f"mined/{VARIANT}"
GIT_IDENTITY = ["-c", "user.name=ovseg tests", "-c", "user.email=tests@ovseg.invalid"]


def sh(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_mined_shards_survive_push_clone_pull(tiny_mined, mine_params, tmp_path):
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    repo.mkdir()
    sh(["git", "init", "-q"], repo)
    sh([DVC, "init", "-q"], repo)
    sh([DVC, "config", "core.analytics", "false"], repo)
    sh([DVC, "config", "core.check_update", "false"], repo)
    sh([DVC, "remote", "add", "-d", "local", str(remote)], repo)

    params = mine_params(Path("."))  # tiny_mined's settings; outs relative to the repository
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    stage = {
        "cmd": f"{sys.executable} -m stages.mine --params params.yaml --variant {VARIANT}",
        "params": ["mine.common", f"mine.variants.{VARIANT}"],
        "outs": [OUT, {f"work/{VARIANT}": {"persist": True, "cache": False}}],
        "metrics": [{f"metrics/{VARIANT}.json": {"cache": False}}],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"mine": stage}}, sort_keys=False))
    (repo / ".gitignore").write_text("/work/\n")  # the persistent work directory is neither cached nor in git
    sh([DVC, "repro", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", *GIT_IDENTITY, "commit", "-q", "-m", "mined pairs"], repo)
    mined = files(repo / OUT)
    assert INDEX_FILE in mined and any(name.endswith(".tar") for name in mined)
    # the stage under DVC mined what the plain runner mined
    assert pq.read_table(repo / OUT / INDEX_FILE).equals(pq.read_table(tiny_mined.out / INDEX_FILE))

    sh([DVC, "push", "-q"], repo)
    assert any(p.is_file() for p in remote.rglob("*"))
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / OUT).exists()  # git carries only the pointers
    sh([DVC, "pull", "-q"], clone)

    assert files(clone / OUT) == mined
    units = tiny_mined.summary["units"]
    assert completed_units(clone / OUT) == list(range(units))  # shards match their recorded sha256
