"""Runs whose process is gone: a stage killed with kill -9 (an OOM kill, a preempted node) never reports
an end, so Prefect would show its flow run Running forever. Each stage (and driver) flow run is tagged
with its host and process id; when one starts, earlier runs of the same flow still Running on this host
whose process no longer exists are set to Crashed, with their Running task runs.
"""
from __future__ import annotations

import logging
import os
import socket
from uuid import UUID

import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterState, FlowRunFilterStateType, TaskRunFilter,
                                            TaskRunFilterState, TaskRunFilterStateType)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Crashed

HOST_TAG, PID_TAG = "host-", "pid-"


def process_tags() -> list[str]:
    """Tags that say which process runs a flow run (to tell later whether it is still alive)."""
    return [f"{HOST_TAG}{socket.gethostname()}", f"{PID_TAG}{os.getpid()}"]


def _tag_value(run: FlowRun, prefix: str) -> str | None:
    return next((t[len(prefix):] for t in run.tags if t.startswith(prefix)), None)


def is_orphaned(run: FlowRun) -> bool:
    """Its process ran on this host and no longer exists (a run on another host, or without the tags, is
    not judged)."""
    pid = _tag_value(run, PID_TAG)
    return (_tag_value(run, HOST_TAG) == socket.gethostname() and pid is not None and pid.isdigit()
            and not psutil.pid_exists(int(pid)))


def crash_orphaned_runs(flow_name: str, current: UUID, logger: logging.Logger | logging.LoggerAdapter
                        ) -> list[FlowRun]:
    """Set earlier Running runs of `flow_name` whose process is gone to Crashed (saying so and naming the run
    `current` that takes over), with their Running task runs; returns those flow runs. Never raises: this
    bookkeeping must not fail the run that does it."""
    try:
        return _crash_orphaned_runs(flow_name, current, logger)
    except Exception as e:
        logger.warning("could not check earlier runs of %s for a process that is gone: %s", flow_name, e)
        return []


def _crash_orphaned_runs(flow_name: str, current: UUID, logger: logging.Logger | logging.LoggerAdapter
                         ) -> list[FlowRun]:
    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     flow_run_filter=FlowRunFilter(state=running))
        orphans = [r for r in runs if r.id != current and is_orphaned(r)]
        for run in orphans:
            message = (f"process {_tag_value(run, PID_TAG)} on {_tag_value(run, HOST_TAG)} is gone (killed without "
                       f"reporting an end); flow run {current} reran it")
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                    type=TaskRunFilterStateType(any_=[StateType.RUNNING]))))
            for task_run in tasks:
                client.set_task_run_state(task_run.id, Crashed(message=f"its flow run crashed: {message}"), force=True)
            logger.warning("earlier run %s (%s) was still Running: set to Crashed, %s", run.name, run.id, message)
    return orphans
