"""The report stage renders from hand-written evaluation results, some variants and inputs missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.common import StageContext
from stages.report import run

CLASSES = ["ball", "cup", "pizza", "sky"]


def scores(miou: float, seen: float, unseen: float | None, hiou: float | None) -> dict:
    return {"mIoU": miou, "fwIoU": miou + 5, "pACC": miou + 10, "mACC": miou + 1, "seen_mIoU": seen,
            "unseen_mIoU": unseen, "hIoU": hiou, "images_per_s": 40.0}


def evaluation(ens: float, mf: float = 10.0, clip: float = 8.0, hiou: float | None = 9.5) -> dict:
    return {"world-eval": {"maskformer": scores(mf, 14.0, 2.0, 3.5), "clip": scores(clip, 9.0, 7.0, 7.9),
                           "ensemble": scores(ens, ens + 2, ens - 4, hiou), "images_per_s": 30.0}}


def write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data))


def write_predictions(variant: str, shift: int) -> None:
    """Two examples in the evaluate stage's layout (eval/<variant>/<dataset>/)."""
    root = Path("eval") / variant / "world-eval"
    samples = []
    rng = np.random.default_rng(0)
    for i in range(2):
        sub = root / f"{i:05d}"
        sub.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(sub / "image.png")
        gt = np.zeros((64, 64), np.uint8)
        gt[20:40, 20:40] = 2
        gt[:3] = 255
        Image.fromarray(gt).save(sub / "gt.png")
        preds = {}
        for b in ("maskformer", "clip", "ensemble"):
            Image.fromarray(((gt.astype(int) % 255 + shift) % 4).astype(np.uint8)).save(sub / f"{b}.png")
            preds[b] = f"{i:05d}/{b}.png"
        samples.append({"index": i, "id": f"img{i}", "image": f"{i:05d}/image.png", "label": f"{i:05d}/gt.png",
                        "predictions": preds})
    write_json(str(root / "index.json"), {"dataset": "world-eval", "classes": CLASSES, "seen": [1, 1, 0, 1],
                                          "ignore_label": 255, "lambda": 0.7, "samples": samples})


SETTINGS = {
    "title": "Test report",
    "evaluations": "metrics/evaluate",
    "predictions": "eval",
    "datasets": ["world-eval"],
    "clip_arch": "ovseg-tiny-vit",
    "headline": {"main": "ft-mpt", "baseline": "original"},
    "tables": {
        "table2": {"baseline": {"variant": "original"},
                   "(1)": {"variant": "ft-gt-classes", "mine": "gt-classes"},
                   "(2)": {"variant": "ft-gt-nouns", "mine": "gt-nouns"},
                   "(3)": {"variant": "ft", "mine": "proposals-nouns"}},
        "table3": {"baseline": "original", "(a)": "mpt", "(b)": "ft", "(c)": "ft-mpt"},
        "table5": {"w/o FT": {1: "mpt-depth1", 3: "mpt", 6: "mpt-depth6"}},
        "table6": {"baseline": "original", "OVSeg": "ft-mpt"},
    },
    "qualitative": {"dataset": "world-eval", "images": 2,
                    "rows": [{"variant": "original", "branch": "ensemble"},
                             {"variant": "ft-mpt", "branch": "ensemble"}]},
    "sweep": "metrics/sweep.json",
    "sweep_heatmap": "plots/sweep/heatmap.png",
    "inputs": {"pretrain_clip": "metrics/pretrain_clip.json", "train_maskformer": "metrics/train_maskformer.json",
               "mine": "metrics/mine"},
    "out": "reports/report.md",
    "figure": "reports/figures/qualitative.png",
}


class Recorder(StageContext):
    def __init__(self, params):
        super().__init__("report", params)
        self.tables = {}

    def publish_table(self, key, rows, description=""):
        self.tables[key] = rows


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_json("metrics/evaluate/original.json", evaluation(12.0, clip=6.0))
    write_json("metrics/evaluate/ft-mpt.json", evaluation(21.25, clip=17.0, hiou=None))
    write_json("metrics/evaluate/mpt.json", evaluation(15.0))
    write_json("metrics/evaluate/ft.json", evaluation(18.0))
    write_json("metrics/mine/proposals-nouns.json", {"pairs": 1234, "unique_nouns": 30, "images": 500})
    write_json("metrics/pretrain_clip.json", {"zero_shot": {"scene_acc": 0.41}, "steps": 900})
    write_predictions("original", 1)
    write_predictions("ft-mpt", 0)
    return tmp_path


