"""timm-style feature API (features_only, forward_intermediates, classifier access) and FX tracing."""

from __future__ import annotations

import pytest
import torch
from helpers import FUSE_TOL, photos, randomized_model, rel_l2_error, tiny_model
from torchvision.models.feature_extraction import create_feature_extractor

import levit


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_features_only_returns_nchw_maps_with_feature_info():
    feats = levit.create_model("levit_tiny", img_size=64, features_only=True, out_indices=(0, 2)).eval()
    assert feats.feature_info.channels() == [32, 64]
    assert feats.feature_info.reduction() == [16, 64]
    assert feats.feature_info.module_name() == ["stages.0", "stages.2"]
    maps = feats(photos(2, (64, 96)))  # any size: the grid follows the input
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 6), (2, 64, 1, 2)]
    assert not any(n.startswith("model.head") for n, _ in feats.named_parameters())
    last = levit.create_model("levit_tiny", features_only=True, out_indices=2)  # int: the last n stages
    assert last.feature_info.reduction() == [32, 64] and len(last.model.stages) == 3
    first = levit.create_model("levit_tiny", features_only=True, out_indices=[0])
    assert len(first.model.stages) == 1  # unused stages are dropped
    with pytest.raises(ValueError, match="out of range"):
        levit.create_model("levit_tiny", features_only=True, out_indices=(3,))
    with pytest.raises(ValueError, match="features_only"):
        levit.create_model("levit_tiny", out_indices=(0,))


def test_forward_intermediates_matches_the_stages(model):
    x = photos(2, 64)
    last, maps = model.forward_intermediates(x)
    torch.testing.assert_close(last, model.forward_features(x), atol=0, rtol=0)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4), (2, 48, 2, 2), (2, 64, 1, 1)]
    # the last map is the last stage's tokens, laid out as an image: its mean is the pooled feature
    torch.testing.assert_close(maps[-1].flatten(2).mean(2), last.mean(1))
    # token n of a stage sits at row n // w, column n % w of its map
    tokens = model.stages[0](model.stem(x).flatten(2).transpose(1, 2))[0]
    torch.testing.assert_close(maps[0][:, :, 1, 3], tokens[:, 1 * 4 + 3])
    only = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    torch.testing.assert_close(only[0], maps[1], atol=0, rtol=0)
    assert len(model.forward_intermediates(x, indices=1, intermediates_only=True)) == 1
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_fused_model_has_the_same_feature_api(model, tmp_path):
    fused = levit.fuse(model)
    for size in [(64, 64), (96, 80)]:
        x = photos(2, size)
        with torch.no_grad():
            want = model.forward_intermediates(x, intermediates_only=True)
            got = fused.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(got, want):
            assert rel_l2_error(a, b) <= FUSE_TOL
    assert fused.feature_info == model.feature_info
    path = levit.save(fused, tmp_path / "fused.safetensors")
    feats = levit.create_model("levit_tiny", img_size=64, checkpoint=path, features_only=True, out_indices=(1,))
    assert feats.feature_info.channels() == [48]
    with torch.no_grad():
        assert rel_l2_error(feats(x)[0], want[1]) <= FUSE_TOL


def test_get_and_reset_classifier(model):
    m = levit.create_model("levit_tiny", img_size=64)
    heads = m.get_classifier()
    assert heads[0] is m.head and heads[1] is m.head_dist
    m.reset_classifier(7)
    assert m.eval()(photos(1, 64)).shape == (1, 7) and m.num_classes == 7
    m.reset_classifier(0)
    assert m(photos(1, 64)).shape == (1, 64)
    fused = levit.fuse(model)
    assert fused.get_classifier() is fused.head
    fused.reset_classifier(5)
    assert fused(photos(1, 64)).shape == (1, 5)
    fused.reset_classifier(0)
    x = photos(1, 64)
    assert rel_l2_error(fused(x), model.forward_head(model.forward_features(x), pre_logits=True)) <= FUSE_TOL
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="max")


