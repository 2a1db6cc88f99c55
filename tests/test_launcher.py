"""The preloaded launcher (`flows.launcher`), as `python -m flows.pipeline` uses it: a stage command
(`python -m flows.stage`, as dvc.yaml runs it) hands its stage to a process forked from the launcher, which
writes what the stage writes anyway, and the command behaves as the stage's own process would: its exit status
and error output, Ctrl-C, and a kill -9 that takes the stage down with it. A command that the launcher cannot
serve runs the stage itself. Against a real local Prefect server, on the tiny world's `mine` stage.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from flows import launcher
from test_prefect_runs import project_server
from test_stage_mine import assert_same_pairs, write_params

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "proposals-nouns"


@pytest.fixture(scope="module")
def served(tmp_path_factory, mine_params) -> Iterator[dict[str, Any]]:
    """A Prefect server and a launcher, ready; the environment of commands it serves, its process, and a
    factory of mine params files."""
    base = tmp_path_factory.mktemp("launcher")

    def params_file(name: str) -> Path:
        directory = base / name
        directory.mkdir()
        return write_params(directory / "params.yaml", {**mine_params(directory), "runs": str(directory / "runs")})

    with project_server(base / "state") as env, launcher.running(env, log=base / "launcher.log") as proc:
        deadline = time.monotonic() + 120
        while not os.path.exists(env[launcher.ENV]):
            assert proc.poll() is None, (base / "launcher.log").read_text()
            assert time.monotonic() < deadline, "the launcher did not come up in 2 minutes"
            time.sleep(0.1)
        yield {"env": env, "launcher": psutil.Process(proc.pid), "params_file": params_file}


def mine_command(params: Path, variant: str = VARIANT) -> list[str]:
    return [sys.executable, "-m", "flows.stage", "mine", "--variant", variant, "--params", str(params)]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # a file, not a pipe: nothing has to drain it
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_a_stage_child(served: dict[str, Any], command: subprocess.Popen) -> psutil.Process | None:
    """The launcher's child that runs the command's stage, once it shows (None if the command ends first)."""
    while command.poll() is None:
        children = served["launcher"].children()
        if children:
            return children[0]
        time.sleep(0.005)
    return None


def wait_for_output(log: Path, text: str, command: subprocess.Popen) -> bool:
    """Whether `text` shows in the command's output before it ends."""
    while command.poll() is None:
        if text in log.read_text(errors="replace"):
            return True
        time.sleep(0.01)
    return False


