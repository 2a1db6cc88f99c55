"""One DVC stage as a Prefect flow named after it (what `python -m flows.stage <name>` runs, in its own process
or in a child of the preloaded launcher, `flows.launcher`).

The stage's parallel work units become Prefect task
runs (retried on failure) on the task runner chosen in params.yaml (`prefect:` section: threads on
one machine, Dask for a cluster); `ovseg_core` progress becomes progress artifacts; the stage's
summary becomes a table artifact. No Prefect result caching: DVC decides what reruns.
The flow run's parameters are the stage's effective settings (the UI's Parameters tab); when it starts,
earlier runs of the stage whose process is gone are set to Crashed (`flows.orphans`). Without a project
server, the stage's temporary Prefect server is watched by a process that stops it if the stage is killed
(`flows.watchdog`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar
from uuid import UUID

import flows  # noqa: F401  (configures Prefect's environment first)
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, create_markdown_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TagsContext
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows.env import REPO
from flows.orphans import crash_orphaned_runs, process_tags
from flows.pipeline_view import pipeline_run, run_nested
from ovseg_core import progress
from ovseg_core.compute import ComputeConfig
from stages.common import StageContext, load_params, run_stage

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

T = TypeVar("T")
R = TypeVar("R")


class Interrupts:
    """Ctrl-C that a stage cannot lose. Python runs a signal's handler at whatever bytecode the main thread is at;
    when that is a finalizer (a weakref callback, a __del__: Prefect's startup runs many), the KeyboardInterrupt
    is printed as "Exception ignored" and dropped, and the stage would run to the end and exit 0. While `kept()`,
    the handler also records the signal, and the stage raises it again at its next progress report in the main
    thread (every loop of work reports progress: `ovseg_core.progress`) and before it reports success."""

    received = False

    @classmethod
    def handle(cls, signum: int, frame: Any) -> None:
        cls.received = True
        signal.default_int_handler(signum, frame)

    @classmethod
    def check(cls, *_progress: object) -> None:
        """Raise a recorded Ctrl-C again; a progress hook, so only in the main thread (where Ctrl-C belongs)."""
        if cls.received and threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt("Ctrl-C (a first KeyboardInterrupt was lost in a finalizer)")

    @classmethod
    @contextlib.contextmanager
    def kept(cls) -> Iterator[None]:
        cls.received = False
        previous = signal.signal(signal.SIGINT, cls.handle)
        progress.add_hook(cls.check)
        try:
            yield
            cls.check()  # the outs are whole (written under temporary names), but the stage was told to stop
        finally:
            progress.remove_hook(cls.check)
            signal.signal(signal.SIGINT, previous)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")


def task_runner(cfg: dict[str, Any], compute: ComputeConfig):
    """Where a stage's work units run: threads in this process, a pool of `compute.processes`
    processes, or Dask workers (a local cluster of `compute.processes` processes, or the cluster at
    `dask_address`: e.g. one worker per GPU)."""
    kind = cfg.get("task_runner", "threads")
    if kind == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        if cfg.get("dask_address"):
            return DaskTaskRunner(address=cfg["dask_address"])
        # non-daemonic workers: a unit may start DataLoader worker processes of its own. Without Dask's
        # MALLOC_TRIM_THRESHOLD_=65536: glibc then hands freed tensor memory back to the OS at once and
        # page-faults it in again (mining: 72-75 s of system time and 11-12 images/s, against 7-8 s and 14-19).
        environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
                   if k != "MALLOC_TRIM_THRESHOLD_"}
        dask.config.set({"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ})
        return DaskTaskRunner(cluster_kwargs={"n_workers": compute.processes, "threads_per_worker": 1,
                                              "processes": True})
    if kind != "threads":
        raise ValueError(f"params.yaml prefect.task_runner: unknown runner {kind!r} (threads | dask)")
    if compute.processes > 1:
        return ProcessPoolTaskRunner(max_workers=compute.processes)
    return ThreadPoolTaskRunner(max_workers=int(cfg.get("max_workers", 2)))


def ephemeral_server() -> "SubprocessASGIServer | None":
    """Prefect's temporary server of ephemeral mode (no PREFECT_API_URL), started if it is not yet: the singleton
    its client would start on first use. None when an API URL is set."""
    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # returns at once if already running
    return server


def local_dask_api(cfg: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Settings under which a local Dask cluster's workers report to this process's Prefect API.

    In ephemeral mode (no PREFECT_API_URL) the context Prefect ships with each task to a Dask worker
    carries no API URL, so every worker process would start a temporary server of its own on the same
    database (tens of seconds each on a busy machine); this points them at the flow run's server.
    """
    server = None if cfg.get("task_runner") != "dask" or cfg.get("dask_address") else ephemeral_server()
    if server is None:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_API_URL: server.api_url})


def guard_ephemeral_server() -> None:
    """In ephemeral mode, start Prefect's temporary server now and beside it a watchdog process that stops it
    should this process die without doing so, e.g. killed with kill -9 (`flows.watchdog`)."""
    server = ephemeral_server()
    if server is None:
        return
    assert server.server_process is not None
    subprocess.Popen([sys.executable, "-m", "flows.watchdog", str(os.getpid()), str(server.server_process.pid)],
                     cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)  # a Ctrl-C of the terminal's process group must not end it first


