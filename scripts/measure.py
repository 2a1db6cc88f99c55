"""Run a command and measure it: wall time and the peak memory of its whole process tree.

Peak memory of the command's process and all its descendants (a stage's Prefect server, DVC, DataLoader and
Dask workers included), sampled every 0.2 s, two ways:
- `peak_rss_gib`: the largest sum of resident set sizes. It counts a page shared by N processes N times: torch's
  libraries, mapped by every worker process, make a tree of 4 Python processes look ~0.3 GiB per process bigger
  than it is.
- `peak_pss_gib`: the largest sum of proportional set sizes (a shared page split among its sharers): what the
  tree takes from the machine's memory. Linux only; elsewhere it repeats the RSS figure.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(summed RSS, summed PSS) of `root` and its descendants, in bytes."""
    rss = pss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except psutil.AccessDenied:
            info = proc.memory_info()
        except psutil.Error:  # gone meanwhile
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_rss_gib: float
    peak_pss_gib: float
    output: str


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
        kill_when: Callable[[], bool] | None = None) -> Measured:
    """Run `cmd` to its end, or, with `kill_when`, until that returns True: then SIGKILL its whole process group
    (as a crash or an OOM kill would, no clean-up code runs)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    peak_rss = peak_pss = 0
    root, chunks = psutil.Process(proc.pid), []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            chunks.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss, pss = tree_memory(root)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if kill_when is not None and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=10)
    return Measured(proc.returncode, round(time.perf_counter() - start, 1), round(peak_rss / 2**30, 3),
                    round(peak_pss / 2**30, 3), "".join(chunks))


def last_json(output: str) -> dict:
    """The last JSON object a command printed at the start of a line (a stage prints its summary so)."""
    start = output.rindex("\n{") + 1 if not output.startswith("{") or "\n{" in output else 0
    return json.JSONDecoder().raw_decode(output[start:])[0]


def cpu_name() -> str:
    """The CPU model (Linux's /proc/cpuinfo), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """What a benchmark record says it ran on: CPU model, cores, memory."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"


def tool_env() -> dict[str, str]:
    """This process's environment for the commands a benchmark runs: this interpreter's bin first on PATH (its
    dvc and python), DVC's analytics off."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, DVC_NO_ANALYTICS="1", PATH=path)


def commit(cwd: Path) -> str:
    """The short hash of the commit checked out in `cwd` (what a benchmark record says it measured)."""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True)
    return git.stdout.strip()
