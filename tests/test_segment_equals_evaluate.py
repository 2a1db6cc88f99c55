"""`ovseg segment`'s labels are `evaluate`'s ensemble prediction (README): the CLI (ovseg_core.cli → Segmenter) and
the evaluate stage's path (BranchSegmenter.build + evaluate_branches, built as stages/evaluate builds it) on the
same images, models, λ and mask threshold, with an adapted CLIP that has mask prompts (ft-mpt's kind)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import register_six_layer_tiny_vit
from ovseg_core.cli import main
from ovseg_core.clip.adapted import AdaptedClip, load_adapted, write_adapted
from ovseg_core.clip.models import load_clip, save_clip
from ovseg_core.clip.mpt import MaskPrompts, save_prompts
from ovseg_core.datasets.prepared import PreparedDataset
from ovseg_core.evaluation import BranchSegmenter, Example, evaluate_branches
from ovseg_core.maskformer.model import load_model

IMAGES = 4
# Not the CLI's defaults, so that a CLI ignoring --lam or --threshold would differ from evaluate. The tiny random-init
# proposal net's mask probabilities all lie within 0.5 +- 0.006: at 0.45 every mask covers the whole image, no patch
# is blank and mask prompts never apply; just above 0.5 the masks are partial, so the prompts count (see below).
LAM, THRESHOLD = 0.55, 0.502


@pytest.fixture(scope="module")
def adapted(tiny_models, tmp_path_factory) -> Path:
    """An adapted-CLIP directory (as adapt_clip writes it) with non-zero mask prompts on the tiny CLIP."""
    out = tmp_path_factory.mktemp("ft-mpt")
    # The case was chosen with the 6-layer tiny ViT: with the 4-layer one's random init the prompts move no label.
    arch = register_six_layer_tiny_vit(out / "configs")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clip = load_clip(arch)
    # The random-init CLIP's cosines differ by ~1e-3, so at scale 100 p_clip is uniform and the ensemble's labels
    # would be MaskFormer's whatever the CLIP branch does; a sharper scale lets λ, threshold and prompts count.
    clip.model.logit_scale.data.fill_(math.log(3000.0))
    save_clip(clip, out / "clip.pt")
    visual = clip.model.visual
    with torch.random.fork_rng():
        torch.manual_seed(2)
        prompts = MaskPrompts.for_visual(visual, depth=len(visual.transformer.resblocks), init_std=0.5)
    save_prompts(prompts, out / "prompts.pt", arch)
    write_adapted(out, "ft-mpt", arch, out / "clip.pt", out / "prompts.pt")
    return out


def test_cli_labels_equal_evaluate_ensemble(adapted, tiny_world, tiny_models, tmp_path):
    dataset = PreparedDataset.load(tiny_world.eval)
    images = [str(dataset.image_path(i)) for i in range(IMAGES)]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(dataset.classes) + "\n")
    out = tmp_path / "cli"
    assert main(["segment", *images, "--classes-file", str(classes), "--maskformer", str(tiny_models.proposal_net),
                 "--clip", str(adapted), "--lam", str(LAM), "--threshold", str(THRESHOLD), "--out", str(out),
                 "--device", "cpu", "--precision", "fp32"]) == 0

    def evaluate(clip: AdaptedClip) -> list[Example]:
        segmenter = BranchSegmenter.build(load_model(tiny_models.proposal_net)[0], clip, dataset.classes, THRESHOLD)
        return evaluate_branches(segmenter, dataset, LAM, indices=range(IMAGES), keep_examples=IMAGES).examples

    with_prompts = load_adapted(adapted)
    examples = evaluate(with_prompts)
    assert len(examples) == IMAGES
    # The case must tell a CLI that dropped the mask prompts from one that kept them: without its prompts the
    # same CLIP labels a good share of the pixels otherwise (measured: 25 %), far above the rounding allowed below.
    without = evaluate(replace(with_prompts, prompts=None))
    changed = np.mean([(a.predictions["ensemble"] != b.predictions["ensemble"]).mean() for a, b in zip(examples, without)])
    print(f"pixels the prompts change: {100 * changed:.1f} %")
    assert changed >= 0.05
    for example in examples:
        stem = Path(dataset.image_path(example.index)).stem
        cli = np.asarray(Image.open(out / f"{stem}.labels.png"), dtype=np.int64)
        expected = example.predictions["ensemble"]
        assert cli.shape == expected.shape
        assert (cli == expected).mean() >= 0.999, stem  # float rounding may flip a near-tied pixel, no more
