import pytest
import torch
import torch.nn.functional as F

from ovseg_core.clip.models import load_clip
from ovseg_core.clip.text import VILD_TEMPLATES, TextFeatureCache, text_features

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_clip("ovseg-tiny-vit")


def test_vild_templates():
    assert len(VILD_TEMPLATES) == 14 and len(set(VILD_TEMPLATES)) == 14
    assert all(t.count("{}") == 1 for t in VILD_TEMPLATES)
    assert VILD_TEMPLATES[0] == "a photo of a {}."


def test_features_are_normalised_template_averages(bundle):
    names = ["teapot", "striped square", "grass"]
    got = text_features(bundle, names)
    assert got.shape == (3, bundle.embed_dim) and not got.requires_grad
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-6)
    with torch.no_grad():
        for k, name in enumerate(names):
            per_template = bundle.model.encode_text(bundle.tokenizer([t.format(name) for t in VILD_TEMPLATES]))
            manual = F.normalize(F.normalize(per_template, dim=-1).mean(dim=0), dim=0)
            assert torch.allclose(got[k], manual, atol=1e-5)
            single = bundle.model.encode_text(bundle.tokenizer([VILD_TEMPLATES[0].format(name)]), normalize=True)[0]
            assert not torch.allclose(got[k], single, atol=1e-3)  # the ensemble really averages
    assert text_features(bundle, []).shape == (0, bundle.embed_dim)


def test_cache_encodes_each_noun_once(bundle):
    encoded_rows = []
    handle = bundle.model.ln_final.register_forward_hook(lambda m, a, out: encoded_rows.append(out.shape[0]))
    try:
        cache = TextFeatureCache(bundle)
        first = cache(["cat", "dog", "cat"])
        assert sum(encoded_rows) == 2 * len(VILD_TEMPLATES)
        second = cache(["dog", "bird"])
        assert sum(encoded_rows) == 3 * len(VILD_TEMPLATES) and len(cache) == 3
    finally:
        handle.remove()
    direct = text_features(bundle, ["cat", "dog", "bird"])
    assert torch.allclose(first, direct[[0, 1, 0]], atol=1e-6)
    assert torch.allclose(second, direct[[1, 2]], atol=1e-6)
