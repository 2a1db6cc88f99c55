"""The preloaded stage launcher: `python -m flows.pipeline` starts one beside `dvc repro`, and each stage that
`dvc repro` then runs is a process forked from it instead of a fresh interpreter.

Why: every stage is a new `python -m flows.stage` process, and each spent 5-10 s importing torch, open_clip,
transformers and Prefect before its first step (21 stages: about 2 of the embedded run's 12.6 minutes on two
cores). The launcher imports them once. A stage's command (`flows.stage`) connects to it over a Unix socket and
hands over its arguments, working directory, environment and its stdin/stdout/stderr; the launcher forks a child
that runs the stage with them and reports its exit status, with which the command exits. The command stays a
process of its own, so DVC sees what it saw before: the output, the exit status, and Ctrl-C or a kill of the
command (forwarded to the stage; if the command dies, the stage's process group is killed).

A command runs the stage itself when no launcher is up yet (it imports for a few seconds at the start), or
when its environment differs in what the imports read (`IMPORT_TIME_PREFIXES`, e.g. another Prefect server or
other thread settings), or its interpreter or working directory differ (e.g. a queued `dvc exp run`, in a
temporary copy). Forking is safe because the launcher has no thread and no CUDA context when it forks (checked
before it serves): a stage starts its threads, and picks its GPU, in its own process.

    python -m flows.launcher SOCKET PARENT_PID    # what `running()` starts; it exits with its parent
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import pkgutil
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator, MutableMapping

ENV = "OVSEG_LAUNCHER"  # the launcher's socket, in the environment of the commands it serves
# Environment variables that the preloaded modules may have read while being imported (Prefect's settings,
# thread pools, CUDA, the project's state directory): a command whose values differ runs the stage itself.
IMPORT_TIME_PREFIXES = ("PREFECT_", "OVSEG_", "PYTHON", "OMP_", "MKL_", "KMP_", "CUDA_", "PYTORCH_", "TORCH",
                        "HF_", "TRANSFORMERS_", "LD_")
STDIO = (0, 1, 2)
POLL_S = 1.0  # how often the launcher reaps its children and checks that its parent lives
_LENGTH = struct.Struct("!I")


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    """One length-prefixed JSON message, with file descriptors attached (SCM_RIGHTS)."""
    data = json.dumps(message).encode()
    payload = _LENGTH.pack(len(data)) + data
    sent = socket.send_fds(sock, [payload], list(fds)) if fds else sock.send(payload)
    sock.sendall(payload[sent:])


def _exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the descriptors that came with it; (None, []) when the peer has closed."""
    head, fds, _, _ = socket.recv_fds(sock, _LENGTH.size, max_fds) if max_fds else (sock.recv(_LENGTH.size), [], 0, 0)
    if not head:
        return None, fds
    if len(head) < _LENGTH.size:
        rest = _exactly(sock, _LENGTH.size - len(head))
        if rest is None:
            return None, fds
        head += rest
    body = _exactly(sock, _LENGTH.unpack(head)[0])
    return (None if body is None else json.loads(body)), fds