class PrefectStageContext(StageContext):
    """Stage context whose work units are Prefect task runs and whose publications are artifacts."""

    def __init__(self, name: str, params: dict[str, Any], variant: str | None = None):
        super().__init__(name, params, variant)
        self.cfg = params.get("prefect", {})

    @property
    def concurrent_units(self) -> int:
        threads = self.cfg.get("task_runner", "threads") == "threads" and self.compute.processes == 1
        return int(self.cfg.get("max_workers", 2)) if threads else 1

    def map(self, fn: Callable[[T], R], items: Iterable[T], desc: str) -> list[R]:
        items = list(items)
        # NO_CACHE: DVC decides what reruns; Prefect's default policy would also try to hash the
        # unit's source (a functools.partial has none) and log an error for every task run.
        unit = task(fn, name=desc, cache_policy=NO_CACHE, persist_result=False,
                    retries=int(self.cfg.get("task_retries", 2)),
                    retry_delay_seconds=float(self.cfg.get("retry_delay_s", 1)))
        # each task run named after the stage and its unit, e.g. "mine@proposals-nouns unit 12". Without the tags
        # (the stage's flow run has them): Prefect takes a concurrency slot for every tag of a task run before it
        # starts, a round trip to the server that took 0.4-0.75 s per unit on two busy cores (~7 s of a 35 s
        # evaluation), though no tag has a limit.
        with TagsContext(current_tags=set()):
            futures = [unit.with_options(task_run_name=f"{self.stage_label} unit {unit_label(item)}").submit(item)
                       for item in items]
        results = []
        with progress.Progress(len(items), desc) as p:
            for future in futures:
                results.append(future.result())
                p.update(1)
        return results

    def publish_table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        super().publish_table(key, rows, description)
        create_table_artifact(rows, key=artifact_key(self.label, key), description=description or None)

    def publish_markdown(self, key: str, markdown: str, description: str = "") -> None:
        create_markdown_artifact(markdown, key=artifact_key(self.label, key), description=description or None)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.variant}" if self.variant else self.name

    @property
    def stage_label(self) -> str:
        """The stage as DVC names it: `name` or `name@variant`."""
        return f"{self.name}@{self.variant}" if self.variant else self.name


def unit_label(item: Any) -> str:
    """A work unit as a task run's name shows it: `12`, or `world-eval 0 100` for a tuple."""
    return " ".join(map(str, item)) if isinstance(item, tuple) else str(item)


class ProgressArtifacts:
    """Turns `ovseg_core.progress` notifications into Prefect progress artifacts (one per loop)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.ids: dict[str, UUID] = {}

    def __call__(self, desc: str, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        try:
            if desc not in self.ids:
                self.ids[desc] = create_progress_artifact(pct, key=artifact_key(self.stage, desc, "progress"),
                                                          description=f"{self.stage}: {desc}")
            else:
                update_progress_artifact(self.ids[desc], pct)
        except Exception as e:  # progress display must never fail the stage
            logging.getLogger("ovseg").debug("progress artifact not updated: %s", e)


def stage_flow(name: str, params: dict[str, Any], variant: str | None = None) -> Callable[[], dict[str, Any]]:
    """The stage as a Prefect flow named after it, called with its effective settings as the flow run's
    parameters (shown in the UI): the variant, the stage's merged params section and its compute settings.
    Started by the driver flow, it runs as a subflow run of the driver's (`flows.pipeline_view`)."""
    cfg = params.get("prefect", {})
    ctx = PrefectStageContext(name, params, variant)
    label = ctx.label

    def body(variant: str | None, settings: dict[str, Any], compute: dict[str, Any]) -> dict[str, Any]:
        # the parameters are for the record: the stage reads the same values from `params`
        logger = get_run_logger()
        crash_orphaned_runs(label, UUID(flow_run.get_id()), logger)
        hook = ProgressArtifacts(label)
        progress.add_hook(hook)
        try:
            with local_dask_api(cfg):
                summary = run_stage(name, ctx)
        finally:
            progress.remove_hook(hook)
        rows = [{"key": k, "value": v} for k, v in summary.items() if not isinstance(v, (dict, list))]
        if rows:
            create_table_artifact(rows, key=artifact_key(label, "result"), description=f"Stage {label}: summary")
        resumed = {k: v for k, v in summary.items() if k.startswith("resumed")}
        logger.info("stage %s done%s: %s", label, f" (resumed: {resumed})" if any(resumed.values()) else "",
                    json.dumps(summary, default=str)[:2000])
        return summary

    compute = ctx.compute
    stage = flow(name=label, log_prints=True, retries=0, task_runner=task_runner(cfg, compute),
                 persist_result=False)(body)
    parameters = {"variant": variant, "settings": ctx.settings(), "compute": dataclasses.asdict(compute)}
    pipeline = pipeline_run()
    if pipeline:
        return functools.partial(run_nested, stage, parameters, pipeline)
    return functools.partial(stage, **parameters)


def run(args: argparse.Namespace) -> None:
    """Run the stage `flows.stage` parsed from the command line, and print its summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    params = load_params(args.params)
    guard_ephemeral_server()
    run_tags = ["ovseg", f"stage-{args.name}", *process_tags()]
    if pipeline_run():
        run_tags.append(f"pipeline-{str(pipeline_run())[:8]}")
    with Interrupts.kept(), tags(*run_tags):
        summary = stage_flow(args.name, params, args.variant)()
    json.dump(summary, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
