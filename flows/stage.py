"""Run one DVC stage as a Prefect flow named after it: `python -m flows.stage <name> [--variant V]`.

This is the `cmd` of every stage in dvc.yaml. When `python -m flows.pipeline` runs `dvc repro`, a preloaded
launcher (`flows.launcher`) runs the stage in a process forked from it, which has torch, open_clip,
transformers and Prefect imported already; this command then only hands over its arguments, working
directory, environment and terminal, and exits with the stage's status. Otherwise it runs the stage itself.
The flow is in `flows.prefect_stage`; the stage's code is `stages.<name>.run`.
"""
from __future__ import annotations

import argparse
import sys

from flows import launcher  # light: Prefect and torch are imported only where the stage runs

DEFAULT_PARAMS = "params.yaml"  # stages.common.PARAMS_FILE, without importing it here


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__)
    parser.add_argument("name", help="stage module under stages/")
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--variant", default=None, help="variant of a repeated (foreach) stage")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)  # usage errors from this process, before any hand-over
    status = launcher.delegate(argv)
    if status is not None:
        return status
    from flows.prefect_stage import run

    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
