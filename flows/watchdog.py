"""`python -m flows.watchdog PARENT SERVER`: stop process SERVER, an ephemeral Prefect server, once process
PARENT (the stage that started it) is gone, however it ended.

In ephemeral mode (plain `dvc repro`, no project server) each stage process starts a temporary Prefect server
as its child and stops it at exit. A stage killed with kill -9 (an OOM kill, a preempted job) cannot, and the
server ran on, parented to init, holding its port and memory (86 minutes were seen). Prefect starts it without
a hook to tie its life to the stage's, so a small process does. It imports only psutil and polls once a second.
"""
from __future__ import annotations

import sys
import time

import psutil

POLL_S = 1.0
STOP_TIMEOUT_S = 5.0


def alive(process: psutil.Process) -> bool:
    """Running, and not a zombie (an exited process its parent has not reaped yet: an orphan's new parent, init,
    may never reap it). psutil's `is_running` compares creation times, so a reused process id does not count."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch(parent: int, server: int, poll_s: float = POLL_S) -> bool:
    """Wait while both processes live; stop the server if it outlives the parent. True when it had to."""
    try:
        server_proc = psutil.Process(server)
    except psutil.NoSuchProcess:
        return False
    try:
        parent_proc: psutil.Process | None = psutil.Process(parent)
    except psutil.NoSuchProcess:  # killed before this process got going
        parent_proc = None
    while parent_proc is not None and alive(parent_proc) and alive(server_proc):
        time.sleep(poll_s)
    if not alive(server_proc):
        return False
    server_proc.terminate()  # uvicorn shuts down on SIGTERM
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while alive(server_proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(server_proc):
        server_proc.kill()
    return True


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