def import_time_env(env: MutableMapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


def refusal(request: dict[str, Any], reference: dict[str, Any]) -> str | None:
    """Why a command must run its stage itself (None: the launcher can run it)."""
    if request["executable"] != reference["executable"]:
        return f"another interpreter ({request['executable']})"
    if request["cwd"] != reference["cwd"]:
        return f"another working directory ({request['cwd']})"
    theirs, ours = import_time_env(request["env"]), reference["env"]
    differing = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    return f"other values of {', '.join(differing)}" if differing else None


# --- the command's side (flows.stage): imports nothing heavy -------------------------------------------------

def delegate(argv: list[str]) -> int | None:
    """Run `flows.stage argv` in a child of the launcher named by $OVSEG_LAUNCHER and return its exit status;
    None when this process has to run the stage itself (no launcher, or it refused)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            sock.connect(path)
        except OSError:  # not up yet, or gone
            return None
        send(sock, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "executable": sys.executable}, STDIO)
        reply, _ = receive(sock)
        if reply is None or "refused" in reply:
            why = "it closed the connection" if reply is None else reply["refused"]
            print(f"flows.stage: the preloaded launcher cannot run this stage ({why}); running it here",
                  file=sys.stderr, flush=True)
            return None
        pid = int(reply["pid"])

        def forward(signum: int, _frame: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, forward)
        reply, _ = receive(sock)
    if reply is None:
        print(f"flows.stage: the stage's process {pid} ended without an exit status", file=sys.stderr, flush=True)
        return 1
    return int(reply["exit"])


# --- the launcher's side --------------------------------------------------------------------------------------

def preload() -> None:
    """Import what the stages import: the Prefect flow wrapper and every stage module."""
    import stages

    importlib.import_module("flows.prefect_stage")
    for module in pkgutil.iter_modules(stages.__path__):
        importlib.import_module(f"stages.{module.name}")


def _exit_status(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def run_child(conn: socket.socket, reference: dict[str, Any]) -> int:
    """In a forked child: take over the command's stdio, directory and environment, run the stage, return its
    exit status; the command learns it at the end of the child's exit handlers."""
    os.setsid()  # its own process group: what the command's death kills
    request, fds = receive(conn, max_fds=len(STDIO))
    if request is None or len(fds) != len(STDIO):
        return 1
    why = refusal(request, reference)
    if why:
        send(conn, {"refused": why})
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip(STDIO, fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as a new interpreter would set it up
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(reference["set_by_imports"])  # e.g. TORCHINDUCTOR_CACHE_DIR, as a fresh process sets them
    sys.argv = [sys.argv[0], *request["argv"]]
    send(conn, {"pid": os.getpid()})
    finished = threading.Event()
    status = 1

    def report() -> None:
        # registered first, so it runs after the handlers the stage registers (Prefect's log flush); then it
        # ends the process: the interpreter's teardown of torch & co. would take another 1-2 s, holding the
        # command's stdout open meanwhile
        finished.set()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            send(conn, {"exit": status})
        os._exit(status)

    def watch() -> None:  # the command only ever closes the connection: when it dies, so does the stage
        with contextlib.suppress(OSError):
            conn.recv(1)
        if not finished.is_set():
            os.killpg(os.getpid(), signal.SIGTERM)

    atexit.register(report)
    threading.Thread(target=watch, name="launcher-command-watch", daemon=True).start()
    from flows.prefect_stage import run
    from flows.stage import parse

    try:
        run(parse(request["argv"]))
        status = 0
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException:  # noqa: BLE001  (as the interpreter would: print it, exit 1)
        traceback.print_exc()
        status = 1
    return status


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def serve(path: str, parent: int) -> int:
    """Preload, then fork a child for every connection to `path` until process `parent` is gone."""
    started_with = dict(os.environ)
    preload()
    import torch

    if threading.active_count() > 1 or torch.cuda.is_initialized():
        print("flows.launcher: threads or a CUDA context after preloading, forking would be unsafe; not serving",
              file=sys.stderr)
        return 1
    reference = {"executable": sys.executable, "cwd": os.getcwd(), "env": import_time_env(started_with),
                 "set_by_imports": {k: v for k, v in os.environ.items() if started_with.get(k) != v}}
    me = os.getpid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staging = f"{path}.{me}"
        listener.bind(staging)
        listener.listen(8)
        os.replace(staging, path)  # the socket appears only once it accepts
        listener.settimeout(POLL_S)
        while os.getppid() == parent:
            _reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            if os.fork() == 0:
                listener.close()
                sys.exit(run_child(conn, reference))  # the child's interpreter exits from here
            conn.close()
    finally:
        if os.getpid() == me:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return 0


@contextlib.contextmanager
def running(env: MutableMapping[str, str] | None = None, log: Path | None = None) -> Iterator[subprocess.Popen]:
    """A launcher for the stage commands started inside the block with `env` (default: this process's
    environment), in which $OVSEG_LAUNCHER is set for the block's duration. Its output goes to `log`."""
    env = os.environ if env is None else env
    directory = tempfile.mkdtemp(prefix="ovseg-launcher-")  # short: a socket path has at most ~107 bytes
    env[ENV] = os.path.join(directory, "socket")
    repo = Path(__file__).resolve().parents[1]
    with open(log or os.devnull, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.launcher", env[ENV], str(os.getpid())], cwd=repo,
                                env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        env.pop(ENV, None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], int(sys.argv[2])))
