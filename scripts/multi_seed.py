"""The whole chain over several seeds, and the paper's claims judged from them, not from one run.

    python -m scripts.multi_seed run --seeds 0 1 2 --set 'ablations.gt_masks=[classes,nouns]'   # + Table 2
    python -m scripts.multi_seed run --seeds 0 1 2     # each seed not yet collected: the chain, then collect
    python -m scripts.multi_seed run --seeds 0 1 2 --force --set 'ablations.prompt_depths=[1,4]'   # + Table 5
    python -m scripts.multi_seed run --seeds 0 1 2 --jobs 2      # two seeds at a time (see run_queued)
    python -m scripts.multi_seed report                # reports/seeds.md and reports/seeds.json

`run` reproduces the chain once per seed on the same world: for params.yaml's own `seed` a plain `dvc repro`, for
every other seed a DVC experiment, `dvc exp run -S seed=N --name seed-N`, which reruns only the stages the seed
reaches, not `world` and `prepare` (`dvc exp show` lists them with their headline metrics; each training stage's
seed is offset by the run seed, see stages/common.py). `--set KEY=VALUE` (repeatable, `dvc exp run -S` syntax)
changes params.yaml for every seed, e.g. to switch an ablation on; then every seed, params.yaml's own too, runs as
an experiment. With `--jobs N` those experiments are queued and run N at a time, each in a temporary copy of the
repository (`dvc exp run --run-all --jobs N`), and their scores are read from their commits: the workspace is not
touched. After each run the evaluation scores (`report.evaluations`) and the sweep's best cell are copied to
`reports/seeds/seed-N/` (a few KB, committed with the report), and at the end the workspace is put back to
params.yaml's seed: every file git tracks (params.yaml, dvc.lock and the stages' uncached metrics, plots and report)
as it was before the first experiment, then `dvc checkout` for the cached outputs; files an experiment added that
git neither tracks nor ignores (the outputs of stages that only the experiment's settings add; not the collected
seeds) are removed.

`report` reads every `reports/seeds/seed-*/` and writes every evaluated score as mean ± standard deviation over the
seeds, and a verdict for each claim of the paper. A claim "A > B" is judged on the paired differences A − B of the
same seed (the seeds share nothing else, so the pairing removes the run-to-run noise common to both): **holds** when
their mean is more than two standard errors above 0, **reversed** when more than two standard errors below, and
**within noise** otherwise. With three seeds two standard errors is a loose bar (Student's t with 2 degrees of
freedom puts 95 % at 4.3), so "holds" and "reversed" mean "consistent across these seeds", no more.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from flows import launcher
from flows.env import STATE_DIR
from ovseg_core.atomic import atomic_file
from ovseg_core.compute import usable_cpus
from stages.common import variant_depth

SEEDS_DIR = Path("reports/seeds")
METRICS = ("mIoU", "seen_mIoU", "unseen_mIoU", "hIoU")
BRANCHES = ("ensemble", "clip", "maskformer")
Z = 2.0  # standard errors of the mean paired difference that a verdict needs


@dataclass(frozen=True)
class Claim:
    """"`better` scores higher than `worse`" (each (variant, branch, metric)) on the report's first dataset, or with
    `wide`, on its larger-vocabulary set (`report.larger_vocabulary`); `paper` says where the paper makes the claim."""
    name: str
    paper: str
    better: tuple[str, str, str]
    worse: tuple[str, str, str]
    wide: bool = False


CLAIMS = (
    Claim("adapted CLIP (FT→MPT) > original CLIP", "Table 3", ("ft-mpt", "ensemble", "mIoU"),
          ("original", "ensemble", "mIoU")),
    Claim("MPT > original CLIP", "Table 3 (a)", ("mpt", "ensemble", "mIoU"), ("original", "ensemble", "mIoU")),
    Claim("FT > original CLIP", "Table 3 (b)", ("ft", "ensemble", "mIoU"), ("original", "ensemble", "mIoU")),
    Claim("FT→MPT > FT", "Table 3 (c) vs (b)", ("ft-mpt", "ensemble", "mIoU"), ("ft", "ensemble", "mIoU")),
    Claim("FT→MPT > MPT", "Table 3 (c) vs (a)", ("ft-mpt", "ensemble", "mIoU"), ("mpt", "ensemble", "mIoU")),
    Claim("caption nouns > GT classes on unseen classes (proposal masks)", "Table 2 (3) vs (1)",
          ("ft", "ensemble", "unseen_mIoU"), ("ft-gt-classes", "ensemble", "unseen_mIoU")),
    Claim("caption nouns > GT classes on unseen classes (GT masks)", "Table 2 (2) vs (1)",
          ("ft-gt-nouns", "ensemble", "unseen_mIoU"), ("ft-gt-classes", "ensemble", "unseen_mIoU")),
    # Table 2's A-847 / PC-459 columns: mIoU over a vocabulary larger than the training one
    Claim("caption nouns > GT classes on the larger vocabulary (proposal masks)", "Table 2 (3) vs (1), A-847",
          ("ft", "ensemble", "mIoU"), ("ft-gt-classes", "ensemble", "mIoU"), wide=True),
    Claim("caption nouns > GT classes on the larger vocabulary (GT masks)", "Table 2 (2) vs (1), A-847",
          ("ft-gt-nouns", "ensemble", "mIoU"), ("ft-gt-classes", "ensemble", "mIoU"), wide=True),
    Claim("adapted CLIP (FT→MPT) > original CLIP on the larger vocabulary", "Table 3, A-847",
          ("ft-mpt", "ensemble", "mIoU"), ("original", "ensemble", "mIoU"), wide=True),
    Claim("ensemble > MaskFormer's class prediction alone", "Table 6", ("ft-mpt", "ensemble", "mIoU"),
          ("ft-mpt", "maskformer", "mIoU")),
    Claim("ensemble > CLIP's class prediction alone", "Table 6", ("ft-mpt", "ensemble", "mIoU"),
          ("ft-mpt", "clip", "mIoU")),
)
DEFAULT_DEPTH = 3  # `mpt`'s prompt depth (params.yaml adapt_clip.variants.mpt); Table 5 compares the others to it


def depth_variants(seeds: dict[int, dict[str, Any]]) -> dict[int, str]:
    """Table 5 (w/o FT): {depth: variant} of `mpt` and of every `ablations.prompt_depths` variant all seeds evaluated."""
    common = set.intersection(*(set(r["evaluations"]) for r in seeds.values())) if seeds else set()
    found = {depth: v for v in common if (depth := variant_depth(v)) is not None}
    return {**found, DEFAULT_DEPTH: "mpt"} if "mpt" in common else found


def verdict(differences: Sequence[float], z: float = Z) -> dict[str, Any]:
    """Mean, standard deviation and standard error of paired differences, and the verdict (module docstring)."""
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return {"seeds": n, "mean": mean, "std": None, "se": None, "verdict": "one seed: no verdict"}
    std = statistics.stdev(differences)
    se = std / math.sqrt(n)
    word = "holds" if mean - z * se > 0 else "reversed" if mean + z * se < 0 else "within noise"
    return {"seeds": n, "mean": mean, "std": std, "se": se, "verdict": word}


def load_seeds(root: Path = SEEDS_DIR) -> dict[int, dict[str, Any]]:
    """{seed: {"evaluations": {variant: scores}, "sweep": best cell or None}} for every collected seed."""
    seeds = {}
    for d in sorted(root.glob("seed-*"), key=lambda p: int(p.name.split("-", 1)[1])):
        evals = {p.stem: json.loads(p.read_text()) for p in sorted((d / "evaluate").glob("*.json"))}
        sweep = d / "sweep.json"
        seeds[int(d.name.split("-", 1)[1])] = {"evaluations": evals,
                                               "sweep": json.loads(sweep.read_text()) if sweep.is_file() else None}
    return seeds


def score(run: dict[str, Any], dataset: str, key: tuple[str, str, str]) -> float | None:
    variant, branch, metric = key
    return (run["evaluations"].get(variant, {}).get(dataset, {}).get(branch) or {}).get(metric)


def judge(seeds: dict[int, dict[str, Any]], dataset: str, wide: str | None = None) -> list[dict[str, Any]]:
    """Every claim's paired differences over the seeds that evaluated both sides, and its verdict; claims on the
    larger vocabulary are judged on `wide` (not evaluated without one)."""
    judged = []
    for claim in CLAIMS:
        on = wide if claim.wide else dataset
        pairs = [(score(r, on, claim.better), score(r, on, claim.worse)) for r in seeds.values()] if on else []
        diffs = [a - b for a, b in pairs if a is not None and b is not None]
        entry = {"claim": claim.name, "paper": claim.paper, "dataset": on, "better": "/".join(claim.better),
                 "worse": "/".join(claim.worse), "differences": [round(d, 4) for d in diffs]}
        missing = "not evaluated" + ("" if on else ": no larger-vocabulary set (report.larger_vocabulary)")
        judged.append({**entry, **(verdict(diffs) if diffs else {"seeds": 0, "verdict": missing})})
    depths = depth_variants(seeds)
    if len(depths) > 1 and DEFAULT_DEPTH in depths:
        # "roughly flat": no depth differs from the default depth by more than the noise
        others = [verdict([score(r, dataset, (v, "ensemble", "mIoU")) - score(r, dataset, ("mpt", "ensemble", "mIoU"))
                           for r in seeds.values()]) for d, v in sorted(depths.items()) if d != DEFAULT_DEPTH]
        flat = all(o["verdict"] == "within noise" for o in others)
        named = " and ".join(str(d) for d in sorted(depths) if d != DEFAULT_DEPTH)
        judged.append({"claim": f"prompt depth roughly flat (depth {named} vs {DEFAULT_DEPTH})", "paper": "Table 5",
                       "dataset": dataset,
                       "differences": [round(o["mean"], 4) for o in others], "seeds": len(seeds),
                       "verdict": "holds" if flat else "not flat"})
    else:
        judged.append({"claim": "prompt depth roughly flat", "paper": "Table 5", "seeds": 0,
                       "verdict": "not evaluated: the depth ablation did not run (ablations.prompt_depths: [1, 4])"})
    return judged


def cells(seeds: dict[int, dict[str, Any]], dataset: str) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds of every (variant, branch, metric) evaluated in every seed."""
    variants = sorted(set.intersection(*(set(r["evaluations"]) for r in seeds.values())))
    rows = []
    for variant in variants:
        for branch in BRANCHES:
            values = {m: [score(r, dataset, (variant, branch, m)) for r in seeds.values()] for m in METRICS}
            if any(v is None for vs in values.values() for v in vs):
                continue
            rows.append({"variant": variant, "branch": branch,
                         **{m: {"mean": statistics.fmean(vs), "std": statistics.stdev(vs) if len(vs) > 1 else None}
                            for m, vs in values.items()}})
    return rows


