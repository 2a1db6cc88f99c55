"""The multi-seed report: verdicts from paired differences, mean ± std of every score, on hand-built seed results."""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest

from scripts import multi_seed
from scripts.multi_seed import CLAIMS, judge, load_seeds, restore, tracked_files, verdict, write_report

DATASET = "world-eval"


def test_verdict_needs_the_mean_difference_two_standard_errors_from_zero():
    assert verdict([1.0, 2.0, 3.0])["verdict"] == "holds"  # mean 2, se 0.58
    assert verdict([-1.0, -2.0, -3.0])["verdict"] == "reversed"
    assert verdict([3.0, -1.0, 1.0])["verdict"] == "within noise"  # mean 1, se 1.15
    assert verdict([0.5, 0.6, 3.0])["verdict"] == "within noise"  # all positive, but mean 1.37 < 2 x se 0.81
    one = verdict([4.0])
    assert one["verdict"] == "one seed: no verdict" and one["std"] is None
    v = verdict([1.0, 2.0, 6.0])
    assert v["mean"] == pytest.approx(3.0) and v["std"] == pytest.approx(statistics.stdev([1, 2, 6]))
    assert v["se"] == pytest.approx(v["std"] / 3 ** 0.5)


def scores(miou: float, unseen: float = 1.0) -> dict:
    return {"mIoU": miou, "seen_mIoU": miou + 1, "unseen_mIoU": unseen, "hIoU": unseen / 2}


WIDE = "world-wide"


def write_seed(root: Path, seed: int, by_variant: dict[str, dict[str, dict]], sweep: dict | None = None,
               wide: dict[str, dict[str, dict]] | None = None) -> None:
    d = root / f"seed-{seed}" / "evaluate"
    d.mkdir(parents=True)
    for variant, branches in by_variant.items():
        sets = {DATASET: branches, **({WIDE: wide[variant]} if wide and variant in wide else {})}
        (d / f"{variant}.json").write_text(json.dumps(sets))
    if sweep:
        (root / f"seed-{seed}" / "sweep.json").write_text(json.dumps(sweep))


@pytest.fixture
def three_seeds(tmp_path) -> Path:
    """ft-mpt beats original by 2-4 points in every seed; mpt vs original flips sign; GT classes beat caption nouns
    on unseen classes in every seed (a reversed claim); on the wide set, caption nouns beat GT classes by 3 points
    in every seed (ft-gt-nouns was not evaluated there)."""
    root = tmp_path / "seeds"
    for seed, (orig, ftmpt, mpt) in enumerate([(10.0, 12.0, 11.0), (11.0, 15.0, 10.0), (9.0, 12.0, 9.5)]):
        ens = lambda m, u=1.0: {"ensemble": scores(m, u), "clip": scores(m - 3), "maskformer": scores(m - 5)}  # noqa: E731
        wide = {"original": ens(orig - 4), "ft-mpt": ens(ftmpt - 5), "ft": ens(6.0 + seed), "ft-gt-classes": ens(3.0 + seed)}
        write_seed(root, seed, {"original": ens(orig), "ft-mpt": ens(ftmpt), "mpt": ens(mpt), "ft": ens(ftmpt - 1),
                                "ft-gt-classes": ens(ftmpt, u=5.0 + seed), "ft-gt-nouns": ens(ftmpt, u=2.0)},
                   {"best_lambda": 0.6 + 0.1 * seed, "best_threshold": 0.5, "best_mIoU": 20.0}, wide)
    return root