def stage_pids(served: dict[str, Any]) -> set[int]:
    """The process ids that ran the mining flow runs the server holds (each run is tagged pid-<id>)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.orphans import PID_TAG

    with temporary_settings(updates={PREFECT_API_URL: served["env"]["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[f"mine-{VARIANT}"])))
    return {int(t.removeprefix(PID_TAG)) for r in runs for t in r.tags if t.startswith(PID_TAG)}


def gone(process: psutil.Process, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:  # exited; the launcher reaps it within a second
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_the_stage_runs_in_a_child_of_the_launcher_and_writes_what_it_always_writes(served, tiny_mined, tmp_path):
    params = served["params_file"]("served")
    command = start(mine_command(params), served["env"], tmp_path / "log")
    child = wait_for_a_stage_child(served, command)
    assert command.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    assert child is not None and child.pid in stage_pids(served)  # its flow run ran in the launcher's child
    output = (tmp_path / "log").read_text()
    assert '"units":' in output and "Finished in state Completed()" in output  # its stdout and logs came through
    assert_same_pairs(params.parent / "mined" / VARIANT, tiny_mined.out)
    assert (params.parent / "runs" / "mine" / f"{VARIANT}.json").exists()  # the run record, as without it


def test_a_failing_stage_fails_the_command_with_its_error(served, tmp_path):
    params = served["params_file"]("failing")
    result = subprocess.run(mine_command(params, variant="no-such-variant"), cwd=ROOT, env=served["env"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "mine.variants has no 'no-such-variant'" in result.stderr
    assert "cannot run this stage" not in result.stderr  # it was the launcher's child that failed
    assert served["launcher"].is_running()  # and the launcher serves on


def test_killing_the_command_kills_the_stage(served, tmp_path):
    params = served["params_file"]("killed")
    command = start(mine_command(params), served["env"], tmp_path / "log")
    child = wait_for_a_stage_child(served, command)
    assert child is not None and wait_for_output(tmp_path / "log", "Beginning flow run", command)
    command.kill()  # kill -9: the command cannot pass anything on
    command.wait()
    assert gone(child), "the stage ran on after its command was killed"
    assert not (params.parent / "mined" / VARIANT).exists()  # no partial out


def test_ctrl_c_of_the_command_reaches_the_stage(served, tmp_path):
    params = served["params_file"]("interrupted")
    command = start(mine_command(params), served["env"], tmp_path / "log")
    child = wait_for_a_stage_child(served, command)
    assert child is not None and wait_for_output(tmp_path / "log", "Beginning flow run", command)
    command.send_signal(signal.SIGINT)
    assert command.wait(timeout=120) != 0
    assert gone(child)
    assert "KeyboardInterrupt" in (tmp_path / "log").read_text()  # raised in the stage, as in its own process
    assert not (params.parent / "mined" / VARIANT).exists()


@pytest.mark.parametrize("change", ["environment", "no launcher"])
def test_a_command_the_launcher_cannot_serve_runs_the_stage_itself(change, served, tiny_mined, tmp_path):
    params = served["params_file"](f"itself-{change.replace(' ', '-')}")
    env = dict(served["env"])
    if change == "environment":
        env["OMP_NUM_THREADS"] = "3"  # the launcher's torch was imported without it
    else:
        env[launcher.ENV] = str(tmp_path / "no-socket")
    command = start(mine_command(params), env, tmp_path / "log")
    assert command.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    assert command.pid in stage_pids(served)  # its flow run ran in the command's own process
    output = (tmp_path / "log").read_text()
    if change == "environment":
        assert "cannot run this stage (other values of OMP_NUM_THREADS); running it here" in output
    assert_same_pairs(params.parent / "mined" / VARIANT, tiny_mined.out)


def test_the_launcher_ends_with_its_parent(tmp_path):
    """A driver killed with kill -9 cannot stop its launcher: the launcher sees it gone and ends itself."""
    script = ("import os, time\nfrom flows import launcher\n"
              f"with launcher.running(log={str(tmp_path / 'launcher.log')!r}) as proc:\n"
              "    print(proc.pid, os.environ[launcher.ENV], flush=True)\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pid, path = parent.stdout.readline().split()
    server = psutil.Process(int(pid))
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(path):  # serving
            assert server.is_running() and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()
            time.sleep(0.1)
        parent.kill()
        parent.wait()
        assert gone(server, timeout_s=10)
        assert not os.path.exists(path)  # it removed its socket
    finally:
        parent.kill()
        server.kill()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def test_messages_of_any_size_keep_their_descriptors():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = os.pipe()
    with left, right:
        message = {"env": {f"K{i}": "v" * 100 for i in range(2000)}}  # ~230 KB: several reads
        sender = threading.Thread(target=launcher.send, args=(left, message, (writer,)))
        sender.start()
        got, fds = launcher.receive(right, max_fds=3)
        sender.join()
        assert got == message and len(fds) == 1
        os.write(fds[0], b"x")  # the received descriptor is the pipe's writing end
        assert os.read(reader, 1) == b"x"
        left.close()
        assert launcher.receive(right) == (None, [])
    for fd in (reader, writer, fds[0]):
        os.close(fd)


def test_refusal_names_what_differs():
    reference = {"executable": "/py", "cwd": "/repo", "env": {"PREFECT_API_URL": "a", "OMP_NUM_THREADS": "2"}}
    same = {"executable": "/py", "cwd": "/repo", "env": {"PREFECT_API_URL": "a", "OMP_NUM_THREADS": "2",
                                                        "PATH": "/other", "DVC_STAGE": "x"}}
    assert launcher.refusal(same, reference) is None  # variables no import reads may differ
    assert "PREFECT_API_URL" in launcher.refusal({**same, "env": {"OMP_NUM_THREADS": "2"}}, reference)
    assert "working directory" in launcher.refusal({**same, "cwd": "/tmp/exp"}, reference)
    assert "interpreter" in launcher.refusal({**same, "executable": "/other/py"}, reference)
