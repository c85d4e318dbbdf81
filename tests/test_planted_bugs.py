"""Tests of the tests: bugs planted on purpose must fail the fusion and timm-parity checks.

A check on a model whose output ignores its input passes whatever the bug. These three bugs are the
kind a fusion or a conversion could really introduce; with ``helpers.randomize_weights`` and
photo-like inputs each moves the logits far beyond the tolerances of tests/test_fuse.py and
tests/test_parity.py (the same constants, the same inputs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FUSE_TOL, PARITY_TOL, photos, randomized_model, rel_l2_error

import levit
from levit.weights import convert

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def model():
    return randomized_model("levit_128s", seed=5)


@pytest.fixture(scope="module")
def theirs(model):
    ref = timm.create_model("levit_128s", pretrained=False).eval()
    ref.load_state_dict(convert.to_timm_state_dict(model), strict=True)
    return ref


@pytest.fixture(scope="module")
def x():
    return photos(2, 224)


def _zero_biases(m):
    for name, t in m.named_parameters():
        if name.endswith("attention_biases"):
            t.data.zero_()
    for name, t in m.named_buffers():
        if name.endswith("attn_bias"):
            t.zero_()


def _permute_table(m):
    """One attention's bias table, entries shuffled (a wrong index map)."""
    attn = m.stages[0].blocks[0].attn
    t = attn.attention_biases if hasattr(attn, "attention_biases") else attn.attn_bias
    perm = torch.randperm(t.shape[-1], generator=torch.Generator().manual_seed(0))
    t.data.copy_(t.data[..., perm])


def _swap_qk(m):
    """q and k exchanged in the first head of one attention (weights and biases / BN terms)."""
    attn = m.stages[0].blocks[0].attn
    D = attn.key_dim
    per = 2 * D + attn.val_dim
    qkv = attn.qkv
    tensors = [qkv.weight, qkv.bias] if isinstance(qkv, torch.nn.Linear) else [qkv.linear.weight]
    if not isinstance(qkv, torch.nn.Linear):
        bn = qkv.bn
        tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    for t in tensors:
        rows = t.data.view(attn.num_heads, per, *t.shape[1:])[0]
        q = rows[:D].clone()
        rows[:D] = rows[D : 2 * D]
        rows[D : 2 * D] = q


BUGS = {"zeroed attention biases": _zero_biases, "permuted bias table": _permute_table, "q/k swapped": _swap_qk}


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_fails_the_fusion_check(model, x, bug):
    fused = levit.fuse(model)
    BUGS[bug](fused)
    with torch.no_grad():
        err = rel_l2_error(fused(x), model(x))
    assert err > 100 * FUSE_TOL, f"{bug}: {err:.1e} would pass the fusion check"


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_fails_the_parity_check(model, theirs, x, bug):
    ours = copy.deepcopy(model)
    BUGS[bug](ours)
    with torch.no_grad():
        err = rel_l2_error(ours(x), theirs(x))
    assert err > 1000 * PARITY_TOL, f"{bug}: {err:.1e} would pass the parity check"


def test_the_checks_pass_without_a_bug(model, theirs, x):
    """The other side: the same inputs and tolerances accept a correct fusion and conversion."""
    with torch.no_grad():
        ref = model(x)
        assert rel_l2_error(levit.fuse(model)(x), ref) <= FUSE_TOL / 5
        assert rel_l2_error(theirs(x), ref) <= PARITY_TOL
        assert ref.argmax(-1)[0] != ref.argmax(-1)[1]  # the images get different answers


def test_randomized_model_depends_on_the_image(model):
    """Logits vary between images on the scale of their spread (not 6e-5 of it, as on a fresh model)."""
    with torch.no_grad():
        out = model(photos(4, 224, seed=7))
    between = (out - out.mean(0)).std() / out.std()
    assert between > 0.5 and len(set(out.argmax(-1).tolist())) >= 3
