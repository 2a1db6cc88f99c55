"""The project's local Prefect server (UI on http://127.0.0.1:4200), state under `.ovseg/prefect`.

    python -m flows.server start     # background; every later flow run reports to it
    python -m flows.server status
    python -m flows.server stop
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import flows  # noqa: F401
from flows.env import PREFECT_HOME, SERVER_FILE, server_url

HOST = "127.0.0.1"


def start(port: int = 4200, timeout_s: float = 90.0) -> str:
    url = server_url()
    if url:
        return url
    api_url = f"http://{HOST}:{port}/api"
    log = open(PREFECT_HOME / "server.log", "ab")
    env = dict(os.environ, PREFECT_HOME=str(PREFECT_HOME), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=api_url)
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    SERVER_FILE.write_text(json.dumps({"api_url": api_url, "ui_url": f"http://{HOST}:{port}", "pid": proc.pid}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {PREFECT_HOME / 'server.log'}")
        if server_url() and _healthy(api_url):
            return api_url
        time.sleep(0.5)
    raise TimeoutError(f"prefect server did not answer within {timeout_s:.0f} s; see {PREFECT_HOME / 'server.log'}")


def _healthy(api_url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop() -> bool:
    if not SERVER_FILE.exists():
        return False
    pid = json.loads(SERVER_FILE.read_text()).get("pid")
    SERVER_FILE.unlink()
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)
    if args.action == "start":
        api = start(args.port)
        print(f"Prefect server up: UI {api.removesuffix('/api')}  (API {api})")
    elif args.action == "stop":
        print("stopped" if stop() else "no server was running")
    else:
        url = server_url()
        print(f"running: {url}" if url else "not running")
        sys.exit(0 if url else 1)


if __name__ == "__main__":
    main()