def test_claims_are_judged_from_the_seeds(three_seeds):
    judged = {j["claim"]: j for j in judge(load_seeds(three_seeds), DATASET)}
    assert len(judged) == len(CLAIMS) + 1  # and Table 5's, which did not run here
    adapted = judged["adapted CLIP (FT→MPT) > original CLIP"]
    assert adapted["differences"] == [2.0, 4.0, 3.0] and adapted["verdict"] == "holds"
    assert judged["MPT > original CLIP"]["differences"] == [1.0, -1.0, 0.5]
    assert judged["MPT > original CLIP"]["verdict"] == "within noise"
    nouns = judged["caption nouns > GT classes on unseen classes (proposal masks)"]
    assert nouns["differences"] == [-4.0, -5.0, -6.0] and nouns["verdict"] == "reversed"
    assert judged["ensemble > MaskFormer's class prediction alone"]["verdict"] == "holds"  # +5 every seed: sd 0
    assert judged["prompt depth roughly flat"]["verdict"].startswith("not evaluated")
    # without a larger-vocabulary set its claims are not judged, and say why
    wide_claim = "caption nouns > GT classes on the larger vocabulary (proposal masks)"
    assert "report.larger_vocabulary" in judged[wide_claim]["verdict"]
    with_wide = {j["claim"]: j for j in judge(load_seeds(three_seeds), DATASET, WIDE)}
    assert with_wide[wide_claim]["differences"] == [3.0, 3.0, 3.0] and with_wide[wide_claim]["verdict"] == "holds"
    assert with_wide[wide_claim]["dataset"] == WIDE
    assert with_wide["caption nouns > GT classes on the larger vocabulary (GT masks)"]["verdict"] == "not evaluated"
    assert with_wide["adapted CLIP (FT→MPT) > original CLIP on the larger vocabulary"]["differences"] == [1.0, 3.0, 2.0]
    assert with_wide["MPT > original CLIP"] == {**judged["MPT > original CLIP"]}  # the base-set claims stay


def test_prompt_depth_is_judged_on_every_depth_all_seeds_evaluated(three_seeds):
    """Table 5: the depth variants the seeds evaluated (here 1 and 4, besides mpt's 3) are each compared to depth 3;
    flat when none differs beyond the noise."""
    for seed, offsets in enumerate([(0.5, -0.5), (-1.0, 1.0), (0.2, 0.1)]):
        for depth, offset in zip((1, 4), offsets):
            mpt = json.loads((three_seeds / f"seed-{seed}/evaluate/mpt.json").read_text())
            mpt[DATASET]["ensemble"]["mIoU"] += offset
            (three_seeds / f"seed-{seed}/evaluate/mpt-depth-{depth}.json").write_text(json.dumps(mpt))
    judged = {j["claim"]: j for j in judge(load_seeds(three_seeds), DATASET)}
    flat = judged["prompt depth roughly flat (depth 1 and 4 vs 3)"]
    assert flat["verdict"] == "holds" and flat["differences"] == [pytest.approx(-0.1), pytest.approx(0.2)]
    (three_seeds / "seed-2/evaluate/mpt-depth-4.json").unlink()  # depth 4 not in every seed: only depth 1 is judged
    assert "prompt depth roughly flat (depth 1 vs 3)" in {j["claim"] for j in judge(load_seeds(three_seeds), DATASET)}


def test_report_lists_verdicts_and_every_score_as_mean_and_std(three_seeds, tmp_path):
    record = write_report(tmp_path / "seeds.md", tmp_path / "seeds.json", DATASET, three_seeds)
    text = (tmp_path / "seeds.md").read_text()
    assert record["seeds"] == [0, 1, 2]
    assert "| MPT > original CLIP | Table 3 (a) | `world-eval` | 0.2 ± 1.0 | +1.0, -1.0, +0.5 | **within noise** |" in text
    original = next(r for r in record["scores"][DATASET] if r["variant"] == "original" and r["branch"] == "ensemble")
    assert original["mIoU"]["mean"] == pytest.approx(10.0) and original["mIoU"]["std"] == pytest.approx(1.0)
    assert "| `original` | ensemble | 10.0 ± 1.0 | 11.0 ± 1.0 | 1.0 ± 0.0 | 0.5 ± 0.0 |" in text
    assert "| 2 | 0.8 | 0.5 | 20.0 |" in text  # the sweep's best cell per seed
    assert json.loads((tmp_path / "seeds.json").read_text())["claims"] == record["claims"]
    wide = write_report(tmp_path / "wide.md", tmp_path / "wide.json", DATASET, three_seeds, wide=WIDE)
    text = (tmp_path / "wide.md").read_text()
    assert "## Every score on `world-wide`" in text and "| `original` | ensemble | 6.0 ± 1.0 |" in text
    assert "| caption nouns > GT classes on the larger vocabulary (proposal masks) | Table 2 (3) vs (1), A-847 | " \
           "`world-wide` | 3.0 ± 0.0 | +3.0, +3.0, +3.0 | **holds** |" in text
    assert wide["datasets"] == [DATASET, WIDE]


