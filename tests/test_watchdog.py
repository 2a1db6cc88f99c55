"""`flows.watchdog`: stops a server process that outlives the process that started it, and nothing else."""
from __future__ import annotations

import subprocess

import psutil

from flows.watchdog import alive, watch


def sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen(["sleep", str(seconds)])


def test_the_server_is_stopped_once_the_parent_ends():
    parent, server = sleeper(0.5), sleeper(60)
    try:
        assert watch(parent.pid, server.pid, poll_s=0.05) is True
        assert server.wait(timeout=5) == -15  # SIGTERM
    finally:
        server.kill()


def test_a_parent_gone_before_the_watch_begins_still_gets_its_server_stopped():
    """The stage may be killed before its watchdog has even looked at it (the race a test found)."""
    parent, server = sleeper(0), sleeper(60)
    parent.wait()
    try:
        assert watch(parent.pid, server.pid, poll_s=0.05) is True
        assert server.wait(timeout=5) == -15
    finally:
        server.kill()


def test_a_server_that_ends_first_is_left_alone_and_zombies_do_not_count_as_alive():
    parent, server = sleeper(60), sleeper(0.3)
    try:
        assert watch(parent.pid, server.pid, poll_s=0.05) is False
        assert parent.poll() is None  # the parent is never touched
        zombie = psutil.Process(server.pid)  # exited, not yet reaped by its parent (this test)
        assert zombie.status() == psutil.STATUS_ZOMBIE and not alive(zombie)
    finally:
        parent.kill()
        server.wait()
