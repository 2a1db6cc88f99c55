"""Benchmark stages run side by side, each on a core of its own, against one after the other on every core: the
basis of `python -m scripts.multi_seed run --jobs N`.

In a run directory whose pipeline is up to date (after `python -m flows.pipeline`), each round runs the given
stages (`python -m flows.stage <args>`) twice from scratch: one after the other with every core (as `dvc repro`
runs them), then all at once, each pinned to its own core (so it sizes its torch threads to one, as `--jobs` sets
compute.threads). Before each run the `--fresh` paths (the stages' checkpoints, from which they would resume) are
cleared; the originals are put back at the end. The stages rewrite their outputs, with the float rounding of
another thread count, so run it in a scratch clone (or `git checkout -- . && dvc checkout --force` after). The
figures of 2026-12-04 were taken with the command below, when `ft-gt-classes` was a default variant; today it needs
`ablations.gt_masks: [classes]` in the run directory's params.yaml (a default variant such as `ft` does not).

    python -m scripts.bench_side_by_side --run-dir /work/run --rounds 2 \
        --fresh checkpoints/adapt_clip/mpt --fresh checkpoints/adapt_clip/ft-gt-classes \
        --out benchmarks/side-by-side-cpu-2026-12-04.json \
        -- "adapt_clip --variant mpt" "adapt_clip --variant ft-gt-classes"
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from ovseg_core.atomic import write_json
from scripts import measure

ASIDE = ".bench-original"


Started = tuple[subprocess.Popen, IO[str]]  # a stage's process and the file its output goes to


def start(args: str, run_dir: Path, env: dict[str, str], core: int | None) -> Started:
    """`flows.stage <args>`, pinned to `core` if given. Its output goes to a temporary file, not a pipe: an undrained
    pipe would stall a stage that logs while another is being waited for."""
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "flows.stage", *shlex.split(args)], cwd=run_dir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=pin)
    return proc, log


def wait_all(started: dict[str, Started], t0: float) -> dict[str, float]:
    """Seconds from `t0` to each stage's end, as they end; a failed stage stops the benchmark with its output."""
    ended: dict[str, float] = {}
    while len(ended) < len(started):
        for args, (proc, log) in started.items():
            if args not in ended and proc.poll() is not None:
                ended[args] = round(time.perf_counter() - t0, 1)
                if proc.returncode:
                    log.seek(0)
                    raise SystemExit(f"flows.stage {args} failed:\n{log.read()[-3000:]}")
                log.close()
        time.sleep(0.1)
    return ended


def clear(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def one_round(stages: list[str], run_dir: Path, env: dict[str, str], fresh: list[Path]) -> dict[str, Any]:
    """Wall seconds of each stage and in all, one after the other and then side by side."""
    sequential: dict[str, float] = {}
    t0 = time.perf_counter()
    for args in stages:
        clear(fresh)
        sequential |= wait_all({args: start(args, run_dir, env, None)}, time.perf_counter())
    sequential["total"] = round(time.perf_counter() - t0, 1)
    clear(fresh)
    cores = sorted(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    side = wait_all({args: start(args, run_dir, env, cores[i % len(cores)]) for i, args in enumerate(stages)}, t0)
    side["total"] = round(time.perf_counter() - t0, 1)
    return {"sequential": sequential, "side_by_side": side}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--fresh", type=Path, action="append", default=[], help="a path cleared before each run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("stages", nargs="+", help="flows.stage arguments of each stage, e.g. 'adapt_clip --variant mpt'")
    args = ap.parse_args(argv)
    run_dir = args.run_dir.resolve()
    env = measure.tool_env()
    server = subprocess.run([sys.executable, "-c", "from flows.server import start; print(start())"], cwd=run_dir,
                            env=env, check=True, capture_output=True, text=True).stdout.split()[-1]
    env["PREFECT_API_URL"] = server  # one server for all: no stage starts a temporary one
    fresh = [run_dir / p for p in args.fresh]
    for path in fresh:
        if path.exists():
            path.rename(path.with_name(path.name + ASIDE))
    try:
        rounds = [one_round(args.stages, run_dir, env, fresh) for _ in range(args.rounds)]
    finally:
        for path in fresh:
            clear([path])
            if path.with_name(path.name + ASIDE).exists():
                path.with_name(path.name + ASIDE).rename(path)
    best = {mode: min(r[mode]["total"] for r in rounds) for mode in ("sequential", "side_by_side")}
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{measure.machine()}, no GPU used",
        "commit": measure.commit(run_dir),
        "command": "python -m scripts.bench_side_by_side " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "measured": "wall seconds from a common start: sequential = each stage alone with every core, one after "
                    "the other; side_by_side = all started at once, each pinned to one core (torch threads = 1)",
        "rounds": rounds,
        "best_total_s": best,
        "speedup": round(best["sequential"] / best["side_by_side"], 2),
    }
    write_json(args.out, record)
    print(record)


if __name__ == "__main__":
    main()
