"""The whole pipeline as a user runs it: a fresh copy of the repository, the README's main command (`python -m
flows.pipeline --push`: validation, `dvc repro`, `dvc push` to a local remote, the headline) on a tiny embedded
world with every stage reporting to a real local Prefect server, then the DVC promises.

- the driver validates first, runs every stage, pushes and prints the report's headline;
- every stage runs and shows up in Prefect as a completed flow run with artifacts, nested under the driver's
  flow run in DAG order; a second driver run shows every stage as Skipped;
- a teammate's clone gets everything with `dvc pull` and is up to date;
- a second `dvc repro` does nothing;
- changing one adaptation parameter marks only that adaptation and what depends on it as changed;
- a stage that fails on a corrupt input is a failed flow run in Prefect, leaves no partial out, and
  the rerun after the fix continues from the stages that were complete.

One module-scoped repro serves all tests (a few minutes on 2 cores).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow  # minutes: real stages, several processes

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Tiny sizes: the same stages and code paths as the embedded run, minutes instead of ten.
TINY: dict[str, Any] = {
    "world.web_images": 240,
    "world.coco_images": 60,
    "world.eval_sets.world-eval.images": 16,
    "world.eval_sets.world-val.images": 6,
    "world.eval_sets.world-wide.images": 8,
    "pretrain_clip.train.steps": 4,
    "pretrain_clip.train.batch_size": 32,
    "pretrain_clip.probe.images": 8,
    "train_maskformer.train.steps": 4,
    "train_maskformer.train.batch_size": 4,
    "train_maskformer.eval_images": 6,
    "mine.common.images_per_unit": 30,
    "mine.common.mask_threshold": 0.05,  # a 4-step MaskFormer's masks are faint: keep some crops
    "adapt_clip.common.steps": 3,
    "adapt_clip.common.batch_size": 16,
    "adapt_clip.probe_images": 6,
}
# Every stage of dvc.yaml runs but Table 5's groups: Table 2's ablation is switched on for GT masks with GT classes
# (mine-gt@classes, adapt_clip-ft-gt@classes, evaluate-ft-gt@classes); with caption nouns its code paths would be
# the same (mining of every variant: tests/test_mining_content.py).
ABLATIONS = {"gt_masks": ["classes"]}


def set_key(params: dict[str, Any], dotted: str, value: Any) -> None:
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        if key not in node:
            raise KeyError(f"params.yaml has no {dotted!r} (missing {key!r})")
        node = node[key]
    if leaf not in node:
        raise KeyError(f"params.yaml has no {dotted!r}")
    node[leaf] = value


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def stages_run(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` (or its --dry run) says it runs."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("clone") / "ovseg"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    (root / "dvc.lock").unlink(missing_ok=True)
    for committed_out in ("metrics", "plots", "reports"):  # results of the last real run: start as a new user
        shutil.rmtree(root / committed_out, ignore_errors=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in TINY.items():
        set_key(params, key, value)
    params["ablations"].update(ABLATIONS)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state = root / ".ovseg"
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               OVSEG_STATE_DIR=str(state), PREFECT_HOME=str(state / "prefect"))
    env.pop("PREFECT_API_URL", None)
    nltk_data = REPO / ".ovseg" / "nltk_data"
    if nltk_data.is_dir():  # installed by setup.sh; shared rather than copied
        state.mkdir(parents=True, exist_ok=True)
        (state / "nltk_data").symlink_to(nltk_data)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        run(cmd, root, env)
    run(["dvc", "remote", "add", "-d", "shared", str(root.parent / "remote")], root, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "remote"], root, env)
    port = free_port()
    run([sys.executable, "-m", "flows.server", "start", "--port", str(port)], root, env)
    try:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        first = run([sys.executable, "-m", "flows.pipeline", "--push"], root, env)
        yield root, env, first
    finally:  # never leave the server behind, also when the repro fails
        run([sys.executable, "-m", "flows.server", "stop"], root, env, check=False)


def stage_names(root: Path) -> set[str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return set(lock["stages"])


def query_prefect(env: dict[str, str], body: str) -> Any:
    """Run `body` against the server in `env` in a new interpreter (this one's Prefect settings are the tests'):
    `c` is a sync Prefect client, and the JSON of what `body` assigns to `result` is returned."""
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import *\nfrom prefect.client.schemas.sorting import FlowRunSort\n"
            "with get_client(sync_client=True) as c:\n" + "".join(f"    {line}\n" for line in body.splitlines())
            + "print(json.dumps(result))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def flow_runs(env: dict[str, str]) -> dict[str, Any]:
    """Every flow run (flow, state, tags, id; oldest first), the artifact keys and the error logs the server holds."""
    return query_prefect(env, """\
