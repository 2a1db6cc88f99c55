"""What a user meets in the Prefect UI after a crash: a stage killed with kill -9 (here `mine`, as DVC runs it,
against a real local Prefect server) is left Running by Prefect; the rerun marks it Crashed, saying its
process is gone, finishes the work as a Completed run, and reports what it resumed. Every stage run shows
its effective settings as flow run parameters, and its task runs are named after the stage and the unit.
Both runs belong to one driver flow run (as under `python -m flows.pipeline`): each is a subflow run of it, and
the killed one's tracking task run in the driver's run is Crashed too.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID

import pytest
import yaml

from test_pipeline_e2e import free_port
from flows.pipeline_view import PIPELINE_RUN_ENV
from test_stage_mine import kill_when_a_unit_is_complete

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "proposals-nouns"
FLOW = f"mine-{VARIANT}"


def driver_run(api_url: str) -> UUID:
    """A flow run of the driver flow, as `python -m flows.pipeline` creates before it starts `dvc repro`."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.create_flow_run(flow(name="ovseg-pipeline")(lambda: None)).id


def driver_task_runs(api_url: str, driver: UUID) -> list[dict[str, Any]]:
    """The driver flow run's task runs: one per stage run, linked to the stage's flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return [{"id": t.id, "name": t.name, "state": t.state_type.value, "child": t.state.state_details.child_flow_run_id}
                for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[driver])))]


def api_runs(api_url: str) -> list[dict[str, Any]]:
    """Every flow run of the mining variant, oldest first, with its task runs' names and states."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC)
        return [{"id": r.id, "state": r.state_type.value, "message": r.state.message if r.state else None,
                 "parameters": r.parameters, "tags": r.tags, "parent_task_run": r.parent_task_run_id,
                 "tasks": sorted((t.name, t.state_type.value) for t in client.read_task_runs(
                     flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id]))))}
                for r in runs]


