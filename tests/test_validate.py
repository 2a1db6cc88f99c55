"""Up-front validation of a params file (`python -m stages.validate`, also run by `flows.pipeline`
before any stage starts): the paper recipe on a machine without its data and weights fails with ONE
error that lists every missing item; the embedded recipe needs nothing from outside."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from stages.common import load_params
from stages.validate import check

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper-swinb-vitl14.yaml"


def test_paper_recipe_without_data_or_weights_lists_everything_missing_at_once(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", NLTK_DATA=str(tmp_path / "nltk"))
    proc = subprocess.run([sys.executable, "-m", "stages.validate", "--use", str(PAPER)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    err = proc.stderr
    assert err.count("this run cannot start") == 1  # one error, not the first problem only
    recipe = yaml.safe_load(PAPER.read_text())
    roots = [recipe["prepare"]["train"]["root"]] + [e["root"] for e in recipe["prepare"]["eval"].values()]
    for root in roots:
        assert f"dataset root {root} not found" in err
    assert "pretrain_clip.pretrained" in err and "ViT-L-14" in err
    assert recipe["train_maskformer"]["backbone_weights"] in err
    assert not (tmp_path / "params.yaml").exists(), "an invalid recipe must not replace params.yaml"


def test_embedded_recipe_needs_nothing_from_outside(monkeypatch):
    monkeypatch.chdir(REPO)  # params paths are relative to the repository root, as under dvc repro
    assert check(load_params(REPO / "params.yaml")) == []


def test_missing_dataset_roots_mask_files_and_an_unknown_reader_are_all_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml")
    params["prepare"]["eval"]["world-eval"] = {"reader": "ade20k-150", "root": "nowhere/ade", "split": "validation"}
    params["prepare"]["eval"]["world-val"]["reader"] = "ade-typo"
    params["prepare"]["captioned"] = {"my-photos": {"reader": "caption-folder", "root": "nowhere/photos"}}
    params["mine"]["variants"]["sam-nouns"] = {"masks": "file", "mask_file": "nowhere/sam.json", "categories": "nouns"}
    problems = check(params)
    assert any("prepare.captioned.my-photos" in p and "nowhere/photos" in p for p in problems)
    assert any("mine.variants.sam-nouns.mask_file" in p and "nowhere/sam.json" in p for p in problems)
    assert any("prepare.eval.world-eval" in p and "nowhere/ade" in p for p in problems)
    assert any("prepare.eval.world-val.reader" in p and "ade-typo" in p for p in problems)


def test_sets_outside_the_folders_dvc_tracks_for_their_stage_are_reported(monkeypatch):
    monkeypatch.chdir(REPO)
    params = load_params(REPO / "params.yaml")
    assert check(params) == []
    params["train_maskformer"]["heldout"] = ["data/prepared/eval/world-eval", "data/prepared/world-val"]
    params["evaluate"]["common"]["datasets"]["world-eval"]["root"] = "data/elsewhere/world-eval"
    problems = check(params)
    assert len(problems) == 2
    assert "train_maskformer.heldout: data/prepared/world-val" in problems[0] and "data/prepared/eval" in problems[0]
    assert "evaluate.common.datasets.world-eval.root: data/elsewhere/world-eval" in problems[1]


def test_the_embedded_recipe_is_validated_without_importing_open_clip():
    """open_clip is needed only to resolve pretrained CLIP weights, which the embedded recipe does not ask for; its
    import was half of the check's 11 s, paid by every `flows.pipeline` run."""
    code = ("import sys\nfrom stages.common import load_params\nfrom stages.validate import check\n"
            "print(check(load_params('params.yaml')), 'open_clip' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["[]", "False"]
