"""The adapt_clip stage itself (in-process, as `python -m stages.adapt_clip --variant V` runs it, on the tiny mined
pairs): how a variant's settings are merged, FT→MPT chaining, the refusal of an init that already has prompts, and
which settings make a rerun start afresh instead of resuming."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ovseg_core.clip.adapted import load_adapted, weights_file
from ovseg_core.clip.models import load_clip
from ovseg_core.clip.pairs import MinedPairSamples
from ovseg_core.clip.train import ClipTrainConfig, train_clip
from stages.adapt_clip import TRAIN_KEYS
from stages.common import StageContext, depth_variant, run_stage, variant_depth
from test_reproducible_outs import adapt_setup


def run(params: dict, variant: str) -> dict:
    threads = torch.get_num_threads()
    try:
        return run_stage("adapt_clip", StageContext("adapt_clip", copy.deepcopy(params), variant))
    finally:
        torch.set_num_threads(threads)  # the stage sets its own thread count


@pytest.fixture
def params(tiny_mined, tiny_models, tiny_world, tmp_path, monkeypatch):
    """ft, mpt and ft-mpt (mpt from ft's output) as in params.yaml, 8 steps each; the working dir is tmp_path."""
    monkeypatch.chdir(tmp_path)
    p, _, _ = adapt_setup("ft", tiny_mined, tiny_models, tiny_world)
    variants = p["adapt_clip"]["variants"]
    variants["mpt"] = {**variants["ft"], "mode": "mpt"}
    variants["ft-mpt"] = {**variants["mpt"], "init": "out/ft"}
    return p


def test_variant_settings_are_common_then_mode_then_variant():
    section = {"common": {"steps": 5, "lr": 1.0, "seed": 3},
               "modes": {"ft": {"mode": "ft", "lr": 2.0, "warmup_steps": 4}, "mpt": {"mode": "mpt", "lr": 9.0}},
               "variants": {"mine": {"mode": "ft", "lr": 0.5, "init": "x.pt"}, "plain": {"mode": "ft"},
                            "bad": {"mode": "sgd"}}}
    ctx = StageContext("adapt_clip", {"adapt_clip": section}, "mine")
    assert ctx.variant_params("adapt_clip") == ("mine", {"steps": 5, "seed": 3, "lr": 0.5, "warmup_steps": 4,
                                                         "mode": "ft", "init": "x.pt"})
    assert StageContext("adapt_clip", {"adapt_clip": section}, "plain").variant_params("adapt_clip")[1]["lr"] == 2.0
    with pytest.raises(KeyError, match="must be one of"):
        StageContext("adapt_clip", {"adapt_clip": section}, "bad").variant_params("adapt_clip")
    with pytest.raises(KeyError, match="no 'nope'"):
        StageContext("adapt_clip", {"adapt_clip": section}, "nope").variant_params("adapt_clip")


def test_the_prompt_depth_ablation_adds_the_mpt_variant_at_each_listed_depth():
    adapt = {"out": "models/adapt_clip", "common": {"steps": 5}, "modes": {"mpt": {"mode": "mpt", "lr": 9.0}},
             "variants": {"mpt": {"mode": "mpt", "prompt_depth": 3, "init": "clip.pt", "pairs": "p"}}}
    evaluate = {"common": {"lambda": 0.7}, "variants": {"mpt": {"clip": "models/adapt_clip/mpt", "weights": "clip.pt"}}}
    params = {"adapt_clip": adapt, "evaluate": evaluate, "ablations": {"prompt_depths": [1, 6]}}
    assert StageContext("adapt_clip", params, "mpt-depth-6").variant_params("adapt_clip") == (
        "mpt-depth-6", {"steps": 5, "lr": 9.0, "mode": "mpt", "prompt_depth": 6, "init": "clip.pt", "pairs": "p"})
    assert StageContext("evaluate", params, "mpt-depth-1").variant_params("evaluate") == (
        "mpt-depth-1", {"lambda": 0.7, "clip": "models/adapt_clip/mpt-depth-1", "weights": "clip.pt"})
    with pytest.raises(KeyError, match="no 'mpt-depth-2'"):  # only the listed depths
        StageContext("adapt_clip", params, "mpt-depth-2").variant_params("adapt_clip")
    assert adapt["variants"].keys() == {"mpt"}  # the params themselves are left as they are
    with pytest.raises(KeyError, match="no 'mpt-depth-1'"):  # switched off: none
        StageContext("adapt_clip", {**params, "ablations": {"prompt_depths": []}}, "mpt-depth-1").variant_params(
            "adapt_clip")
    assert [variant_depth(depth_variant(d)) for d in (1, 12)] == [1, 12]  # the name and its depth, both ways
    assert [variant_depth(v) for v in ("mpt", "ft-mpt", "mpt-depth-", "mpt-depth-x")] == [None] * 4



def test_the_gt_masks_ablation_adds_table2s_pairs_and_ft_on_them():
    mine = {"common": {"top_proposals": 16}, "variants": {"proposals-nouns": {"masks": "proposals"}},
            "ablation_variants": {"gt-nouns": {"masks": "gt", "categories": "nouns"},
                                  "gt-classes": {"masks": "gt", "categories": "gt_classes"}}}
    adapt = {"out": "models/adapt_clip", "common": {"steps": 5}, "modes": {"ft": {"mode": "ft", "lr": 0.1}},
             "variants": {"ft": {"mode": "ft", "init": "clip.pt", "pairs": "proposals-nouns"}}}
    evaluate = {"common": {"lambda": 0.7}, "variants": {"ft": {"clip": "models/adapt_clip/ft", "weights": "w"}}}
    params = {"mine": mine, "adapt_clip": adapt, "evaluate": evaluate, "ablations": {"gt_masks": ["classes"]}}
    assert StageContext("mine", params, "gt-classes").variant_params("mine") == (
        "gt-classes", {"top_proposals": 16, "masks": "gt", "categories": "gt_classes"})
    assert StageContext("adapt_clip", params, "ft-gt-classes").variant_params("adapt_clip") == (
        "ft-gt-classes", {"steps": 5, "lr": 0.1, "mode": "ft", "init": "clip.pt", "pairs": "gt-classes"})
    assert StageContext("evaluate", params, "ft-gt-classes").variant_params("evaluate") == (
        "ft-gt-classes", {"lambda": 0.7, "clip": "models/adapt_clip/ft-gt-classes",
                          "weights": "models/adapt_clip/ft-gt-classes"})
    for stage, variant in (("mine", "gt-nouns"), ("adapt_clip", "ft-gt-nouns"), ("evaluate", "ft-gt-nouns")):
        with pytest.raises(KeyError, match=f"no '{variant}'"):  # only the listed labellings
            StageContext(stage, params, variant).variant_params(stage)
    with pytest.raises(KeyError, match="ablations.gt_masks: no mine.ablation_variants.gt-boxes"):
        StageContext("mine", {**params, "ablations": {"gt_masks": ["boxes"]}}, "gt-boxes").variant_params("mine")

def test_ft_then_mpt_trains_prompts_on_the_fine_tuned_weights(params, tiny_models, tiny_mined):
    run(params, "ft")
    summary = run(params, "ft-mpt")
    ft, ft_mpt = load_adapted("out/ft"), load_adapted("out/ft-mpt")
    assert weights_file("out/ft-mpt") == weights_file("out/ft") == Path("out/ft/clip.pt").resolve()
    original = load_clip(tiny_models.clip_arch, pretrained=str(tiny_models.clip)).model.state_dict()
    ft_weights, chained = ft.bundle.model.state_dict(), ft_mpt.bundle.model.state_dict()
    assert all(torch.equal(ft_weights[k], chained[k]) for k in ft_weights)
    assert not torch.equal(ft_weights["visual.conv1.weight"], original["visual.conv1.weight"])
    assert ft.prompts is None and ft_mpt.prompts is not None

    # An independent run: the same MPT on FT's weights, straight through train_clip, gives the stage's prompts
    # bit for bit; from the original weights it does not. So the stage trained the prompts on FT's CLIP.
    ctx = StageContext("adapt_clip", params, "ft-mpt")
    _, settings = ctx.variant_params("adapt_clip")
    config = ClipTrainConfig(**{k: v for k, v in settings.items() if k in TRAIN_KEYS})

    def prompts_from(weights: Path, name: str) -> torch.Tensor:
        bundle = load_clip(tiny_models.clip_arch, pretrained=str(weights))
        samples = MinedPairSamples(Path(tiny_mined.out), bundle.image_size, bundle.mean, bundle.std)
        torch.set_num_threads(1)
        return train_clip(bundle, samples, config, Path(name), compute=ctx.compute).prompts.mask_embedding.detach()

    stage_prompts = ft_mpt.prompts.mask_embedding.detach()
    assert torch.equal(prompts_from(Path("out/ft/clip.pt"), "check-ft"), stage_prompts)
    assert not torch.allclose(prompts_from(tiny_models.clip, "check-original"), stage_prompts, atol=1e-4)
    # what the stage reports: the training it did and the probe of held-out masked regions
    assert summary["mode"] == "mpt" and summary["steps"] == 8 and summary["pairs"] == tiny_mined.summary["pairs"]
    assert summary["probe_regions"] > 0 and 0 <= summary["masked_acc"] <= 100
    assert json.loads(Path("metrics/ft-mpt.json").read_text()) == {
        k: summary[k] for k in ("final_loss", "masked_acc", "masked_acc_unseen")}


def test_an_init_that_already_has_prompts_is_refused(params):
    run(params, "mpt")
    params["adapt_clip"]["variants"]["mpt-again"] = {**params["adapt_clip"]["variants"]["mpt"], "init": "out/mpt"}
    with pytest.raises(ValueError, match="already has mask prompts"):
        run(params, "mpt-again")
    assert not Path("out/mpt-again").exists()


def test_a_rerun_resumes_only_the_same_experiment(params):
    first = run(params, "ft")
    assert first["resumed_from_step"] == 0
    assert run(params, "ft")["resumed_from_step"] == 8  # same settings: the finished checkpoint is resumed
    reference = Path("out/ft/clip.pt").read_bytes()
    changed = copy.deepcopy(params)
    changed["adapt_clip"]["modes"]["ft"]["lr"] = 3e-4  # another experiment: it must not resume the old one
    assert run(changed, "ft")["resumed_from_step"] == 0
    assert Path("out/ft/clip.pt").read_bytes() != reference
    assert run(params, "ft")["resumed_from_step"] == 0  # and back: the old state was replaced, not mixed in
    assert Path("out/ft/clip.pt").read_bytes() == reference
    reseeded = {**params, "seed": 1}  # the run seed (`dvc exp run -S seed=1`): other random draws, a new run
    assert run(reseeded, "ft")["resumed_from_step"] == 0
    assert Path("out/ft/clip.pt").read_bytes() != reference
