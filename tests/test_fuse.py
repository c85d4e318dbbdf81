"""Fused inference: parity with the trained form, the input untouched, nothing that can go stale."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FULL_VARIANTS, FUSE_TOL, photos, randomize, rel_err

import levit
from levit.fuse import FusedLeViT


@pytest.mark.parametrize("name", FULL_VARIANTS)
def test_fused_matches_unfused_after_randomising(name):
    torch.manual_seed(0)
    model = randomize(levit.create_model(name), seed=5).eval()
    fused = levit.fuse(model)
    assert isinstance(fused, FusedLeViT) and not fused.training
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert isinstance(fused.head, torch.nn.Linear)  # both heads merged into one
    x = photos(2, 224)
    with torch.no_grad():
        err = rel_err(fused(x), model(x))
    assert err <= FUSE_TOL, err


def test_fuse_leaves_the_input_model_untouched(tiny):
    tiny.train()
    before = copy.deepcopy(tiny.state_dict())
    levit.fuse(tiny)
    assert tiny.training
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fuse_keeps_class_names_and_save_writes_them(tiny, tmp_path):
    tiny.class_names = [f"label {i}" for i in range(1000)]
    fused = levit.fuse(tiny)
    assert fused.class_names == tiny.class_names and fused.class_names is not tiny.class_names
    loaded = levit.create_model("levit_tiny", checkpoint=levit.save(fused, tmp_path / "f.safetensors"))
    assert isinstance(loaded, FusedLeViT) and loaded.class_names[7] == "label 7"
    assert levit.fuse(levit.create_model("levit_tiny")).class_names is None


def test_fused_counts_one_head():
    model = levit.create_model("levit_128s")
    fused = levit.fuse(model)
    assert levit.count_flops(model) - levit.count_flops(fused) == 384 * 1000


def test_no_stale_bias_after_load_state_dict(tiny):
    """eval -> forward -> load other weights -> forward must equal a fresh model with those weights."""
    x = photos(2, 64)
    other = randomize(levit.create_model("levit_tiny", img_size=64), seed=7).eval()
    with torch.no_grad():
        tiny(x)
        tiny.load_state_dict(other.state_dict())
        torch.testing.assert_close(tiny(x), other(x), rtol=0, atol=0)

        fused, fused_other = levit.fuse(tiny), levit.fuse(randomize(copy.deepcopy(other), seed=8))
        fused(x)
        fused.load_state_dict(fused_other.state_dict())
        torch.testing.assert_close(fused(x), fused_other(x), rtol=0, atol=0)


def test_right_after_dtype_moves_and_mode_switches(tiny):
    x = photos(2, 64)
    with torch.no_grad():
        ref = tiny(x).double()
        tiny.train().eval()
        tiny(x)
        m64 = tiny.to(torch.float64)
        assert rel_err(m64(x.double()), ref) < 1e-5
        f64 = levit.fuse(m64)
        f32 = f64.to(torch.float32)
        f32.train()
        f32.eval()
        assert rel_err(f32(x), ref) < 1e-4
        tiny.to(torch.float32)
        tiny.load_state_dict(randomize(levit.create_model("levit_tiny", img_size=64), seed=9).state_dict())
        # the attention biases changed with the weights: outputs follow
        assert rel_err(tiny(x), ref) > 1e-2