flows = {f.id: f.name for f in c.read_flows(limit=200)}
errors = c.read_logs(log_filter=LogFilter(level=LogFilterLevel(ge_=40)), limit=50)
result = {'runs': [{'flow': flows.get(r.flow_id), 'state': r.state_name, 'tags': r.tags, 'id': str(r.id)}
                   for r in c.read_flow_runs(limit=200, sort=FlowRunSort.EXPECTED_START_TIME_ASC)],
          'artifacts': [a.key for a in c.read_latest_artifacts(limit=200) if a.key],
          'errors': [e.message.splitlines()[0] for e in errors]}""")


def pipeline_view(env: dict[str, str]) -> list[dict[str, Any]]:
    """Every driver flow run, oldest first, with its task runs in timeline order (name, state name, the stage flow
    run each stands for) and the ids of the stage flow runs whose parent is one of them."""
    return query_prefect(env, """\
drivers = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=['ovseg-pipeline'])),
                           sort=FlowRunSort.EXPECTED_START_TIME_ASC)
children = {str(r.parent_task_run_id): str(r.id) for r in c.read_flow_runs(limit=200) if r.parent_task_run_id}
result = []
for d in drivers:
    tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[d.id])))
    tasks.sort(key=lambda t: t.start_time or t.expected_start_time)
    result.append({'state': d.state_name, 'tasks': [{'name': t.name, 'state': t.state_name,
                   'child': str(t.state.state_details.child_flow_run_id or ''), 'parent_of': children.get(str(t.id))}
                   for t in tasks]})""")


def stages_in_order(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in its order, as flow names (`mine@gt-nouns` -> `mine-gt-nouns`)."""
    return [line.split("'")[1].replace("@", "-") for line in output.splitlines() if line.startswith("Running stage")]


def test_driver_validates_runs_pushes_and_prints_the_headline(pipeline):
    root, env, first = pipeline
    out = first.stdout
    assert "everything the run needs is in place" in out
    assert out.index("everything the run needs is in place") < out.index("Running stage")
    assert "Pipeline finished" in out
    report_table = [line for line in (root / "reports" / "report.md").read_text().splitlines() if line.startswith("|")]
    assert report_table and report_table[2] in out  # the headline's first row, as the report has it
    assert json.loads(run(["dvc", "status", "--cloud", "--json"], root, env).stdout) == {}  # pushed: all in the remote


def test_the_driver_run_is_the_pipeline_with_its_stages_nested_in_order(pipeline):
    _, env, first = pipeline
    view = pipeline_view(env)
    assert view[0]["state"] == "Completed"
    tasks = view[0]["tasks"]
    assert [t["name"] for t in tasks] == stages_in_order(first.stdout)  # every stage that ran, in DAG order
    for t in tasks:  # each is a subflow run: the task run stands for the stage's flow run, which names it parent
        assert t["state"] == "Completed" and t["child"] and t["child"] == t["parent_of"], t


def test_every_stage_ran_and_reported_to_prefect(pipeline):
    root, env, _ = pipeline
    known = set(run(["dvc", "stage", "list", "--name-only"], root, env).stdout.split())
    assert known == stage_names(root)  # every stage DVC resolves from dvc.yaml and params ran
    assert {s.split("@")[0] for s in known} >= {"world", "prepare", "mine", "adapt_clip", "evaluate", "report"}
    seen = flow_runs(env)
    driver = next(r for r in seen["runs"] if r["flow"] == "ovseg-pipeline")  # the first driver run
    completed = {r["flow"]: r for r in seen["runs"] if r["state"] == "Completed"}
    for stage in stage_names(root):
        flow = stage.replace("@", "-")
        assert flow in completed, f"no completed flow run for {stage}"
        module = stage.partition("@")[0].split("-")[0]  # an ablation's group, e.g. mine-gt, runs stages.mine
        tags = set(completed[flow]["tags"])  # what the UI filters by: the project, the stage, the pipeline run
        assert {"ovseg", f"stage-{module}", f"pipeline-{driver['id'][:8]}"} <= tags, (stage, tags)
        assert any(t.startswith("pid-") for t in tags) and any(t.startswith("host-") for t in tags)
    assert not seen["errors"], f"error logs in a successful run: {seen['errors'][:5]}"
    keys = set(seen["artifacts"])  # every stage's result table, the dataset cards, the report's headline
    for stage in stage_names(root):
        assert f"{stage.replace('@', '-').replace('_', '-')}-result" in keys, f"no result artifact for {stage}"
    mined = [s.replace("@", "-") for s in stage_names(root) if s.startswith("mine")]  # mine@…, mine-gt@…
    assert len(mined) >= 2 and {f"{flow}-dataset-card" for flow in mined} <= keys
    assert "report-headline" in keys and any(k.endswith("-progress") for k in keys)
    assert (root / "reports" / "report.md").is_file()


def test_a_teammates_clone_pulls_everything_and_is_up_to_date(pipeline, tmp_path):
    root, env, _ = pipeline
    run(["git", "add", "-A"], root, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], root, env)
    clone = tmp_path / "teammate"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "models" / "train_maskformer" / "model.pt").exists()
    run(["dvc", "pull"], clone, env)  # the project's own dvc.yaml: checkpoints and models are cached outs too
    assert json.loads(run(["dvc", "status", "--json"], clone, env).stdout) == {}
    for out in ("models/train_maskformer/model.pt", "reports/report.md"):
        assert (clone / out).read_bytes() == (root / out).read_bytes()
    assert sorted(p.name for p in (clone / "data" / "mined" / "proposals-nouns").iterdir()) == \
        sorted(p.name for p in (root / "data" / "mined" / "proposals-nouns").iterdir())


