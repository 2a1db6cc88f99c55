"""One pipeline view in Prefect: a `dvc repro` started by the driver flow (`python -m flows.pipeline`) is one
flow run whose stages are nested under it as subflow runs, in the order DVC takes them.

DVC, not Prefect, runs the stages, each in a process of its own, so Prefect's in-process subflow mechanism
cannot link them. This does across processes what Prefect's engine does for a subflow: the stage creates a
tracking task run in the driver's flow run and then its own flow run with that task run as its parent; the
server keeps the tracking task run's state in step with the stage's flow run (also when a later run sets a
killed stage to Crashed). Stages that `dvc repro` does not run are recorded by the driver as tracking task
runs in a Completed state named "Skipped" (up to date) or "Restored" (from DVC's run cache).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any
from uuid import UUID

from prefect import Flow, Task
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.context import TagsContext
from prefect.flow_engine import run_flow
from prefect.states import Pending, Running, State

# the driver's flow run id, passed to the stages that `dvc repro` starts
PIPELINE_RUN_ENV = "OVSEG_PIPELINE_RUN"

# what `dvc repro` prints for a stage it does not run (dvc/stage/__init__.py and dvc/stage/cache.py)
NOT_RUN = re.compile(r"^Stage '(?P<stage>[^']+)' (?:(?P<skipped>didn't change, skipping)|is cached - skipping run)")


def pipeline_run() -> UUID | None:
    """The driver flow run this process's stage belongs to, if it was started by the driver."""
    value = os.environ.get(PIPELINE_RUN_ENV)
    return UUID(value) if value else None


def flow_name(stage: str) -> str:
    """The flow a DVC stage runs as: `mine@gt-nouns` -> `mine-gt-nouns` (flows.stage's labels)."""
    return stage.replace("@", "-")


def _stage_in_dvc() -> None:
    """Stands for a stage in the driver's flow run (a tracking task run is never executed)."""


def tracking_task_run(client: SyncPrefectClient, pipeline: UUID, name: str) -> TaskRun:
    """A task run in the driver's flow run that stands for stage flow `name` (one per process: a stage rerun
    by a later driver belongs to that driver's flow run)."""
    return client.create_task_run(Task(name=name, fn=_stage_in_dvc), flow_run_id=pipeline,
                                  dynamic_key=f"{name}-{os.getpid()}", name=name, state=Pending())


def run_nested(stage: Flow, parameters: dict[str, Any], pipeline: UUID) -> Any:
    """Run the stage flow as a subflow run of the driver's flow run `pipeline`; returns the flow's result."""
    with get_client(sync_client=True) as client:
        parent = tracking_task_run(client, pipeline, stage.name)
        flow_run = client.create_flow_run(stage, parameters=stage.serialize_parameters(parameters),
                                          parent_task_run_id=parent.id, tags=TagsContext.get().current_tags,
                                          state=Pending())
    return run_flow(stage, flow_run=flow_run, parameters=parameters)


def record_not_run(line: str, pipeline: UUID) -> str | None:
    """If `line` is `dvc repro` saying it does not run a stage, record that stage in the driver's flow run as a
    Completed tracking task run named Skipped or Restored; returns the stage, else None. Never raises: the
    record must not stop the pipeline."""
    match = NOT_RUN.match(line)
    if not match:
        return None
    try:
        _record(match, pipeline)
    except Exception as e:
        logging.getLogger("ovseg").warning("stage %s not recorded in the pipeline's flow run: %s", match["stage"], e)
    return match["stage"]


def _record(match: re.Match, pipeline: UUID) -> None:
    stage = match["stage"]
    if match["skipped"]:
        final = State(type=StateType.COMPLETED, name="Skipped", message="up to date: dvc repro did not run it")
    else:
        final = State(type=StateType.COMPLETED, name="Restored",
                      message="outputs restored from DVC's run cache (the same inputs ran before)")
    with get_client(sync_client=True) as client:
        task_run = tracking_task_run(client, pipeline, flow_name(stage))
        client.set_task_run_state(task_run.id, Running(), force=True)  # start time: its place on the timeline
        client.set_task_run_state(task_run.id, final, force=True)
