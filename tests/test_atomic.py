"""Atomic writes: a reader sees the old file or the new one, never half of one; a write that fails leaves the old
file; and what a killed process left beside a target (its temporary) is removed by the next successful write."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal

import pytest

from ovseg_core.atomic import atomic_dir, atomic_file, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def _write_forever(path: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write: no clean-up runs


def test_what_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "loss.json"
    other = tmp_path / "other.json"
    write_json(other, [])
    proc = multiprocessing.get_context("fork").Process(target=_write_forever, args=(str(target),))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".loss.json.")]
    assert len(left) == 1 and not target.exists()  # the killed write's temporary, and no target
    write_json(target, [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.json", "other.json"]  # other files untouched


def test_atomic_dir_replaces_whole_and_removes_a_killed_writers_leftovers(tmp_path):
    target = tmp_path / "plots"
    (tmp_path / ".plots.abc.tmp").mkdir()  # as a killed writer leaves it
    (tmp_path / ".plots.abc.tmp" / "half.csv").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "a.csv").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b.csv").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]
    assert sorted(p.name for p in target.iterdir()) == ["b.csv"]