def test_second_run_does_nothing_and_shows_every_stage_skipped(pipeline):
    root, env, _ = pipeline
    status = run(["dvc", "status", "--json"], root, env)
    assert json.loads(status.stdout) == {}
    again = run([sys.executable, "-m", "flows.pipeline"], root, env)
    assert "Running stage" not in again.stdout
    latest = pipeline_view(env)[-1]
    assert latest["state"] == "Completed"
    assert sorted(t["name"] for t in latest["tasks"]) == sorted(s.replace("@", "-") for s in stage_names(root))
    assert {t["state"] for t in latest["tasks"]} == {"Skipped"}


def test_one_adaptation_param_reruns_only_what_depends_on_it(pipeline):
    root, env, _ = pipeline
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["adapt_clip"]["variants"]["mpt"]["prompt_depth"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(run(["dvc", "status", "--json"], root, env).stdout))
        assert "adapt_clip@mpt" in changed
        assert not any(s.startswith(("world", "prepare", "pretrain_clip", "train_maskformer", "mine")) for s in changed)
        assert not {"adapt_clip@ft", "adapt_clip@ft-mpt"} & changed
        dry = run(["dvc", "repro", "--dry"], root, env).stdout
        ran = stages_run(dry)
        assert "adapt_clip@mpt" in ran and "adapt_clip@ft" not in ran and "train_maskformer" not in ran
        assert ran - {"adapt_clip@mpt"} <= {s for s in stage_names(root) if s.startswith(("evaluate@mpt", "sweep", "report"))}
    finally:
        (root / "params.yaml").write_text(original)


def test_a_mode_setting_reruns_only_the_variants_of_that_mode(pipeline):
    root, env, _ = pipeline
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["adapt_clip"]["modes"]["ft"]["lr"] *= 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = {s for s in json.loads(run(["dvc", "status", "--json"], root, env).stdout) if s.startswith("adapt_clip@")}
        ft_variants = {f"adapt_clip@{k}" for k, v in params["adapt_clip"]["variants"].items() if v["mode"] == "ft"}
        assert changed == ft_variants, changed
    finally:
        (root / "params.yaml").write_text(original)


def test_experiment_with_a_set_param_runs_and_is_listed_with_its_metrics(pipeline):
    root, env, _ = pipeline
    before = {name: (root / name).read_text() for name in ("params.yaml", "dvc.lock")}
    exp = run(["dvc", "exp", "run", "-n", "depth1", "-S", "adapt_clip.variants.mpt.prompt_depth=1"], root, env)
    ran = stages_run(exp.stdout)
    assert "adapt_clip@mpt" in ran and "evaluate@mpt" in ran
    assert not {"adapt_clip@ft", "train_maskformer", "mine@proposals-nouns"} & ran
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    depth1 = [e for e in experiments if e.get("name") == "depth1"]
    assert depth1, f"dvc exp show does not list the experiment: {[e.get('name') for e in experiments]}"
    data = depth1[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["adapt_clip"]["variants"]["mpt"]["prompt_depth"] == 1
    assert "metrics/evaluate/mpt.json" in data["metrics"]
    # back to the baseline params: only the same chain reruns (its metrics are not cached outs)
    for name, text in before.items():
        (root / name).write_text(text)
    back = run(["dvc", "repro"], root, env).stdout
    rerun = stages_run(back)
    assert rerun and rerun <= ran
    assert json.loads(run(["dvc", "status", "--json"], root, env).stdout) == {}


def test_failed_stage_is_failed_in_prefect_and_rerun_continues(pipeline):
    root, env, _ = pipeline
    annotations = root / "data" / "world" / "coco" / "annotations" / "instances_train2017.json"
    annotations.unlink()  # a DVC out is read-only in the cache; replace the workspace copy
    annotations.write_text("{ not json")
    # --single-item: run prepare on what is there (a plain repro would first restore world's outputs
    # from the cache, which is DVC protecting the data, not the failure we want to see)
    failed = run(["dvc", "repro", "--single-item", "prepare"], root, env, check=False)
    assert failed.returncode != 0
    assert "instances_train2017.json" in failed.stdout + failed.stderr
    assert not (root / "data" / "prepared").exists(), "a failed prepare must leave no partial out"
    runs = flow_runs(env)["runs"]
    assert any(r["flow"] == "prepare" and r["state"] == "Failed" for r in runs)
    run(["dvc", "checkout", "world", "--force"], root, env)  # the fix: restore the good input from the cache
    rerun = run(["dvc", "repro"], root, env).stdout
    # prepare is rerun, or restored from DVC's run cache (same deps as the earlier successful run)
    assert "Running stage 'prepare'" in rerun or "Stage 'prepare' is cached" in rerun
    assert "Running stage 'world'" not in rerun
    assert (root / "data" / "prepared" / "world-coco" / "dataset.json").is_file()
    assert json.loads(run(["dvc", "status", "--json"], root, env).stdout) == {}