def test_report_renders_headline_tables_and_figure(repo):
    ctx = Recorder({"report": SETTINGS})
    summary = run(ctx)
    text = Path("reports/report.md").read_text()
    lines = text.splitlines()

    first_table = lines.index(next(line for line in lines if line.startswith("|")))
    assert lines[first_table - 2] == "## Headline"
    header, _, ovseg, baseline, mf_only = lines[first_table:first_table + 5]
    assert header == "| system | world-eval mIoU | world-eval hIoU | paper A-150 mIoU |"
    assert ovseg.endswith("| 21.2 | – | 29.6 |")  # hIoU undefined → "–"
    assert "`original`" in baseline and baseline.endswith("| 12.0 | 9.5 | 21.8 |")
    assert mf_only.startswith("| MaskFormer only | 10.0 | 3.5 |")
    assert ctx.tables["headline"][0]["world-eval mIoU"] == "21.2"

    def row(prefix: str) -> str:
        return next(line for line in lines if line.startswith(prefix))

    # Table 2: missing variants "not run", Δ to the baseline, mined statistics, the paper beside
    assert row("| (1) | GT | GT classes | `ft-gt-classes` |").count("not run") == 4
    assert row("| (3) | proposals |").startswith(
        "| (3) | proposals | 1 caption | `ft` | 1234 | 30 | 18.0 (+6.0) | 20.0 | 14.0 | 9.5 | 440K | 12K | 8.8 (+1.5) "
        "| 28.8 (+7.0) | 55.7 (+4.3) |")
    # Table 3 and 6
    assert row("| (c) | ✓ | ✓ | `ft-mpt` |") == \
        "| (c) | ✓ | ✓ | `ft-mpt` | 21.2 (+9.2) | 9.0 (+1.7) | 29.6 (+7.8) | 55.7 (+4.3) |"
    assert row("| (a) | ✓ |  | `mpt` | 15.0 (+3.0) |")
    assert row("| OVSeg | `ft-mpt` |") == "| OVSeg | `ft-mpt` | 10.0 | 17.0 | 21.2 | 19.6 | 25.1 | 29.6 |"
    # Table 5: depth 12 does not exist in a 4-layer ViT; depth 1 was not run
    assert "n/a (ViT has 4 layers)" in row("| 12 |")
    assert row("| 1 |") == "| 1 | not run (`mpt-depth1`) | 25.7 | 29.3 |"
    assert row("| 3 (default) |") == "| 3 (default) | 15.0 (`mpt`) | 26.5 | 29.6 |"
    # what is missing is listed; what exists is reported
    missing = text[text.index("## Missing inputs"):text.index("## Table 2")]
    for name in ("ft-gt-classes.json", "ft-gt-nouns.json", "mpt-depth1.json", "mpt-depth6.json",
                 "metrics/train_maskformer.json", "metrics/sweep.json"):
        assert name in missing
    assert "ft-mpt.json" not in missing and "pretrain_clip" not in missing
    assert "| zero_shot/scene_acc | 0.41 |" in text and "| `proposals-nouns` | 1234 | 30 | 500 |" in text
    assert "λ = 0.7 on world-eval" in text
    assert "![qualitative results](figures/qualitative.png)" in text
    assert summary == {"variants_evaluated": 4, "missing_inputs": 6}

    with Image.open("reports/figures/qualitative.png") as im:
        assert im.format == "PNG" and im.height > 4 * 256  # 2 images × 2 variants, enlarged panels