@contextlib.contextmanager
def project_server(state: Path) -> Iterator[dict[str, str]]:
    """The project's Prefect server (`flows.server`) on a free port with its state under `state`; yields the
    environment of commands that report to it, and stops it after, also when the test fails."""
    env = dict(os.environ, OVSEG_STATE_DIR=str(state), PREFECT_HOME=str(state / "prefect"), PYTHONPATH=str(ROOT))
    env.pop("PREFECT_API_URL", None)
    port = free_port()
    subprocess.run([sys.executable, "-m", "flows.server", "start", "--port", str(port)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    try:
        yield env
    finally:
        subprocess.run([sys.executable, "-m", "flows.server", "stop"], cwd=ROOT, env=env, capture_output=True)


@pytest.fixture(scope="module")
def killed_and_rerun(mine_params, tmp_path_factory):
    """Start `python -m flows.stage mine` against a fresh server, kill -9 it once a unit is complete, read the
    runs Prefect then holds, rerun to the end; returns (runs after the kill, runs after the rerun, the rerun's
    run record, units complete at the kill)."""
    base = tmp_path_factory.mktemp("prefect-runs")
    params = {**mine_params(base, images_per_unit=2), "runs": str(base / "runs")}
    (base / "params.yaml").write_text(yaml.safe_dump(params))
    with project_server(base / "state") as env:
        api_url = env["PREFECT_API_URL"]
        driver = driver_run(api_url)
        env[PIPELINE_RUN_ENV] = str(driver)
        cmd = [sys.executable, "-m", "flows.stage", "mine", "--variant", VARIANT, "--params", str(base / "params.yaml")]
        work = base / "work" / VARIANT
        kill_when_a_unit_is_complete(cmd, work, base / "killed.log", env)
        kept = len(list(work.glob("*.stats.json")))
        after_kill = api_runs(api_url)
        rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-4000:]
        record = json.loads((base / "runs" / "mine" / f"{VARIANT}.json").read_text())
        yield after_kill, api_runs(api_url), record, kept, driver_task_runs(api_url, driver)


def test_stage_run_carries_its_settings_and_names_task_runs_by_unit(killed_and_rerun):
    _, runs, record, kept, _ = killed_and_rerun
    rerun = runs[-1]
    params = rerun["parameters"]
    assert params["variant"] == VARIANT
    settings = params["settings"]  # mine's section with common ⊕ the variant's settings merged in
    assert settings["images_per_unit"] == 2 and settings["masks"] == "proposals" and "dataset" in settings
    assert "variants" not in settings and "common" not in settings
    assert params["compute"]["threads"] == 1
    # the rerun mined only the units the killed run had not completed, each a task run named after it
    units = record["units"]
    names = [name for name, _ in rerun["tasks"]]
    assert len(names) == units - kept and set(names) <= {f"mine@{VARIANT} unit {u}" for u in range(units)}


def test_killed_run_is_crashed_and_the_rerun_completed(killed_and_rerun):
    after_kill, runs, record, kept, _ = killed_and_rerun
    assert [r["state"] for r in after_kill] == ["RUNNING"]  # what Prefect alone shows after a kill -9
    assert {t.split("-")[0] for t in after_kill[0]["tags"]} >= {"host", "pid"}
    assert [r["id"] for r in runs] == [after_kill[0]["id"], runs[1]["id"]]
    old, new = runs
    assert old["state"] == "CRASHED" and "is gone" in old["message"] and str(new["id"]) in old["message"]
    assert "RUNNING" not in {state for _, state in old["tasks"]}  # its unfinished units crashed with it
    assert new["state"] == "COMPLETED"
    assert record["resumed_units"] == kept and record["units"] > kept  # the rerun says what it resumed


def test_both_runs_are_subflow_runs_of_the_driver_run(killed_and_rerun):
    _, runs, _, _, tracking = killed_and_rerun
    old, new = runs
    by_id = {t["id"]: t for t in tracking}
    assert len(tracking) == 2 and {t["name"] for t in tracking} == {FLOW}
    assert old["parent_task_run"] in by_id and new["parent_task_run"] in by_id
    assert by_id[old["parent_task_run"]]["child"] == old["id"] and by_id[new["parent_task_run"]]["child"] == new["id"]
    # the server keeps each tracking task run in step with its stage run, the orphan's Crashed included
    assert by_id[old["parent_task_run"]]["state"] == "CRASHED"
    assert by_id[new["parent_task_run"]]["state"] == "COMPLETED"


class FailsOnceFor:
    """A work unit that fails the first time it meets `bad` (a transient error: a full disk, a lost worker) and
    succeeds when retried; calls are counted in a file, as a retry may run in another thread or process."""

    def __init__(self, bad: int, log: Path):
        self.bad, self.log = bad, log

    def __call__(self, item: int) -> int:
        with self.log.open("a") as f:
            f.write(f"{item}\n")
        if item == self.bad and self.log.read_text().split().count(str(item)) == 1:
            raise OSError(f"transient failure of unit {item}")
        return item * item


def test_a_transient_unit_failure_is_retried_by_prefect(tmp_path):
    from prefect import flow

    from flows.prefect_stage import PrefectStageContext

    params = {"prefect": {"task_runner": "threads", "max_workers": 2, "task_retries": 1, "retry_delay_s": 0},
              "compute": {"device": "cpu"}, "demo": {}}
    ctx = PrefectStageContext("demo", params)
    unit = FailsOnceFor(bad=2, log=tmp_path / "calls.txt")
    results = flow(name="retry-demo", persist_result=False)(lambda: ctx.map(unit, range(4), "units"))()
    assert results == [0, 1, 4, 9]  # the flow completed with every unit's result, in order
    assert sorted(int(c) for c in (tmp_path / "calls.txt").read_text().split()) == [0, 1, 2, 2, 3]

    # without retries the same failure fails the flow: the retry above is what saved it
    params["prefect"]["task_retries"] = 0
    unit = FailsOnceFor(bad=2, log=tmp_path / "calls-no-retry.txt")
    ctx = PrefectStageContext("demo", params)
    with pytest.raises(OSError, match="transient failure of unit 2"):
        flow(name="retry-demo", persist_result=False)(lambda: ctx.map(unit, range(4), "units"))()


def test_a_ctrl_c_lost_in_a_finalizer_still_stops_the_stage(tmp_path):
    import signal
    import weakref

    from prefect import flow

    from flows.prefect_stage import Interrupts, PrefectStageContext

    params = {"prefect": {"task_runner": "threads", "max_workers": 1, "task_retries": 0},
              "compute": {"device": "cpu"}, "demo": {}}
    ctx = PrefectStageContext("demo", params)
    returned: list[int] = []
    saved = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="lost in a finalizer"), Interrupts.kept():

        class Finalized:
            pass

        doomed = Finalized()
        # Ctrl-C arrives while a weakref callback runs: Python prints the KeyboardInterrupt and drops it
        ref = weakref.ref(doomed, lambda _: signal.getsignal(signal.SIGINT)(signal.SIGINT, None))
        del doomed
        assert ref() is None and Interrupts.received
        flow(name="interrupt-demo", persist_result=False)(lambda: returned.extend(ctx.map(lambda i: i, range(4),
                                                                                           "units")))()
    assert returned == []  # stopped at the units' first progress report, not only at the end
    assert signal.getsignal(signal.SIGINT) is saved  # and the handler it replaced is back