def test_reset_classifier_follows_dtype_device_and_mode(model):
    """A new head in the model's dtype, on its device and in its mode: a float64 eval model then
    classifies one image alone (a training-mode BatchNorm would raise) and independently of the batch."""
    import copy

    m64 = copy.deepcopy(model).double()
    m64.reset_classifier(3)
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    assert not any(mod.training for mod in m64.modules())
    x = photos(4, 64).double()
    with torch.no_grad():
        one, batch = m64(x[:1]), m64(x)
    torch.testing.assert_close(one, batch[:1], atol=1e-12, rtol=0)
    train = levit.create_model("levit_tiny", img_size=64).train()
    train.reset_classifier(3)
    assert train.head.training and train.head_dist.training
    meta = levit.create_model("levit_tiny", img_size=64).to("meta").eval()
    meta.reset_classifier(5)  # another device than the CPU
    assert {p.device.type for p in meta.parameters()} == {"meta"} and not meta.head.training
    fused = levit.fuse(model).double()
    fused.reset_classifier(2)
    assert isinstance(fused.head, torch.nn.Linear) and fused.head.weight.dtype == torch.float64
    assert fused(x).shape == (4, 2) and not fused.head.training


def test_timm_model_attributes(model, tmp_path):
    """What timm's own tests and data helpers read: sizes, and the preprocessing the weights expect."""
    fused = levit.fuse(model)
    for m in (model, fused):
        assert m.num_features == m.head_hidden_size == 64 and m.in_chans == 3 and m.num_classes == 1000
        cfg = m.pretrained_cfg
        assert cfg["input_size"] == (3, 64, 64) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert m.default_cfg == cfg
        m.get_submodule(cfg["first_conv"])  # the names point at real modules
        x = photos(2, 64)
        with torch.no_grad():
            pooled = m.forward_head(m.forward_features(x), pre_logits=True)
            assert pooled.shape == (2, m.num_features)
            torch.testing.assert_close(m.forward_head(m.forward_features(x)), m(x), atol=0, rtol=0)
    # timm's convention: the layers whose .weight and .bias are the classifier (BNLinear's is .linear)
    assert fused.pretrained_cfg["classifier"] == "head"
    assert model.pretrained_cfg["classifier"] == ("head.linear", "head_dist.linear")
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
        assert rel_l2_error(fused.forward_head(fused.forward_features(x), pre_logits=True), want) <= FUSE_TOL
    timm_data = pytest.importorskip("timm.data")
    assert timm_data.resolve_data_config({}, model=model)["crop_pct"] == 0.875


