"""Benchmark the `mine` stage: images/s and peak memory, this tree against another revision, side by side.

Runs the stage exactly as `dvc repro` does (`python -m flows.stage mine --variant <v>`, a Prefect flow, in a
new process) on the prepared COCO split and trained models of a run directory (one where `dvc repro` ran
up to `train_maskformer`), with out/work directories of its own. Each round runs every configuration once,
in turn, so both revisions meet the same machine state; `--compare REV` checks REV out into a temporary git
worktree and runs its own code with its own params.yaml (paths replaced). By default REV mines the same run
directory, with this tree's model architecture configs copied into its worktree (so that it can load models of
an architecture it did not know, e.g. c921254's 6-layer `ovseg-tiny-vit` against today's 4 layers): the code
alone is compared. `--compare-run-dir` instead gives REV a run directory of its own (its own `dvc repro` up to
`train_maskformer`), which compares the stage as each revision's default run does it. Measured per run: the process's
wall time, the stage's own wall time (`wall_s`: after interpreter start and Prefect's start-up), images/s
over both, and the peak memory of the whole process tree (sum of RSS, sampled every 0.2 s).

    python -m scripts.bench_mine --run-dir . --compare c921254 --rounds 2 --out benchmarks/mine-cpu.json
    python -m scripts.bench_mine --run-dir . --images-per-unit 150 1500      # memory vs unit size
    python -m scripts.bench_mine --run-dir . --compare c921254 --precision bf16   # this tree in bf16
    python -m scripts.bench_mine --run-dir . --compare c921254 --compare-run-dir ../c921254-run   # own models
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from scripts import measure

REPO = Path(__file__).resolve().parents[1]


def run_stage(code: Path, params: dict[str, Any], variant: str, work: Path) -> dict[str, Any]:
    """Run the stage of the tree at `code` on `params`; wall time, the stage's summary, peak tree RSS."""
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "flows.stage", "mine", "--variant", variant, "--params", str(params_file)]
    result = measure.run(cmd, code, dict(os.environ, PYTHONPATH=str(code)))
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} (in {code}) failed:\n{result.output[-3000:]}")
    summary = measure.last_json(result.output)
    return {"process_s": result.seconds, "stage_s": summary["wall_s"], "pairs": summary["pairs"],
            "images": summary["images"], "peak_rss_gib": result.peak_rss_gib,
            "peak_pss_gib": result.peak_pss_gib}


def stage_params(code: Path, run_dir: Path, variant: str, work: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The params.yaml of the tree at `code`, its mine section pointed at `run_dir`'s data and models."""
    params = yaml.safe_load((code / "params.yaml").read_text())
    mine = params["mine"]
    for key in ("dataset", "clip", "proposal_net"):
        mine[key] = str((run_dir / mine[key]).resolve())
    mine["common"]["nouns"].update(tagger=f"trained:{(run_dir / 'data/world/pos_tagged_captions.txt').resolve()}",
                                   nltk_data=str(REPO / ".ovseg" / "nltk_data"))
    mine.update(out=str(work / "out"), work=str(work / "work"), metrics=str(work / "metrics"))
    params["runs"] = str(work / "runs")  # the run record too: not the tree's committed one
    mine["common"].update(overrides)
    return params


def use_model_configs(code: Path) -> None:
    """Give the tree at `code` this tree's model architecture configs (open_clip JSONs), so that it loads the
    run directory's models whatever architecture its own configs name."""
    for config in (REPO / "ovseg_core" / "model_configs").glob("*.json"):
        shutil.copy2(config, code / "ovseg_core" / "model_configs" / config.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO, help="where dvc repro wrote data/ and models/")
    parser.add_argument("--variant", default="proposals-nouns")
    parser.add_argument("--compare", metavar="REV", help="also run this git revision's stage, side by side")
    parser.add_argument("--compare-run-dir", type=Path, metavar="DIR",
                        help="REV mines DIR's data with DIR's models (default: --run-dir's, with this tree's "
                             "model configs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images-per-unit", type=int, nargs="+", default=[None],
                        help="mine.common.images_per_unit values to run (this tree only; default: params.yaml's)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="compute.precision of this tree's runs (default: params.yaml's)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-mine-") as tmp:
        tmp = Path(tmp)
        precision = f" {args.precision}" if args.precision else ""
        configs = [(f"HEAD images_per_unit={n or 'params'}{precision}", REPO, args.run_dir,
                    {"images_per_unit": n} if n else {}) for n in args.images_per_unit]
        if args.compare:
            old = tmp / "compare"
            subprocess.run(["git", "worktree", "add", "--detach", str(old), args.compare], cwd=REPO, check=True,
                           capture_output=True)
            if args.compare_run_dir is None:
                use_model_configs(old)
            configs.append((f"{args.compare}", old, args.compare_run_dir or args.run_dir, {}))
        try:
            results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in configs}
            for round_ in range(args.rounds):
                for name, code, run_dir, overrides in configs:
                    work = tmp / f"run-{len(results[name])}-{name.split()[0]}"
                    work.mkdir()
                    params = stage_params(code, run_dir, args.variant, work, overrides)
                    if code == REPO and args.precision:
                        params["compute"]["precision"] = args.precision
                    r = run_stage(code, params, args.variant, work)
                    results[name].append(r)
                    print(f"round {round_ + 1} {name}: {r}", flush=True)
                    shutil.rmtree(work)
        finally:
            if args.compare:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)

    summary = {}
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["process_s"])
        summary[name] = {**best, "images_per_s_process": round(best["images"] / best["process_s"], 1),
                         "images_per_s_stage": round(best["images"] / best["stage_s"], 1),
                         "peak_rss_gib_max": max(r["peak_rss_gib"] for r in runs), "runs": runs}
    print(json.dumps({k: {x: v for x, v in s.items() if x != "runs"} for k, s in summary.items()}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "date": datetime.date.today().isoformat(),
            "machine": f"{measure.machine()}, no GPU used",
            "command": "python -m scripts.bench_mine " + " ".join(sys.argv[1:]),
            "compared": None if not args.compare else (
                f"{args.compare} on its own run directory ({args.compare_run_dir})" if args.compare_run_dir else
                f"{args.compare} on the same data and models (this tree's model configs)"),
            "measured": "best of the rounds by process wall time; peak RSS = sum over the stage's process tree",
            "results": summary,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