def test_the_workspace_is_put_back_after_the_experiments_except_the_collected_seeds(tmp_path, monkeypatch):
    """An experiment rewrites tracked files DVC does not cache (metrics, the report); they must come back as they
    were, while what the run collected under reports/seeds/ stays."""
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    files = {"params.yaml": "seed: 0\n", "metrics/evaluate/original.json": '{"mIoU": 20.1}\n',
             "reports/report.md": "seed 0\n", "reports/seeds/runs.json": '{"wall_s": {}}\n'}
    for name, text in files.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(text)
    subprocess.run(["git", "add", "."], check=True)
    # an uncached out the run wrote that git does not track yet (a new evaluation set's plot): kept as well
    Path("plots/evaluate").mkdir(parents=True)
    Path("plots/evaluate/world-wide.csv").write_text("seed 0\n")
    Path(".gitignore").write_text("/ignored\n")
    Path("ignored").write_text("x\n")
    kept = tracked_files(exclude=Path("reports/seeds"))
    assert set(kept) == {Path(n) for n in files} - {Path("reports/seeds/runs.json")} | {
        Path("plots/evaluate/world-wide.csv"), Path(".gitignore")}
    Path("plots/evaluate/world-wide.csv").write_text("seed 2\n")

    Path("params.yaml").write_text("seed: 2\n")  # what `dvc exp run -S seed=2` leaves behind
    Path("metrics/evaluate/original.json").write_text('{"mIoU": 17.0}\n')
    Path("reports/report.md").unlink()
    Path("reports/seeds/runs.json").write_text('{"wall_s": {"2": 1000}}\n')
    restore(kept)
    for name in ("params.yaml", "metrics/evaluate/original.json", "reports/report.md"):
        assert Path(name).read_text() == files[name], name
    assert Path("plots/evaluate/world-wide.csv").read_text() == "seed 0\n"
    assert Path("reports/seeds/runs.json").read_text() == '{"wall_s": {"2": 1000}}\n'
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary left beside a restored file


def workspace(tmp_path: Path, monkeypatch, scores: str) -> None:
    """A git repository in `tmp_path` (the working directory) with params.yaml and one committed evaluation score."""
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    Path("params.yaml").write_text("seed: 0\nreport: {evaluations: metrics/evaluate, sweep: metrics/sweep.json}\n")
    Path("metrics/evaluate").mkdir(parents=True)
    Path("metrics/evaluate/mpt.json").write_text(scores)
    subprocess.run(["git", "add", "."], check=True)


def test_a_setting_for_every_seed_runs_each_as_an_experiment_and_removes_what_only_it_added(tmp_path, monkeypatch):
    """`--set` goes to every seed's `dvc exp run`, params.yaml's own seed too (a plain `dvc repro` would not apply
    it); afterwards the outputs of stages only the setting added are gone, a file the user had is not."""
    workspace(tmp_path, monkeypatch, "{}")
    Path("notes.txt").write_text("mine")  # untracked before the run: kept
    commands = []

    def fake_sh(*cmd, check=True):
        commands.append(cmd)
        if cmd[:3] == ("dvc", "exp", "run"):  # the experiment's own outputs, e.g. an ablation's evaluation
            Path("models/mpt-depth-1").mkdir(parents=True, exist_ok=True)
            Path("models/mpt-depth-1/model.pt").write_text("w")
            Path("metrics/evaluate/mpt-depth-1.json").write_text('{"seed": %d}' % len(commands))
            Path("params.yaml").write_text("seed: 9\n")

    monkeypatch.setattr(multi_seed, "sh", fake_sh)
    multi_seed.run_seeds([0, 1], Path("reports/seeds"), force=False, sets=["ablations.prompt_depths=[1,4]"])
    runs = [c for c in commands if c[:3] == ("dvc", "exp", "run")]
    assert [c[c.index("-S") + 1] for c in runs] == ["seed=0", "seed=1"]
    assert all("ablations.prompt_depths=[1,4]" in c and "--force" not in c for c in runs)  # no forced reruns
    assert ("dvc", "repro") not in commands
    assert Path("reports/seeds/seed-1/evaluate/mpt-depth-1.json").is_file()  # collected before the clean-up
    assert not Path("models").exists() and not Path("metrics/evaluate/mpt-depth-1.json").exists()
    assert Path("notes.txt").read_text() == "mine" and Path("params.yaml").read_text().startswith("seed: 0")
    assert "--set 'ablations.prompt_depths=[1,4]'" in json.loads(Path("reports/seeds/runs.json").read_text())["command"]


