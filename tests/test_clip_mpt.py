import pytest
import torch

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.mpt import MaskPromptedViT, MaskPrompts, encode_masked, load_prompts, patch_mask, save_prompts
from ovseg_core.errors import DataError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_clip("ovseg-tiny-vit")


def images_and_masks(n: int = 3, size: int = 64):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 8:40, 16:30] = True  # patches of 8 px: rows 1-4, cols 2-3 are foreground
    images = images * masks[:, None]  # masked crops: background is 0 after normalisation
    return images, masks


def test_zero_prompts_and_full_masks_equal_plain_clip(bundle):
    images, _ = images_and_masks()
    full = torch.ones(3, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        plain = bundle.model.encode_image(images, normalize=True)
        for depth in (1, 3, 4):
            prompts = MaskPrompts.for_visual(bundle.model.visual, depth)
            assert torch.equal(encode_masked(bundle, images, full, prompts), plain)
        assert torch.equal(encode_masked(bundle, images), plain)


def test_nonzero_prompts_change_features_only_with_background(bundle):
    images, masks = images_and_masks()
    prompts = MaskPrompts.for_visual(bundle.model.visual, 3, init_std=0.5)
    full = torch.ones_like(masks)
    with torch.no_grad():
        plain = bundle.model.encode_image(images, normalize=True)
        assert torch.equal(encode_masked(bundle, images, full, prompts), plain)
        assert not torch.allclose(encode_masked(bundle, images, masks, prompts), plain, atol=1e-3)


def test_patch_mask_rule():
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 9, 2] = True  # one pixel in patch (row 1, col 0)
    masks[1, 0:8, 8:16] = True  # exactly patch (0, 1)
    masks[1, 15, 15] = True  # plus one corner pixel of patch (1, 1)
    got = patch_mask(masks, (8, 8))
    assert got.tolist() == [[0, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]]
    probs = torch.zeros(1, 16, 16)
    probs[0, 3, 3] = 0.01  # any non-zero pixel makes the patch foreground
    assert patch_mask(probs, (8, 8)).tolist() == [[1, 0, 0, 0]]


def test_deep_prompts_replace_background_tokens_at_chosen_layers(bundle):
    visual = bundle.model.visual
    depth = 3
    prompts = MaskPrompts.for_visual(visual, depth, init_std=1.0)
    images, masks = images_and_masks()
    background = patch_mask(masks, visual.patch_size)[0] == 0
    assert background.any() and (~background).any()
    inputs, outputs, handles = {}, {}, []
    for i, block in enumerate(visual.transformer.resblocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().clone())))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach().clone())))
    try:
        with torch.no_grad():
            encode_masked(bundle, images, masks, prompts)
    finally:
        for h in handles:
            h.remove()
    P = prompts.mask_embedding.detach()
    pos = visual.positional_embedding.detach()
    with torch.no_grad():
        # layer 0 input: P[0] replaces background patches before positions are added and ln_pre runs
        expected_bg = visual.ln_pre(P[0] + pos[1:])
        tokens = visual.conv1(images).flatten(2).transpose(1, 2)
        expected_fg = visual.ln_pre(tokens + pos[1:])
        expected_cls = visual.ln_pre(visual.class_embedding + pos[0])
    first = inputs[0]
    for b in range(images.shape[0]):
        assert torch.allclose(first[b, 1:][background], expected_bg[background], atol=1e-5)
        assert torch.allclose(first[b, 1:][~background], expected_fg[b][~background], atol=1e-5)
        assert torch.allclose(first[b, 0], expected_cls, atol=1e-5)
    for i in range(1, len(visual.transformer.resblocks)):
        x_in, prev = inputs[i], outputs[i - 1]
        assert torch.equal(x_in[:, 0], prev[:, 0]), f"CLS changed before block {i}"
        foreground_in, foreground_prev = x_in[:, 1:][:, ~background], prev[:, 1:][:, ~background]
        assert torch.equal(foreground_in, foreground_prev), f"foreground changed before block {i}"
        bg_in = x_in[:, 1:][:, background]
        if i < depth:
            assert torch.equal(bg_in, P[i][background].expand_as(bg_in)), f"block {i} input lacks P[{i}]"
        else:
            assert torch.equal(bg_in, prev[:, 1:][:, background]), f"background replaced at block {i} beyond depth"


def test_prompt_depth_limits(bundle):
    for depth in (1, 3, 4):
        width = bundle.model.visual.transformer.width
        assert MaskPrompts.for_visual(bundle.model.visual, depth).mask_embedding.shape == (depth, 64, width)
    with pytest.raises(ValueError, match="exceeds"):
        MaskPrompts.for_visual(bundle.model.visual, 12)
    with pytest.raises(ValueError, match="depth must be"):
        MaskPrompts(0, 64, 128)


def test_prompts_need_masks_and_matching_shapes(bundle):
    images, masks = images_and_masks()
    prompts = MaskPrompts.for_visual(bundle.model.visual, 1)
    with pytest.raises(ValueError, match="need the crops' masks"):
        encode_masked(bundle, images, None, prompts)
    with pytest.raises(ValueError, match="do not fit"):
        encode_masked(bundle, images, masks, MaskPrompts(1, 49, bundle.model.visual.transformer.width))
    with pytest.raises(ValueError, match="crops must be 64x64"):
        encode_masked(bundle, torch.zeros(1, 3, 32, 32))


def test_prompts_save_load_apart_from_clip_and_fit_another_clip(bundle, tmp_path):
    prompts = MaskPrompts.for_visual(bundle.model.visual, 3, init_std=0.1)
    path = save_prompts(prompts, tmp_path / "prompts.pt", arch=bundle.arch)
    assert path.stat().st_size < 200_000  # the prompts only, not CLIP's ~8M weights
    loaded = load_prompts(path)
    assert torch.equal(loaded.mask_embedding, prompts.mask_embedding)
    images, masks = images_and_masks()
    torch.manual_seed(123)
    other = load_clip("ovseg-tiny-vit")  # e.g. a fine-tuned CLIP of the same architecture
    with torch.no_grad():
        a = encode_masked(other, images, masks, loaded)
        b = encode_masked(other, images, masks, prompts)
    assert torch.equal(a, b)
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="junk.pt"):
        load_prompts(tmp_path / "junk.pt")


def test_training_forward_equals_open_clips_blocks_with_the_same_gradients(bundle):
    """With gradients on, the prompted ViT runs its blocks through `_frozen_block` (a faster route around a
    torch matmul path for frozen weights): same features and prompt gradients as open_clip's own blocks."""
    images, masks = images_and_masks()
    prompts = MaskPrompts.for_visual(bundle.model.visual, 3, init_std=0.5)
    results = []
    for use_open_clip in (False, True):
        prompts.zero_grad()
        vit = MaskPromptedViT(bundle.model.visual, prompts)
        if use_open_clip:  # every block through its own forward, as under no_grad
            vit._block = lambda block, x: block(x)
        features = vit(images, masks)
        features.square().sum().backward()
        results.append((features.detach(), prompts.mask_embedding.grad.clone()))
    (ours, our_grad), (theirs, their_grad) = results
    assert their_grad.abs().max() > 0
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(our_grad, their_grad, atol=1e-5, rtol=1e-4)