def test_the_prompt_depth_ablation_fills_table5(repo):
    """`ablations.prompt_depths` adds its variants to Table 5 (MPT w/o FT) without a line in the report's tables."""
    write_json("metrics/evaluate/mpt-depth-1.json", evaluation(13.0))
    settings = {**SETTINGS, "tables": {**SETTINGS["tables"], "table5": {"w/o FT": {3: "mpt"}}}}
    run(Recorder({"report": settings, "ablations": {"prompt_depths": [1, 4]}}))
    text = Path("reports/report.md").read_text()
    row = {line.split(" |")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert row["| 1"] == "| 1 | 13.0 (`mpt-depth-1`) | 25.7 | 29.3 |"
    # a depth the paper did not run (all 4 layers of ours) gets its own row, without paper numbers
    assert row["| 4"] == "| 4 | not run (`mpt-depth-4`) | – | – |" and "mpt-depth-4.json" in text
    assert list(row).index("| 4") == list(row).index("| 3 (default)") + 1
    assert row["| 3 (default)"] == "| 3 (default) | 15.0 (`mpt`) | 26.5 | 29.6 |"
    assert settings["tables"]["table5"] == {"w/o FT": {3: "mpt"}}


def test_table2_rows_on_ground_truth_masks_follow_their_ablation(repo):
    """Table 2's rows whose pairs only `ablations.gt_masks` mines are left out, with a note and not as missing
    inputs, until that setting lists them."""
    mine = {"ablation_variants": {"gt-nouns": {"masks": "gt", "categories": "nouns"},
                                  "gt-classes": {"masks": "gt", "categories": "gt_classes"}}}
    write_json("metrics/evaluate/ft-gt-classes.json", evaluation(16.0))
    run(Recorder({"report": SETTINGS, "mine": mine, "ablations": {"gt_masks": []}}))
    text = Path("reports/report.md").read_text()
    table2 = text[text.index("## Table 2"):text.index("## Table 3")]
    assert "| (1) |" not in table2 and "| (2) |" not in table2 and "| (3) | proposals |" in table2
    assert "Rows (1), (2) (ground-truth masks) are an ablation this run leaves out" in table2
    assert "ablations.gt_masks=[classes,nouns]" in table2
    assert "ft-gt-nouns.json" not in text[text.index("## Missing inputs"):text.index("## Table 2")]

    run(Recorder({"report": SETTINGS, "mine": mine, "ablations": {"gt_masks": ["classes"]}}))
    text = Path("reports/report.md").read_text()
    table2 = text[text.index("## Table 2"):text.index("## Table 3")]
    assert "| (1) | GT | GT classes | `ft-gt-classes` |" in table2 and "16.0 (+4.0)" in table2
    assert "| (2) |" not in table2 and "Rows (2) (ground-truth masks)" in table2


def test_report_without_any_evaluation_still_renders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(Recorder({"report": SETTINGS}))
    text = Path("reports/report.md").read_text()
    assert "Variants evaluated: none" in text and text.count("not run") > 10
    assert "No predictions were available" in text and Path("reports/figures/qualitative.png").is_file()


def test_unknown_paper_case_is_a_clear_error(repo):
    settings = {**SETTINGS, "tables": {"table3": {"baseline": "original", "(z)": "mpt"}}}
    with pytest.raises(KeyError, match=r"report.tables.table3: '\(z\)' is not a case"):
        run(Recorder({"report": settings}))


def test_the_headline_gives_the_sampling_noise_of_ovsegs_miou(repo):
    ft_mpt = evaluation(21.25, clip=17.0)
    ft_mpt["world-eval"]["ensemble"].update(mIoU_se=1.5, images=150)
    write_json("metrics/evaluate/ft-mpt.json", ft_mpt)
    run(Recorder({"report": SETTINGS}))
    text = Path("reports/report.md").read_text()
    headline = text[text.index("## Headline"):text.index("## ", text.index("## Headline") + 3)]
    # 150 images x (1.5 / 0.5)^2 = 1,350 images for a standard error of 0.5
    assert "world-eval: ±1.50 over 150 images (under 0.5 would take ~1,350 images)" in headline
    ft_mpt["world-eval"]["ensemble"].update(mIoU_se=0.475, images=700)  # under 0.5 already: says so
    write_json("metrics/evaluate/ft-mpt.json", ft_mpt)
    run(Recorder({"report": SETTINGS}))
    assert "world-eval: ±0.47 over 700 images (under 0.5)" in Path("reports/report.md").read_text()


def test_no_sampling_noise_line_without_standard_errors(repo):
    run(Recorder({"report": SETTINGS}))
    assert "Sampling noise" not in Path("reports/report.md").read_text()


def test_the_report_stage_runs_without_torch_and_reads_vit_depths_from_open_clips_configs(tmp_path):
    """The report only reads results: its start-up must not import torch or open_clip (~8 s on a 2-core machine).
    The ViT depth of Table 5 comes from the architecture's config file, ours or open_clip's own (ViT-L/14: 24)."""
    script = (
        "import sys, stages.report as r\n"
        "class Settings: pass\n"
        "depth = {}\n"
        "for arch in ('ovseg-tiny-vit', 'ViT-L-14', 'no-such-arch'):\n"
        "    s = Settings(); s.s = {'clip_arch': arch}\n"
        "    depth[arch] = r.Report._vision_layers(s)\n"
        "print(depth, sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)},
                         capture_output=True, text=True, check=True).stdout.strip()
    config = json.loads((repo / "ovseg_core/model_configs/ovseg-tiny-vit.json").read_text())
    assert out == f"{{'ovseg-tiny-vit': {config['vision_cfg']['layers']}, 'ViT-L-14': 24, 'no-such-arch': None}} []"