def test_local_dask_workers_run_with_glibcs_own_trim_threshold():
    # Dask's default MALLOC_TRIM_THRESHOLD_=65536 halves mining throughput (freed tensors go back to the OS and
    # fault in again); the local cluster's workers must start without it
    import copy

    import dask
    from distributed import Client, LocalCluster

    from flows.prefect_stage import task_runner
    from ovseg_core.compute import ComputeConfig

    saved = copy.deepcopy(dask.config.get("distributed"))  # get() returns the live mapping
    try:
        task_runner({"task_runner": "dask"}, ComputeConfig.from_dict({"processes": 1}))
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            env = next(iter(client.run(lambda: dict(os.environ)).values()))
    finally:
        dask.config.set({"distributed": saved})
    assert "MALLOC_TRIM_THRESHOLD_" not in env
    assert env.get("OMP_NUM_THREADS") == "1"  # Dask's other settings kept


def test_the_ephemeral_server_of_a_killed_stage_is_stopped_by_its_watchdog(tmp_path):
    """Without a project server a stage starts Prefect's temporary server as its child. kill -9 of the stage
    orphans that server; the watchdog `flows.prefect_stage` starts beside it stops it within seconds (it may stay a
    zombie: this machine's init does not reap)."""
    import psutil

    from flows.watchdog import alive

    env = dict(os.environ, OVSEG_STATE_DIR=str(tmp_path / "state"), PREFECT_HOME=str(tmp_path / "state" / "prefect"),
               PYTHONPATH=str(ROOT))
    env.pop("PREFECT_API_URL", None)
    script = ("import time, flows.prefect_stage as stage\n"
              "from prefect.server.api.server import SubprocessASGIServer\n"
              "stage.guard_ephemeral_server()\n"
              "print(SubprocessASGIServer().server_process.pid, flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        server = psutil.Process(int(proc.stdout.readline()))
        assert server.is_running() and "prefect.server.api.server:create_app" in server.cmdline()
        assert server.ppid() == proc.pid
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(server), "the killed stage's ephemeral Prefect server still runs"
    finally:
        proc.kill()
        for leftover in psutil.process_iter(["cmdline", "environ"]):
            with contextlib.suppress(psutil.Error):
                if (leftover.info["environ"] or {}).get("PREFECT_HOME") == env["PREFECT_HOME"]:
                    leftover.kill()
