import json
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from ovseg_core.clip.models import load_clip, save_clip
from ovseg_core.clip.train import ClipTrainConfig, DedupClipLoss, train_clip
from ovseg_core.errors import DataError

torch.set_num_threads(1)

NOUNS = ["cat", "dog", "teapot", "grass", "sky"]


class SyntheticPairs:
    """Masked 64 px crops with nouns (repeated, as in mined data)."""

    def __init__(self, n: int = 24, with_masks: bool = True, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 64, 64, generator=g)
        self.masks = torch.zeros(n, 64, 64, dtype=torch.bool)
        for i in range(n):
            y, x = torch.randint(0, 40, (2,), generator=g).tolist()
            self.masks[i, y : y + 24, x : x + 20] = True
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.images)

    def text(self, i: int) -> str:
        return NOUNS[i % len(NOUNS)]

    def __getitem__(self, i: int):
        mask = self.masks[i]
        return self.images[i] * mask, (mask if self.with_masks else None), self.text(i)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """Initial CLIP weights on disk, so every run (a 'new process') starts from the same file."""
    torch.manual_seed(0)
    return save_clip(load_clip("ovseg-tiny-vit"), tmp_path_factory.mktemp("init") / "clip.pt")


def config(mode: str, **kw) -> ClipTrainConfig:
    base = dict(mode=mode, steps=4, batch_size=8, lr=1e-3, weight_decay=0.1, warmup_steps=1, checkpoint_every=2)
    return ClipTrainConfig(**{**base, **kw})


def is_text_tower(name: str) -> bool:
    return not name.startswith("visual.") and name != "logit_scale"


def test_ft_changes_image_tower_only(initial, tmp_path):
    bundle = load_clip("ovseg-tiny-vit", pretrained=initial)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    result = train_clip(bundle, SyntheticPairs(), config("ft", steps=3), tmp_path / "ckpt")
    after = bundle.model.state_dict()
    text_keys = [k for k in before if is_text_tower(k)]
    assert "token_embedding.weight" in text_keys and "text_projection" in text_keys
    assert all(torch.equal(before[k], after[k]) for k in text_keys)
    changed = [k for k in before if k.startswith("visual.") and not torch.equal(before[k], after[k])]
    assert "visual.conv1.weight" in changed and "visual.proj" in changed
    visual_params = sum(p.numel() for p in bundle.model.visual.parameters())
    assert result.trainable_params == visual_params + 1  # + the logit scale
    assert result.finished and [row["step"] for row in result.log] == [1, 2, 3]


def test_mpt_changes_prompts_only(initial, tmp_path):
    bundle = load_clip("ovseg-tiny-vit", pretrained=initial)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    result = train_clip(bundle, SyntheticPairs(), config("mpt", steps=3, lr=2e-2, weight_decay=0.0), tmp_path / "ckpt")
    after = bundle.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.trainable_params == 3 * 64 * bundle.model.visual.transformer.width  # depth × patches × width
    assert result.prompts is not None and result.prompts.mask_embedding.abs().sum() > 0
    assert all(math.isfinite(row["loss"]) for row in result.log)


@pytest.mark.parametrize("mode", ["pretrain", "mpt"])
def test_killed_and_resumed_run_equals_uninterrupted_run(initial, tmp_path, mode):
    cfg = config(mode)
    whole = load_clip("ovseg-tiny-vit", pretrained=initial)
    uninterrupted = train_clip(whole, SyntheticPairs(), cfg, tmp_path / "a", log_path=tmp_path / "a.json")

    first = load_clip("ovseg-tiny-vit", pretrained=initial)
    killed = train_clip(first, SyntheticPairs(), cfg, tmp_path / "b", stop_after=2)
    assert (killed.step, killed.finished) == (2, False)
    fresh = load_clip("ovseg-tiny-vit", pretrained=initial)  # the restarted process
    resumed = train_clip(fresh, SyntheticPairs(), cfg, tmp_path / "b", log_path=tmp_path / "b.json")
    assert resumed.finished and resumed.step == 4

    # exact equality: same batches (batch_order), same LR (stateless schedule), restored optimizer and RNG
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in uninterrupted.log]
    if mode == "mpt":
        assert torch.equal(resumed.prompts.mask_embedding, uninterrupted.prompts.mask_embedding)
    else:
        a, b = whole.model.state_dict(), fresh.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        start = load_clip("ovseg-tiny-vit", pretrained=initial).model.state_dict()
        assert not torch.equal(a["visual.conv1.weight"], start["visual.conv1.weight"])
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    assert [r["step"] for r in json.loads((tmp_path / "b.json").read_text())] == [1, 2, 3, 4]


def test_resume_with_another_config_is_refused(initial, tmp_path):
    bundle = load_clip("ovseg-tiny-vit", pretrained=initial)
    train_clip(bundle, SyntheticPairs(), config("mpt"), tmp_path / "ckpt", stop_after=2)
    with pytest.raises(DataError, match="different config"):
        train_clip(bundle, SyntheticPairs(), config("mpt", lr=0.5), tmp_path / "ckpt")


def test_mpt_needs_masks(initial, tmp_path):
    bundle = load_clip("ovseg-tiny-vit", pretrained=initial)
    with pytest.raises(ValueError, match="needs samples with masks"):
        train_clip(bundle, SyntheticPairs(with_masks=False), config("mpt"), tmp_path / "ckpt")


def test_dedup_loss_is_clip_loss_for_distinct_texts():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    expected = ClipLoss()(image, text, scale)
    assert torch.allclose(DedupClipLoss()(image, text, scale, torch.arange(6)), expected, atol=1e-6)


def test_dedup_loss_does_not_punish_a_noun_as_its_own_negative():
    # three images, two of them of the same noun; each image matches its noun's text exactly
    nouns = F.normalize(torch.eye(2, 16), dim=-1)
    image = nouns[[0, 0, 1]]
    scale = torch.tensor(100.0)
    deduped = DedupClipLoss()(image, nouns, scale, torch.tensor([0, 0, 1]))
    naive = ClipLoss()(image, nouns[[0, 0, 1]], scale)  # the duplicate text becomes a "negative"
    assert deduped < 1e-6
    assert naive > 0.3
    # and the gradient at this optimum is zero: nothing pushes the two images of one noun apart
    image = image.clone().requires_grad_(True)
    DedupClipLoss()(image, nouns, scale, torch.tensor([0, 0, 1])).backward()
    assert image.grad.abs().max() < 1e-6


def test_fixed_logit_scale(initial, tmp_path):
    bundle = load_clip("ovseg-tiny-vit", pretrained=initial)
    cfg = config("pretrain", steps=2, init_logit_scale=50.0, learn_logit_scale=False)
    result = train_clip(bundle, SyntheticPairs(), cfg, tmp_path / "ckpt")
    assert bundle.model.logit_scale.item() == pytest.approx(math.log(50.0))
    assert result.trainable_params == sum(p.numel() for p in bundle.model.parameters()) - 1
