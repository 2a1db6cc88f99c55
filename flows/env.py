"""Prefect/DVC environment for this project: state lives in the git-ignored `.ovseg/` directory.

`PREFECT_API_URL` is set only when the project's local server (started by `python -m flows.server
start`) is up; otherwise Prefect runs in its ephemeral mode (a temporary server per stage process).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
STATE_DIR = Path(os.environ.get("OVSEG_STATE_DIR", REPO / ".ovseg"))
PREFECT_HOME = STATE_DIR / "prefect"
SERVER_FILE = STATE_DIR / "prefect-server.json"


def server_url() -> str | None:
    """The project's local Prefect API URL if that server is accepting connections, else None."""
    if not SERVER_FILE.exists():
        return None
    try:
        url = json.loads(SERVER_FILE.read_text())["api_url"]
    except (ValueError, KeyError):
        return None
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=0.5):
            return url
    except OSError:
        return None


def configure() -> None:
    PREFECT_HOME.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(PREFECT_HOME))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ovseg")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # Ephemeral mode's first start in a fresh clone creates and migrates the SQLite database under .ovseg/prefect;
    # on 2 busy cores that takes longer than Prefect's default 20 s, and the stage would fail before any work.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if "PREFECT_API_URL" not in os.environ:
        url = server_url()
        if url:
            os.environ["PREFECT_API_URL"] = url
