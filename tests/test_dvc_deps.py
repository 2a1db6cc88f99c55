"""dvc.yaml lists, for every stage, the code that stage imports: editing any module a stage runs must
make DVC rerun it (and nothing else). Checked by following the imports of each stage's module."""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ovseg_core", "stages")
# Orchestration only: how a stage is launched and monitored, not what it computes. (stages/common.py is not:
# it merges variant settings and fingerprints resumable work.)
NOT_COMPUTATION = {"stages/__init__.py", "ovseg_core/__init__.py", "ovseg_core/progress.py"}


def module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def imported_modules(source: Path) -> set[str]:
    """Names of the project modules that `source` imports (a package's import also loads its __init__)."""
    tree = ast.parse(source.read_text(), filename=str(source))
    package = ".".join(source.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    found = set()
    for name in names:
        if name.split(".")[0] not in PACKAGES:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ and c
            if module_file(".".join(parts[:i])):
                found.add(".".join(parts[:i]))
    return found


def code_closure(module: str) -> set[str]:
    """Repository-relative files of every project module `module` loads, itself included."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)) - seen)
    files = {module_file(name).relative_to(REPO).as_posix() for name in seen}
    if "ovseg_core.clip.models" in seen:  # it registers every open_clip model config in this folder
        files.add("ovseg_core/model_configs")
    return files - NOT_COMPUTATION


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def stage_deps() -> dict[str, list[str]]:
    with Repo(str(REPO)) as repo:
        return {stage.name: [Path(dep.def_path).as_posix() for dep in stage.deps] for stage in repo.index.stages}


def test_closure_follows_imports():
    # stages.sweep imports stages.evaluate, which imports ovseg_core.evaluation; all must be found
    files = code_closure("stages.sweep")
    assert {"stages/sweep.py", "stages/evaluate.py", "ovseg_core/evaluation.py", "ovseg_core/atomic.py"} <= files
    assert not any(f.startswith("flows/") for f in files)


def stage_modules() -> dict[str, str]:
    """The stage module each dvc.yaml stage runs (`python -m flows.stage <name> ...` runs `stages.<name>`)."""
    with Repo(str(REPO)) as repo:
        return {stage.name: "stages." + stage.cmd.split("flows.stage", 1)[1].split()[0] for stage in repo.index.stages}


@pytest.mark.parametrize("stage, deps", sorted(stage_deps().items()))
def test_stage_lists_the_code_it_runs(stage: str, deps: list[str]):
    module = stage_modules()[stage]
    missing = sorted(f for f in code_closure(module) if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs code it does not list as deps: {missing}"


@pytest.mark.parametrize("stage, deps", sorted(stage_deps().items()))
def test_stage_lists_no_code_it_does_not_run(stage: str, deps: list[str]):
    """The other half of "and nothing else": a module a stage does not load must not rerun it when edited."""
    closure = code_closure(stage_modules()[stage])
    extra = sorted(d for d in deps if d.endswith(".py") and d not in closure)
    assert not extra, f"dvc.yaml stage {stage!r} lists code it does not run as deps: {extra}"


def stage_metrics_and_outs() -> dict[str, tuple[list[str], list[str]]]:
    with Repo(str(REPO)) as repo:
        return {stage.name: ([Path(m.def_path).as_posix() for m in stage.metrics],
                             [Path(o.def_path).as_posix() for o in stage.outs]) for stage in repo.index.stages}


@pytest.mark.parametrize("stage, declared", sorted(stage_metrics_and_outs().items()))
def test_every_metrics_file_has_its_details_file_as_an_out(stage: str, declared: tuple[list[str], list[str]]):
    """A stage's metrics file holds its headline numbers and the details file beside it everything
    (`stages.common.write_metrics`): DVC must know the details file too, or a clone would lack it."""
    from stages.common import details_path

    metrics, outs = declared
    for path in metrics:
        assert details_path(path).as_posix() in outs, f"{stage}: {details_path(path)} is not among its outs"


def test_an_ablation_switched_on_adds_stages_with_the_deps_of_the_variant_it_varies(tmp_path):
    """`ablations.prompt_depths` (one setting) adds an adaptation and an evaluation per depth; their deps (code,
    starting CLIP, pairs, evaluation sets) are those of adapt_clip@mpt and evaluate@mpt, their outs their own."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ablations"]["prompt_depths"] = [1, 6]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(str(tmp_path), no_scm=True).close()
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages}

    def paths(items) -> list[str]:
        return sorted(Path(i.def_path).as_posix() for i in items)

    for depth in (1, 6):
        name = f"mpt-depth-{depth}"

        def renamed(items) -> list[str]:  # the mpt variant's paths with this depth's variant name
            return sorted(re.sub(r"(?<=/)mpt(?=$|/|\.json$)", name, p) for p in paths(items))

        adapt, evaluate = stages[f"adapt_clip-mpt-depth@{depth}"], stages[f"evaluate-mpt-depth@{depth}"]
        assert adapt.cmd == f"python -m flows.stage adapt_clip --variant {name}"
        assert paths(adapt.deps) == paths(stages["adapt_clip@mpt"].deps)
        assert paths(adapt.outs) == renamed(stages["adapt_clip@mpt"].outs)
        assert paths(evaluate.deps) == renamed(stages["evaluate@mpt"].deps)
        assert paths(evaluate.outs) == renamed(stages["evaluate@mpt"].outs)
        assert f"models/adapt_clip/{name}" in paths(evaluate.deps)


def test_the_gt_masks_ablation_adds_table2s_chain_with_the_deps_of_the_ft_chain(tmp_path):
    """`ablations.gt_masks` (one setting) adds, per labelling, the mining of ground-truth-mask pairs, `ft` on them
    and its evaluation; their deps are those of mine@proposals-nouns, adapt_clip@ft (but the pairs) and
    evaluate@ft, their outs their own."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ablations"]["gt_masks"] = ["classes", "nouns"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(str(tmp_path), no_scm=True).close()
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages}

    def paths(items, old: str = "", new: str = "") -> list[str]:
        return sorted({re.sub(rf"(?<=/){old}(?=$|/|\.json$)", new, Path(i.def_path).as_posix()) if old
                       else Path(i.def_path).as_posix() for i in items})

    for labels in ("classes", "nouns"):
        pairs, variant = f"gt-{labels}", f"ft-gt-{labels}"
        mine, adapt, evaluate = (stages[f"mine-gt@{labels}"], stages[f"adapt_clip-ft-gt@{labels}"],
                                 stages[f"evaluate-ft-gt@{labels}"])
        assert mine.cmd == f"python -m flows.stage mine --variant {pairs}"
        assert paths(mine.deps) == paths(stages["mine@proposals-nouns"].deps)
        assert paths(mine.outs) == paths(stages["mine@proposals-nouns"].outs, "proposals-nouns", pairs)
        assert adapt.cmd == f"python -m flows.stage adapt_clip --variant {variant}"
        assert paths(adapt.deps) == paths(stages["adapt_clip@ft"].deps, "proposals-nouns", pairs)
        assert paths(adapt.outs) == paths(stages["adapt_clip@ft"].outs, "ft", variant)
        assert evaluate.cmd == f"python -m flows.stage evaluate --variant {variant}"
        assert paths(evaluate.deps) == paths(stages["evaluate@ft"].deps, "ft", variant)
        assert paths(evaluate.outs) == paths(stages["evaluate@ft"].outs, "ft", variant)
    assert not {"mine-gt", "adapt_clip-ft-gt", "evaluate-ft-gt"} & {n.split("@")[0] for n in stage_deps()}  # off by default
