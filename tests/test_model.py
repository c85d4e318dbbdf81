"""The networks themselves: sizes, shapes, gradients, heads, initialisation, config errors."""

from __future__ import annotations

import pytest
import torch
from helpers import FULL_VARIANTS, randomize_weights
from torch import nn

import levit
from levit.models.config import VARIANTS
from levit.models.layers import attention_bias_index

EXACT = {  # the authors' released models: Table 3 gives these sizes rounded (M params, M FLOPs)
    "levit_128s": (7_777_058, 305_108_946),
    "levit_128": (9_213_936, 406_114_880),
    "levit_192": (10_947_069, 657_601_916),
    "levit_256": (18_893_876, 1_128_024_056),
    "levit_384": (39_128_836, 2_352_935_380),
}


@pytest.mark.parametrize("name", FULL_VARIANTS)
def test_exact_params_and_flops(name):
    with torch.device("meta"):
        model = levit.create_model(name)
    assert (levit.count_params(model), levit.count_flops(model)) == EXACT[name]
    assert levit.count_flops(name) == EXACT[name][1]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize(
    "changes", [{}, {"num_classes": 10, "distillation": False, "img_size": 96}, {"num_classes": 0}]
)
def test_params_from_config_equals_the_built_model(name, changes):
    from levit.models.flops import params_from_config

    cfg = VARIANTS[name].replace(**changes)
    with torch.device("meta"):
        model = levit.create_model(name, **changes)
    assert params_from_config(cfg) == levit.count_params(model)


@pytest.mark.parametrize("ablation", ["A1", "A2", "A3", "A4", "A5", "A6", "A7"])
@pytest.mark.parametrize("changes", [{}, {"num_classes": 10, "distillation": False, "img_size": (96, 64)}])
def test_params_from_config_equals_the_built_ablation(ablation, changes):
    """The Table 5 variants too (`levit models --ablations` counts by arithmetic, without torch)."""
    from levit.models.config import get_config
    from levit.models.flops import params_from_config

    cfg = get_config("levit_128s", ablation=ablation, **changes)
    with torch.device("meta"):
        model = levit.create_model("levit_128s", ablation=ablation, **changes)
    assert params_from_config(cfg) == levit.count_params(model)


def test_derived_sizes_of_the_config():
    cfg = VARIANTS["levit_128s"]
    assert cfg.stem_channels == (3, 16, 32, 64, 128)
    assert cfg.stem_resolutions == ((112, 112), (56, 56), (28, 28), (14, 14))  # (h, w) after each conv
    assert cfg.resolutions == (14, 7, 4) and cfg.subsampled(7) == 4 and cfg.subsampled(14) == 7
    assert cfg.replace(img_size=288).resolutions == (18, 9, 5)
    wide = cfg.replace(img_size=(320, 192))
    assert wide.stem_resolutions[-1] == (20, 12) and wide.grid_sizes == ((20, 12), (10, 6), (5, 3))


def test_registry_lists_every_variant_and_aliases():
    assert levit.list_models() == [*FULL_VARIANTS, "levit_tiny"]
    assert levit.list_models("levit_1*") == ["levit_128s", "levit_128", "levit_192"]
    with torch.device("meta"):
        assert levit.create_model("LeViT_128S").config.name == "levit_128s"
        assert levit.create_model("LeViT-384").config.name == "levit_384"


def test_unknown_name_and_key_list_valid_ones():
    with pytest.raises(ValueError, match="valid names: levit_128s, levit_128"):
        levit.create_model("levit_999")
    with pytest.raises(TypeError, match=r"unknown config key\(s\) \['depthh'\]; valid keys: .*'depth'"):
        levit.create_model("levit_tiny", depthh=(1, 1, 1))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_gradients_and_distillation_heads(name):
    torch.manual_seed(0)
    # 96x96: token grids 6 -> 3 -> 2 (a 1x1 grid would give its bias table no gradient)
    model = randomize_weights(levit.create_model(name, img_size=96, num_classes=7))
    x = torch.randn(2, 3, 96, 96)
    model.train()
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()

    model.set_distilled_training(True)
    a, b = model(x)
    assert a.shape == b.shape == (2, 7)
    (a.square().mean() + b.square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()  # eval: the average, even with distilled training on
    with torch.no_grad():
        avg = model(x)
        feats = model.forward_features(x)
        a2, b2 = model.head(feats.mean(1)), model.head_dist(feats.mean(1))
    torch.testing.assert_close(avg, (a2 + b2) / 2)
    assert feats.shape == (2, model.config.resolutions[-1] ** 2, model.config.embed_dim[-1])


def test_no_distillation_head_and_feature_outputs():
    model = levit.create_model("levit_tiny", distillation=False, img_size=64).eval()
    assert model.head_dist is None
    with pytest.raises(ValueError, match="has one head"):
        model.set_distilled_training(True)
    x = torch.randn(1, 3, 64, 64)
    maps = model.feature_maps(x)
    cfg = model.config
    assert [tuple(m.shape) for m in maps] == [(1, c, r, r) for c, r in zip(cfg.embed_dim, cfg.resolutions)]
    feats = levit.create_model("levit_tiny", num_classes=0, img_size=64).eval()(x)
    assert feats.shape == (1, cfg.embed_dim[-1])


def test_initialisation_follows_the_paper():
    model = levit.create_model("levit_128s")
    zero = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d) and m.weight.abs().sum() == 0]
    # the last BN of every residual branch: attention proj and second MLP layer, not shrink proj
    expected = [n for n, _ in model.named_modules() if n.endswith(("attn.proj.bn", "mlp.fc2.bn"))]
    expected = [n for n in expected if "downsample.attn" not in n]
    assert sorted(zero) == sorted(expected) and len(zero) == 2 * 9 + 2
    assert model.stages[1].downsample.attn.proj.bn.weight.eq(1).all()
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith("attention_biases"))
    std = model.head.linear.weight.std().item()
    assert 0.018 < std < 0.022  # trunc_normal(std=0.02) with the default absolute bounds, as the authors


def test_attention_bias_index_matches_the_paper_definition():
    idx = attention_bias_index(4)  # table[|x-x'| * r + |y-y'|]
    assert idx.shape == (16, 16)
    assert idx[0 * 4 + 1, 3 * 4 + 0].item() == 3 * 4 + 1
    sub = attention_bias_index(7, stride=2)  # queries at even positions of the 7x7 grid
    assert sub.shape == (16, 49)
    assert sub[1 * 4 + 3, 0 * 7 + 6].item() == abs(2 - 0) * 7 + abs(6 - 6)
    assert sub[3 * 4 + 3, 0].item() == 6 * 7 + 6


def test_wrong_input_size_is_a_clear_error():
    model = levit.create_model("levit_tiny", img_size=64).eval()
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, 64, 64\), got \(1, 3, 96, 96\)"):
        model(torch.randn(1, 3, 96, 96))


def test_drop_path_is_per_sample_and_training_only():
    torch.manual_seed(0)
    model = randomize_weights(levit.create_model("levit_tiny", img_size=64, drop_path_rate=0.5))
    x = torch.randn(1, 3, 64, 64).expand(16, -1, -1, -1)
    model.train()
    with torch.no_grad():
        out = model(x)
    assert (out - out[0]).abs().amax(1).gt(1e-4).any()  # samples got different masks
    model.eval()
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, out[:1].expand_as(out))