def test_pretrained_cfg_is_one_plain_dict_whose_edits_travel(tmp_path):
    """timm's convention: a plain, mutable dict (``default_cfg`` the very same object); an edit in place
    survives fuse, save and load, and is what the preprocessing reads; the keys that follow from the
    model are rewritten when it changes form or head, the edits are not."""
    from levit.data.preprocess import Preprocess

    model = tiny_model(seed=2)
    cfg = model.pretrained_cfg
    assert type(cfg) is dict and model.pretrained_cfg is cfg and model.default_cfg is cfg
    cfg["crop_pct"] = 1.0
    cfg["interpolation"] = "bilinear"
    cfg["mean"] = (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["crop_pct"] == 1.0  # not a fresh copy per access
    fused = levit.fuse(model)
    assert fused.pretrained_cfg is not cfg and fused.default_cfg is fused.pretrained_cfg
    for m in (fused, levit.create_model("levit_tiny", checkpoint=levit.save(fused, tmp_path / "f.safetensors"))):
        got = m.pretrained_cfg
        assert (got["crop_pct"], got["interpolation"], got["mean"]) == (1.0, "bilinear", (0.5, 0.5, 0.5))
        assert (got["classifier"], got["first_conv"], got["input_size"]) == ("head", "stem.0", (3, 64, 64))
        pre = Preprocess.from_model(m)
        assert (pre.crop_pct, pre.interpolation, pre.mean) == (1.0, "bilinear", (0.5, 0.5, 0.5))
    loaded = levit.create_model("levit_tiny", checkpoint=levit.save(model, tmp_path / "u.safetensors"))
    assert loaded.pretrained_cfg["crop_pct"] == 1.0 and loaded.pretrained_cfg["classifier"][0] == "head.linear"
    model.default_cfg["note"] = "mine"
    model.reset_classifier(7)
    assert model.pretrained_cfg is cfg and cfg["num_classes"] == 7 and cfg["note"] == "mine" and cfg["crop_pct"] == 1.0
    cfg["crop_pct"] = 1.5  # an edit in place cannot be refused when made: it is where it is written or read
    with pytest.raises(ValueError, match="crop_pct"):
        levit.save(model, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess.from_model(model)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("distillation", [True, False])
def test_classifier_names_the_layers_timm_drops(tmp_path, fused, distillation):
    """``pretrained_cfg["classifier"]`` names the layers whose .weight and .bias are the classifier, in
    both forms: timm's ``load_pretrained`` drops exactly those when the class count differs and loads
    everything else; ``first_conv`` names the stem convolution it adapts."""
    timm_models = pytest.importorskip("timm.models")
    source = tiny_model(seed=3, distillation=distillation)
    source = levit.fuse(source) if fused else source
    sd = source.state_dict()
    names = source.pretrained_cfg["classifier"]
    names = (names,) if isinstance(names, str) else names
    assert len(names) == (1 if fused or not distillation else 2)
    for name in names:
        assert sd[name + ".weight"].shape == (1000, 64) and sd[name + ".bias"].shape == (1000,)
    assert source.pretrained_cfg["first_conv"] + ".weight" in sd
    torch.save(sd, tmp_path / "source.pth")
    target = tiny_model(seed=4, distillation=distillation)
    target = levit.fuse(target) if fused else target
    target.reset_classifier(10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    cfg = dict(source.pretrained_cfg, file=str(tmp_path / "source.pth"))
    timm_models.load_pretrained(target, pretrained_cfg=cfg, num_classes=10)
    after = target.state_dict()
    for k, v in after.items():
        is_classifier = any(k in (n + ".weight", n + ".bias") for n in names)
        assert torch.equal(v, before[k] if is_classifier else sd[k]), k


def test_features_only_model_has_both_cfg_names():
    for fused in (False, True):
        feats = levit.create_model("levit_tiny", img_size=64, features_only=True)
        feats = levit.fuse(feats) if fused else feats
        assert feats.default_cfg is feats.pretrained_cfg is feats.model.pretrained_cfg
        assert feats.pretrained_cfg["input_size"] == (3, 64, 64) and feats.pretrained_cfg["num_classes"] == 0
        feats.pretrained_cfg["crop_pct"] = 0.95
        assert feats.model.pretrained_cfg["crop_pct"] == 0.95


def test_fx_symbolic_trace_matches_eager(model):
    gm = torch.fx.symbolic_trace(model)
    x = photos(2, 64)
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)
    # the grid is read from the input inside the graph (the bias lookup is one leaf call), so the
    # traced graph also runs at another size, with resampled biases, like forward_features does
    assert sum(n.op == "call_function" and n.target.__name__ == "grid_bias" for n in gm.graph.nodes) == 5
    y = photos(1, (96, 80))
    torch.testing.assert_close(gm(y), model.forward_head(model.forward_features(y)), atol=1e-5, rtol=1e-5)


def test_create_feature_extractor(model):
    nodes = {"stages.0.blocks.0": "s0", "stages.1.blocks.0": "s1", "stages.2.blocks.0": "s2", "head": "logits"}
    fx = create_feature_extractor(model, return_nodes=nodes)
    x = photos(2, 64)
    out = fx(x)
    maps = model.forward_intermediates(x, intermediates_only=True)
    for i, k in enumerate(["s0", "s1", "s2"]):  # tokens (B, N, C) of each stage's (one) block
        torch.testing.assert_close(out[k], maps[i].flatten(2).transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(out["logits"], model.head(model.forward_features(x).mean(1)))


def test_intermediates_equal_timms():
    timm = pytest.importorskip("timm")
    from levit.weights.format import to_timm_state_dict

    ours = randomized_model("levit_128s")
    theirs = timm.create_model("levit_128s", pretrained=False).eval()
    theirs.load_state_dict(to_timm_state_dict(ours), strict=True)
    x = photos(1, 224)
    with torch.no_grad():
        want = theirs.forward_intermediates(x, intermediates_only=True)
        got = ours.forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