def test_jobs_queue_the_seeds_as_experiments_that_share_the_cores_and_read_each_from_its_commit(tmp_path, monkeypatch):
    """`--jobs 2`: params.yaml's own seed runs as `dvc repro` in the workspace; the others are queued experiments
    run two at a time, each stage at cores / 2 threads and one work unit at a time, and each finished one's scores
    are read from its experiment's commit, leaving the workspace (and seeds collected before) as they were; a
    failed one is named in the error."""
    workspace(tmp_path, monkeypatch, '{"seed": 0}')
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm"]
    subprocess.run([*commit, "base"], check=True)
    Path("reports/seeds/seed-4/evaluate").mkdir(parents=True)  # collected by an earlier run, not committed
    Path("reports/seeds/seed-4/evaluate/mpt.json").write_text('{"seed": 4}')
    Path("reports/seeds/runs.json").write_text('{"wall_s": {"1": 900, "2+4": 1500, "4": 800}}')
    commands, queued, experiments = [], [], {}

    def fake_sh(*cmd, check=True, env=None):
        commands.append((cmd, env))
        if cmd[:4] == ("dvc", "exp", "run", "--queue"):
            queued.append(cmd[cmd.index("--name") + 1])
        if cmd[:4] == ("dvc", "exp", "run", "--run-all"):  # each experiment a commit beside the workspace
            for name in queued[:-1]:  # the last one (seed-3) fails
                seed = name.removeprefix("seed-")
                subprocess.run(["git", "checkout", "-q", "-b", name], check=True)
                Path("metrics/evaluate/mpt.json").write_text('{"seed": %s}' % seed)
                Path("metrics/sweep.json").write_text('{"best_lambda": 0.%s}' % seed)
                subprocess.run(["git", "add", "metrics"], check=True)
                subprocess.run([*commit, name], check=True)
                experiments[name] = subprocess.run(["git", "rev-parse", "HEAD"], check=True, capture_output=True,
                                                   text=True).stdout.strip()
                subprocess.run(["git", "checkout", "-q", "-"], check=True)
        return 0

    monkeypatch.setattr(multi_seed, "sh", fake_sh)
    monkeypatch.setattr(multi_seed, "usable_cpus", lambda: 2)
    monkeypatch.setattr(multi_seed, "experiment_commits", lambda: experiments)
    with pytest.raises(RuntimeError, match=r"seeds \[3\] failed"):
        multi_seed.run_seeds([0, 1, 2, 3], Path("reports/seeds"), force=False, jobs=2)
    cmds = [c for c, _ in commands]
    assert cmds[0] == ("dvc", "repro")
    assert queued == ["seed-1", "seed-2", "seed-3"]
    for cmd in cmds:
        if cmd[:4] == ("dvc", "exp", "run", "--queue"):
            assert {"compute.threads=1", "prefect.max_workers=1"} <= set(cmd)
    run_all = [(c, e) for c, e in commands if c[:4] == ("dvc", "exp", "run", "--run-all")]
    assert len(run_all) == 1 and run_all[0][0][-2:] == ("--jobs", "2")
    assert run_all[0][1]["NLTK_DATA"].endswith("nltk_data") and Path(run_all[0][1]["OVSEG_STATE_DIR"]).is_absolute()
    assert not any(c[:3] in {("dvc", "exp", "apply"), ("dvc", "checkout", "--force")} for c in cmds)
    for seed in (0, 1, 2, 4):
        assert json.loads(Path(f"reports/seeds/seed-{seed}/evaluate/mpt.json").read_text()) == {"seed": seed}
    assert json.loads(Path("reports/seeds/seed-2/sweep.json").read_text()) == {"best_lambda": 0.2}
    assert not Path("reports/seeds/seed-3").exists() and not Path("reports/seeds/seed-0/sweep.json").exists()
    assert Path("params.yaml").read_text().startswith("seed: 0")  # the workspace as it was
    assert Path("metrics/evaluate/mpt.json").read_text() == '{"seed": 0}' and not Path("metrics/sweep.json").exists()
    runs = json.loads(Path("reports/seeds/runs.json").read_text())
    assert set(runs["wall_s"]) == {"0", "1+2+3", "4"} and runs["command"].endswith("--jobs 2")
