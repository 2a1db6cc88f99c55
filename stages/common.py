"""What every stage shares: params loading, the stage context, and the plain command-line runner."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import yaml

from ovseg_core.progress import Progress

T = TypeVar("T")
R = TypeVar("R")

PARAMS_FILE = Path("params.yaml")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: params file not found (run from the repository root)")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params


class StageContext:
    """What a stage may ask of whoever runs it.

    This base class runs everything in-process (plain `python -m stages.<name>`); the Prefect runner in
    `flows.stage` overrides `map` with monitored, retried tasks on a task runner and the `publish_*`
    methods with UI artifacts. Stages never import Prefect themselves.
    """

    def __init__(self, name: str, params: dict[str, Any]):
        self.name = name
        self.params = params
        self.log = logging.getLogger(f"ovseg.stages.{name}")

    def section(self, key: str) -> dict[str, Any]:
        if key not in self.params:
            raise KeyError(f"params.yaml has no '{key}' section (stage {self.name})")
        return self.params[key]

    def map(self, fn: Callable[[T], R], items: Iterable[T], desc: str) -> list[R]:
        """Apply `fn` to independent work units; results in input order."""
        items = list(items)
        out = []
        with Progress(len(items), desc) as p:
            for item in items:
                out.append(fn(item))
                p.update(1)
        return out

    def publish_table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        self.log.info("%s: %s", key, json.dumps(rows)[:2000])

    def publish_markdown(self, key: str, markdown: str, description: str = "") -> None:
        self.log.info("%s:\n%s", key, markdown[:4000])


StageFn = Callable[[StageContext], dict[str, Any]]


def stage_function(name: str) -> StageFn:
    module = importlib.import_module(f"stages.{name}")
    return module.run


def run_stage(name: str, ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    summary = stage_function(name)(ctx) or {}
    summary.setdefault("wall_s", round(time.perf_counter() - start, 2))
    return summary


def main(name: str, argv: list[str] | None = None) -> None:
    """Plain runner: `python -m stages.<name> [--params params.yaml]` (no Prefect)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default=str(PARAMS_FILE))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    summary = run_stage(name, StageContext(name, load_params(args.params)))
    json.dump(summary, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
