"""Look at the pipeline in the Prefect UI with a real browser (headless Chromium), and list what the
server holds: the stage flow runs, their states and their artifacts.

    .venv/bin/python -m scripts.check_prefect_ui [--out .ovseg/ui]

Starts the project's local Prefect server if it is not running (flows.server), screenshots the
runs and artifacts pages, the pipeline (`ovseg-pipeline`: the longest driver run, its stages nested under it as
subflow runs, and the latest one, where stages DVC skipped show as Skipped), one stage's run page and its
Parameters tab, and prints the flow runs and artifacts read back from the API. Needs
Debian's `chromium` package (`apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import flows  # noqa: F401  (project Prefect environment)
from flows.server import start

PAGES = {"runs": "/runs", "artifacts": "/artifacts", "report-headline": "/artifacts/key/report-headline"}


def screenshot(url: str, out: Path, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=25000", "--window-size=1400,1600",
             f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=120)


def latest_completed(runs: list, flow_names: dict, flow: str):
    completed = [r for r in runs if r.state_name == "Completed" and flow_names.get(r.flow_id) == flow]
    return max(completed, key=lambda r: r.start_time or r.created) if completed else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".ovseg/ui")
    parser.add_argument("--flow-run-of", default="mine-proposals-nouns",
                        help="also screenshot the latest completed run of this flow (its task runs and logs)")
    args = parser.parse_args(argv)
    api = start()
    ui = api.removesuffix("/api")
    os.environ["PREFECT_API_URL"] = api
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        flow_names = {f.id: f.name for f in client.read_flows(limit=200)}
        artifacts = client.read_artifacts(limit=200)
    print(f"Prefect server {ui}: {len(runs)} flow runs, {len(artifacts)} artifacts")
    states = Counter((flow_names.get(r.flow_id, "?"), r.state_name) for r in runs)
    for (flow, state), n in sorted(states.items()):
        print(f"  flow {flow:28s} {state:12s} x{n}")
    kinds = Counter(str(a.type) for a in artifacts)
    print("  artifacts by type: " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))
    for key in sorted({a.key for a in artifacts if a.key})[:40]:
        print(f"    {key}")

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("chromium not found: apt-get install chromium (screenshots skipped)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pages = dict(PAGES)
    stage_run = latest_completed(runs, flow_names, args.flow_run_of)
    if stage_run:  # one stage's own page: its task runs on a timeline, its logs; and the settings it ran with
        pages[f"flow-run-{args.flow_run_of}"] = f"/runs/flow-run/{stage_run.id}"
        pages[f"flow-run-{args.flow_run_of}-parameters"] = f"/runs/flow-run/{stage_run.id}?tab=Parameters"
    drivers = [r for r in runs if r.state_name == "Completed" and flow_names.get(r.flow_id) == "ovseg-pipeline"]
    if drivers:  # the pipeline view: the driver's run with the stages nested under it on its timeline
        longest = max(drivers, key=lambda r: r.total_run_time)  # a repro that ran stages
        pages["pipeline"] = f"/runs/flow-run/{longest.id}"
        pages["pipeline-latest"] = f"/runs/flow-run/{latest_completed(runs, flow_names, 'ovseg-pipeline').id}"
    for name, path in pages.items():
        target = out / f"{name}.png"
        screenshot(f"{ui}{path}", target, chromium)
        print(f"screenshot {ui}{path} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