def fmt(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def render(seeds: dict[int, dict[str, Any]], datasets: Sequence[str], judged: list[dict[str, Any]],
           rows: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    sets = " and ".join(f"`{d}`" for d in datasets)
    lines = [f"# OVSeg on the embedded world over {len(seeds)} seeds", "",
             f"Run seeds {', '.join(map(str, seeds))} of the whole chain (CLIP pretraining, MaskFormer, mining, "
             f"adaptation, evaluation) on one world; evaluation sets {sets}; scores in %, mean ± standard "
             "deviation over the seeds. Written by `python -m scripts.multi_seed report` from `reports/seeds/`"
             f"{'; the runs took ' + meta['wall'] if meta.get('wall') else ''}.", "",
             "## The paper's claims", "",
             "Verdict from the paired differences (same seed) of the two sides: *holds* / *reversed* when their mean "
             f"is more than {Z:g} standard errors above / below 0, else *within noise* (see scripts/multi_seed.py).",
             "", "| claim | paper | set | difference, mean ± std | per seed | verdict |", "|---|---|---|---|---|---|"]
    for j in judged:
        diff = fmt(j["mean"], j.get("std")) if "mean" in j else "–"
        per_seed = ", ".join(f"{d:+.1f}" for d in j.get("differences", [])) or "–"
        on = f"`{j['dataset']}`" if j.get("dataset") else "–"
        lines.append(f"| {j['claim']} | {j['paper']} | {on} | {diff} | {per_seed} | **{j['verdict']}** |")
    lines.append("")
    best = [(s, r["sweep"]) for s, r in seeds.items() if r["sweep"]]
    if best:
        lines += ["## λ × mask threshold sweep (world-val)", "", "| seed | best λ | best threshold | mIoU |",
                  "|---|---|---|---|"]
        lines += [f"| {s} | {b.get('best_lambda')} | {b.get('best_threshold')} | {b.get('best_mIoU')} |" for s, b in best]
        lines += ["", "The paper uses λ = 0.7 on ADE-150; the report evaluates with params.yaml's λ.", ""]
    for dataset, table in rows.items():
        lines += [f"## Every score on `{dataset}`", "", "| variant | branch | " + " | ".join(METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        lines += [f"| `{r['variant']}` | {r['branch']} | " +
                  " | ".join(fmt(r[m]["mean"], r[m]["std"]) for m in METRICS) + " |" for r in table]
        lines.append("")
    return "\n".join(lines)


def write_report(out_md: Path, out_json: Path, dataset: str, root: Path = SEEDS_DIR,
                 wide: str | None = None) -> dict[str, Any]:
    """The report on `dataset` (and the claims on the larger vocabulary on `wide`, when given)."""
    seeds = load_seeds(root)
    if not seeds:
        sys.exit(f"no seeds collected under {root}/ (run `python -m scripts.multi_seed run --seeds 0 1 2` first)")
    meta = json.loads((root / "runs.json").read_text()) if (root / "runs.json").is_file() else {}
    datasets = [dataset] + ([wide] if wide else [])
    judged, rows = judge(seeds, dataset, wide), {d: cells(seeds, d) for d in datasets}
    wall = meta.get("wall_s")
    meta["wall"] = f"{sum(wall.values()) / 60:.0f} min on {meta.get('machine', '?')}" if wall else None
    out_md.write_text(render(seeds, datasets, judged, rows, meta))
    record = {"seeds": sorted(seeds), "datasets": datasets, "claims": judged, "scores": rows, "runs": meta}
    out_json.write_text(json.dumps(record, indent=1) + "\n")
    return record


DVC = str(Path(sys.executable).with_name("dvc"))  # this environment's, also when it was not activated


def sh(*cmd: str, check: bool = True, env: dict[str, str] | None = None) -> int:
    """Run a command (with `env` added to the environment) and return its exit status; `dvc` is this
    environment's, and so is dvc.yaml's `python`, also when it was not activated."""
    print("+", " ".join(cmd), flush=True)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    full = {**os.environ, **(env or {}), "PATH": path}
    return subprocess.run([DVC, *cmd[1:]] if cmd[0] == "dvc" else cmd, check=check, env=full).returncode


def collect(seed: int, params: dict[str, Any], root: Path, commit: str | None = None) -> None:
    """Copy the evaluation scores and sweep result to `root/seed-<seed>/`: this workspace's, or with `commit`, those
    of that commit (an experiment's, read from git without touching the workspace)."""
    dest = root / f"seed-{seed}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    evaluations, sweep = Path(params["report"]["evaluations"]), Path(params["report"]["sweep"])
    if commit is None:
        shutil.copytree(evaluations, tmp / "evaluate")
        if sweep.is_file():
            shutil.copy2(sweep, tmp / "sweep.json")
    else:
        (tmp / "evaluate").mkdir(parents=True)
        for name in git("ls-tree", "-r", "--name-only", commit, "--", f"{evaluations.as_posix()}/").splitlines():
            (tmp / "evaluate" / Path(name).relative_to(evaluations)).write_text(git("show", f"{commit}:{name}"))
        if git("ls-tree", "--name-only", commit, "--", sweep.as_posix()):
            (tmp / "sweep.json").write_text(git("show", f"{commit}:{sweep.as_posix()}"))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def run_seeds(seeds: Sequence[int], root: Path, force: bool, sets: Sequence[str] = (), jobs: int = 1) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    own = int(params.get("seed") or 0)
    runs_file = root / "runs.json"
    meta = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    meta.setdefault("wall_s", {})
    meta.update(date=datetime.date.today().isoformat(), machine=machine(), sets=list(sets), jobs=jobs,
                command="python -m scripts.multi_seed run --seeds " + " ".join(map(str, seeds))
                + (" --force" if force else "") + "".join(f" --set '{s}'" for s in sets)
                + (f" --jobs {jobs}" if jobs > 1 else ""))
    root.mkdir(parents=True, exist_ok=True)
    # params.yaml's own seed first, so that its results are what the workspace is put back to at the end
    todo = [s for s in sorted(seeds, key=lambda s: s != own) if force or not (root / f"seed-{s}").is_dir()]
    print(f"seeds to run: {todo or 'none'} (collected already: {sorted(set(seeds) - set(todo))})", flush=True)
    # the wall times of earlier runs of these seeds no longer describe what reports/seeds/ holds
    meta["wall_s"] = {k: v for k, v in meta["wall_s"].items() if not set(k.split("+")) & set(map(str, todo))}
    kept: dict[Path, bytes] = {}
    new_before = untracked()

    def done(key: str, t0: float) -> None:
        meta["wall_s"][key] = round(time.perf_counter() - t0, 1)
        runs_file.write_text(json.dumps(meta, indent=1) + "\n")

    # the workspace's runs fork their stages from one preloaded launcher (flows.launcher); queued experiments,
    # in temporary copies of the repository, start an interpreter per stage
    with launcher.running(log=STATE_DIR / "launcher.log"):
        try:
            if todo and own == todo[0] and not sets:  # params.yaml's own run, in the workspace as `dvc repro` runs it
                t0 = time.perf_counter()
                sh("dvc", "repro")
                collect(own, params, root)
                done(str(own), t0)
                todo = todo[1:]
            if todo and jobs > 1:  # experiments in temporary copies: the workspace is left as it is
                t0 = time.perf_counter()
                commits = run_queued(todo, sets, jobs)
                for seed, commit in commits.items():
                    collect(seed, params, root, commit)
                done("+".join(map(str, todo)), t0)
                failed = [s for s in todo if s not in commits]
                if failed:
                    raise RuntimeError(f"the experiments of seeds {failed} failed (see `dvc queue logs seed-N`)")
            else:
                for seed in todo:
                    t0 = time.perf_counter()
                    kept = kept or tracked_files(exclude=root)
                    # `exp run` refuses a name an earlier experiment has; its --force would also rerun every stage
                    sh("dvc", "exp", "remove", f"seed-{seed}", check=False)
                    sh("dvc", "exp", "run", "-S", f"seed={seed}", *(a for s in sets for a in ("-S", s)),
                       "--name", f"seed-{seed}")
                    collect(seed, params, root)
                    done(str(seed), t0)
        finally:
            if kept:  # back to params.yaml's seed and its results
                restore(kept)
                sh("dvc", "checkout", "--force")
                remove_new({f for f in untracked() - new_before if root.resolve() not in f.resolve().parents})


def run_queued(seeds: Sequence[int], sets: Sequence[str], jobs: int) -> dict[int, str]:
    """Every seed as a queued DVC experiment, `jobs` at a time, each in a temporary copy of the repository
    (`dvc exp run --run-all --jobs`); returns {seed: the commit of its experiment} for those that finished.

    On the CPU, each experiment's stages get cores / jobs torch threads (`compute.threads`) and run one work unit at
    a time (`prefect.max_workers`), so the runs share the cores instead of oversubscribing them. Neither setting is a
    stage's DVC param: they change float rounding, not what a stage computes. Measured on 2 cores
    (`scripts/bench_side_by_side.py`): two adaptations side by side, one core each, 61 s; one after the other with
    both cores, 76 s. The single-threaded parts of each stage (start-up, imports, data loading) overlap with the
    other's compute, and at two threads these small models run only 1.7-1.9x faster than at one.
    The stages report to this project's Prefect server and read its NLTK data, which the temporary copies lack."""
    state = Path(os.environ.get("OVSEG_STATE_DIR", ".ovseg")).resolve()
    env = {"OVSEG_STATE_DIR": str(state), "NLTK_DATA": str(state / "nltk_data")}
    threads = max(1, usable_cpus() // jobs)
    for seed in seeds:
        sh("dvc", "exp", "remove", f"seed-{seed}", check=False)
        sh("dvc", "exp", "run", "--queue", "-S", f"seed={seed}", "-S", f"compute.threads={threads}",
           "-S", "prefect.max_workers=1", *(a for s in sets for a in ("-S", s)), "--name", f"seed-{seed}")
    sh("dvc", "exp", "run", "--run-all", "--jobs", str(jobs), check=False, env=env)
    commits = experiment_commits()
    return {s: commits[f"seed-{s}"] for s in seeds if f"seed-{s}" in commits}


def experiment_commits() -> dict[str, str]:
    """{name: commit} of the experiments DVC holds on the current commit (`dvc exp show`)."""
    out = subprocess.run([DVC, "exp", "show", "--json", "--no-pager"], check=True, capture_output=True,
                         text=True).stdout
    head = git("rev-parse", "HEAD").strip()
    return {rev["name"]: rev["rev"] for baseline in json.loads(out) if baseline["rev"] == head
            for exp in baseline.get("experiments") or [] for rev in exp["revs"] if rev.get("name")}


def untracked() -> set[Path]:
    """Files git neither tracks nor ignores."""
    return {Path(n) for n in git("ls-files", "--others", "--exclude-standard", "-z").split("\0") if n}


def remove_new(files: set[Path]) -> None:
    """Delete `files` (an experiment's leftovers) and the directories they leave empty."""
    for f in sorted(files):
        print(f"removing the experiment's {f}", flush=True)
        f.unlink(missing_ok=True)
        for parent in f.parents:
            if parent == Path(".") or any(parent.iterdir()):
                break
            parent.rmdir()


def tracked_files(exclude: Path) -> dict[Path, bytes]:
    """The bytes of every file git tracks, or would track (not ignored, not yet added), outside `exclude` (a few
    MB: code, params, lock, metrics, plots).

    An experiment rewrites params.yaml and dvc.lock, and also the outputs DVC does not cache (metrics, plots, the
    report), which `dvc checkout` cannot bring back; so they are kept here before the first experiment. Files not
    yet added count too: a run's new uncached outputs (e.g. a new evaluation set's plots) are overwritten by the
    experiments just the same."""
    files = (Path(n) for n in git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0") if n)
    return {f: f.read_bytes() for f in files if f.is_file() and exclude.resolve() not in f.resolve().parents}


def restore(kept: dict[Path, bytes]) -> None:
    """Write back each kept file whose bytes changed (atomically)."""
    for path, data in kept.items():
        if not path.is_file() or path.read_bytes() != data:
            with atomic_file(path) as tmp:
                tmp.write_bytes(data)


def machine() -> str:
    import platform
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else "?"
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the chain for each seed not collected yet, then collect its scores")
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--force", action="store_true", help="rerun seeds that are collected already")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a params.yaml change for every seed (dvc exp run -S syntax), e.g. 'ablations.prompt_depths=[1,4]'")
    r.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once, each a queued DVC experiment in a temporary copy (default: one after another)")
    sub.add_parser("report", help="aggregate reports/seeds/seed-*/ into reports/seeds.md and reports/seeds.json")
    args = ap.parse_args(argv)
    params = yaml.safe_load(Path("params.yaml").read_text())
    if args.cmd == "run":
        from flows.server import start  # every seed's stages report to this project's Prefect server

        os.environ.setdefault("PREFECT_API_URL", start())
        run_seeds(args.seeds, SEEDS_DIR, args.force, args.sets, args.jobs)
    dataset = params["report"]["datasets"][0]
    out_md = Path(params["report"].get("seeds") or "reports/seeds.md")
    record = write_report(out_md, out_md.with_suffix(".json"), dataset, wide=params["report"].get("larger_vocabulary"))
    for j in record["claims"]:
        print(f"{j['verdict']:>14}  {j['claim']}")
    print(f"wrote {out_md} and {out_md.with_suffix('.json')} ({len(record['seeds'])} seeds)")


if __name__ == "__main__":
    main()
