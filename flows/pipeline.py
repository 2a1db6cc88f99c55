"""The driver flow: runs `dvc repro` (and optionally `dvc push`) as one Prefect flow run.

    python -m flows.pipeline                 # start the local Prefect server if needed, dvc repro, summary
    python -m flows.pipeline --push          # ... then dvc push to the default remote
    python -m flows.pipeline --no-server     # Prefect's ephemeral mode, no UI
    python -m flows.pipeline --no-preload    # every stage in a fresh interpreter (no `flows.launcher`)
    python -m flows.pipeline -- mine         # extra arguments go to dvc repro (targets, --force, ...)

DVC owns the DAG: this flow never lists stages itself. Every stage `dvc repro` runs reports to Prefect as a
subflow run of this flow run (tagged with its id); a stage it skips as up to date is shown as a Skipped task
run (`flows.pipeline_view`), so the driver's run page is the pipeline, stage by stage in DAG order.
The stages run in processes forked from a launcher that has their imports done (`flows.launcher`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

import flows  # noqa: F401
from flows import launcher
from flows.env import REPO, STATE_DIR, server_url

REPORT = REPO / "reports" / "report.md"


def headline(report: Path = REPORT) -> str:
    """The report's first table (its headline), or a note that there is none yet."""
    if not report.exists():
        return f"(no report yet at {report.relative_to(REPO)})"
    lines, started = [], False
    for line in report.read_text().splitlines():
        if line.startswith("|"):
            started = True
            lines.append(line)
        elif started:
            break
    return "\n".join(lines) or f"(no table in {report})"


def run_logged(cmd: list[str], logger, on_line: Callable[[str], Any] = lambda line: None) -> int:
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        on_line(line)
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--push", action="store_true", help="dvc push after a successful repro")
    parser.add_argument("--no-server", action="store_true", help="don't start the local Prefect server")
    parser.add_argument("--no-preload", action="store_true",
                        help="run every stage in a fresh interpreter, not forked from the preloaded launcher")
    parser.add_argument("repro_args", nargs="*", help="passed to dvc repro")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # params paths are relative to the repository root, as in dvc.yaml

    # One error listing everything missing, before any stage starts. In a child process: the checks
    # import torch and open_clip, which this driver would otherwise hold (0.8 GB measured) for the whole run.
    if subprocess.run([sys.executable, "-m", "stages.validate"], cwd=REPO).returncode != 0:
        return 1
    # dvc.yaml's `python` must be this environment's, also when it was not activated
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if not args.no_server:
        from flows.server import start

        os.environ["PREFECT_API_URL"] = start()
    from prefect import flow, get_run_logger, tags
    from prefect.runtime import flow_run

    from flows.orphans import crash_orphaned_runs, process_tags
    from flows.pipeline_view import PIPELINE_RUN_ENV, record_not_run

    dvc = str(Path(sys.executable).with_name("dvc"))

    @flow(name="ovseg-pipeline", log_prints=True, persist_result=False)
    def pipeline() -> dict[str, float]:
        logger = get_run_logger()
        this_run = UUID(flow_run.get_id())
        crash_orphaned_runs("ovseg-pipeline", this_run, logger)
        os.environ[PIPELINE_RUN_ENV] = str(this_run)
        t0 = time.perf_counter()
        # started after the environment above is complete: the stages' environment must equal the launcher's
        preloaded = contextlib.nullcontext() if args.no_preload else launcher.running(log=STATE_DIR / "launcher.log")
        with preloaded:
            status = run_logged([dvc, "repro", *args.repro_args], logger, lambda line: record_not_run(line, this_run))
        if status != 0:
            raise RuntimeError("dvc repro failed (see the failed stage's flow run)")
        timings = {"repro_s": round(time.perf_counter() - t0, 1)}
        if args.push:
            if run_logged([dvc, "push"], logger) != 0:
                raise RuntimeError("dvc push failed")
        return timings

    with tags(*process_tags()):
        timings = pipeline()
    print(f"\nPipeline finished in {timings['repro_s']:.0f} s.\n")
    print(headline())
    print(f"\nReport:       {REPORT.relative_to(REPO)}")
    print("Mined pairs:  data/mined/ (WebDataset shards, index.parquet, README.md)")
    url = server_url()
    print(f"Prefect UI:   {url.removesuffix('/api')}" if url else "Prefect UI:   not running (python -m flows.server start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
