"""Numerical identity with timm's LeViT (a test dependency only) and the official file layout."""

from __future__ import annotations

import pytest
import torch
from helpers import FULL_VARIANTS, PARITY_TOL, photos, randomized_model, rel_l2_error

import levit
from levit.weights.convert import official_key_map, to_official_state_dict, to_timm_state_dict

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", FULL_VARIANTS)
def test_same_logits_as_timm(name):
    torch.manual_seed(0)
    ours = randomized_model(name, seed=3)
    theirs = timm.create_model(name, pretrained=False).eval()
    theirs.load_state_dict(to_timm_state_dict(ours), strict=True)  # every tensor has a home, by name
    x = photos(2, 224)
    with torch.no_grad():
        err = rel_l2_error(ours(x), theirs(x))
    assert err <= PARITY_TOL, err


def test_official_layout_loads_and_reproduces_logits(tmp_path):
    torch.manual_seed(0)
    ours = randomized_model("levit_128s", seed=4)
    sd = to_official_state_dict(ours)
    # the layout of the released files: flat blocks list, shrink attention at 4 and 12, index buffers
    assert "blocks.4.attention_bias_idxs" in sd and "blocks.12.q.1.c.weight" in sd
    assert "blocks.21.m.2.bn.running_var" in sd and "blocks.22.m.0.c.weight" not in sd
    assert sd["blocks.0.m.attention_bias_idxs"].shape == (196, 196)
    assert "patch_embed.6.bn.weight" in sd and "head_dist.l.bias" in sd
    path = tmp_path / "LeViT-128S.pth"
    torch.save({"model": sd}, path)
    loaded = levit.create_model("LeViT_128S", checkpoint=path).eval()
    x = photos(2, 224)
    with torch.no_grad():
        assert rel_l2_error(loaded(x), ours(x)) == 0.0


def test_official_mapping_is_one_to_one_for_every_variant():
    for name in FULL_VARIANTS:
        cfg = levit.create_model.__globals__["get_config"](name)
        kmap = official_key_map(cfg)
        assert len(set(kmap.values())) == len(kmap)
        n_blocks = 2 * sum(cfg.depth) + 2 * (cfg.num_stages - 1)
        assert f"blocks.{n_blocks - 1}.m.2.c.weight" in kmap.values()
