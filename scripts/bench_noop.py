"""Benchmark what a run costs when there is nothing to do: a no-op `dvc repro`, the driver's no-op, and one
stage's start-up (process start to its flow's first step).

In a run directory where the whole pipeline is up to date (after `dvc repro` or `python -m flows.pipeline`):

1. `dvc repro` `--rounds` times (wall and user CPU of the process tree); each must say it is up to date;
2. `python -m flows.pipeline` once (`--driver`): parameter check, the project's Prefect server (started if it is
   not running: the first call pays for that), `dvc repro` finding nothing to do;
3. `python -m flows.stage report` `--rounds` times (`--stage-startup`): the report stage (one second of work,
   no torch) run directly, its process wall time against the wall time its run record gives the flow itself.
   It rewrites the report with the same bytes and its run record into a temporary directory, so the pipeline
   stays up to date.

    python -m scripts.bench_noop --run-dir /work/run --rounds 5 --driver --stage-startup \
        --out benchmarks/noop-repro-cpu-2026-12-04.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ovseg_core.atomic import write_json
from scripts import measure

REPO = Path(__file__).resolve().parents[1]
UP_TO_DATE = "Data and pipelines are up to date."


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, user CPU s of the children, output) of one run of `cmd`; a failure raises."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    user = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return round(wall, 2), round(user, 2), proc.stdout + proc.stderr


def spread(values: list[float]) -> dict[str, Any]:
    return {"runs": values, "min": min(values), "median": statistics.median(values), "max": max(values)}


def noop_repro(run_dir: Path, rounds: int, env: dict[str, str]) -> dict[str, Any]:
    walls, users = [], []
    for _ in range(rounds):
        wall, user, output = timed(["dvc", "repro"], run_dir, env)
        if UP_TO_DATE not in output:
            raise SystemExit(f"`dvc repro` in {run_dir} ran something; run it to the end first:\n{output[-2000:]}")
        walls.append(wall)
        users.append(user)
    return {"command": "dvc repro", "wall_s": spread(walls), "user_cpu_s": spread(users)}


def stage_startup(run_dir: Path, rounds: int, env: dict[str, str]) -> dict[str, Any]:
    process, flow = [], []
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp:
        # the run's params with the run record written here: the record differs from run to run, and in the run
        # directory it would make the next `dvc repro` rerun the stage (the report itself comes out the same)
        params = yaml.safe_load((run_dir / "params.yaml").read_text())
        params["runs"] = str(Path(tmp) / "runs")
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        for _ in range(rounds):
            wall, _, _ = timed([sys.executable, "-m", "flows.stage", "report", "--params", str(params_file)], run_dir,
                               env)
            process.append(wall)
            flow.append(json.loads((Path(tmp) / "runs" / "report.json").read_text())["wall_s"])
    startup = [round(p - f, 2) for p, f in zip(process, flow)]
    return {"command": "python -m flows.stage report", "process_s": spread(process), "flow_s": spread(flow),
            "startup_s": spread(startup),
            "note": "startup = process wall time - the flow's own wall time (its run record): interpreter, imports, "
                    "Prefect (an ephemeral server when none is configured), parameter loading"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO, help="a directory where the pipeline is up to date")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--driver", action="store_true", help="also time one no-op `python -m flows.pipeline`")
    parser.add_argument("--stage-startup", action="store_true", help="also time the report stage's start-up")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    run_dir = args.run_dir.resolve()
    env = measure.tool_env()
    noop_repro(run_dir, 1, env)  # warms the file cache; refuses a run directory that is not up to date
    _, _, listing = timed(["dvc", "stage", "list", "--name-only"], run_dir, env)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{measure.machine()}, no GPU used",
        "command": "python -m scripts.bench_noop " + " ".join(sys.argv[1:]),
        "commit": measure.commit(run_dir),
        "stages": len(listing.split()),
        "measured": "every figure measured on this machine, none projected",
        "noop_repro": noop_repro(run_dir, args.rounds, env),
    }
    if args.driver:
        wall, user, _ = timed([sys.executable, "-m", "flows.pipeline"], run_dir, env)
        result["driver_noop"] = {"command": "python -m flows.pipeline", "wall_s": wall, "user_cpu_s": user}
    if args.stage_startup:
        result["stage_startup"] = stage_startup(run_dir, args.rounds, env)
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
