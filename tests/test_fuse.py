"""Fused inference: parity with the trained form, the input untouched, nothing that can go stale."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from helpers import FULL_VARIANTS, FUSE_TOL, photos, randomize_weights, randomized_model, rel_l2_error, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import levit
from levit.models import kernels
from levit.models.fuse import FusedLeViT


@pytest.mark.parametrize("name", FULL_VARIANTS)
def test_fused_matches_unfused_after_randomising(name):
    torch.manual_seed(0)
    model = randomized_model(name, seed=5)
    fused = levit.fuse(model)
    assert isinstance(fused, FusedLeViT) and not fused.training
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert isinstance(fused.head, torch.nn.Linear)  # both heads merged into one
    x = photos(2, 224)
    with torch.no_grad():
        err = rel_l2_error(fused(x), model(x))
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
    other = tiny_model(seed=7)
    with torch.no_grad():
        tiny(x)
        tiny.load_state_dict(other.state_dict())
        torch.testing.assert_close(tiny(x), other(x), rtol=0, atol=0)

        fused, fused_other = levit.fuse(tiny), levit.fuse(randomize_weights(copy.deepcopy(other), seed=8))
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
        assert rel_l2_error(m64(x.double()), ref) < 1e-5
        f64 = levit.fuse(m64)
        f32 = f64.to(torch.float32)
        f32.train()
        f32.eval()
        assert rel_l2_error(f32(x), ref) < 1e-4
        tiny.to(torch.float32)
        tiny.load_state_dict(tiny_model(seed=9).state_dict())
        # the attention biases changed with the weights: outputs follow
        assert rel_l2_error(tiny(x), ref) > 1e-2


# ---- the attention paths and the CPU capability switches (levit.models.kernels) -------------------


class _OpCounter(TorchDispatchMode):
    """Counts every aten op that runs (works on the ``meta`` device: no data needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.conv_dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        if func is torch.ops.aten.conv2d.default:
            self.conv_dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _ops(model: torch.nn.Module, x: torch.Tensor) -> Counter[str]:
    with torch.inference_mode(), _OpCounter() as c:
        model(x)
    return c.ops


def test_meta_device_runs_the_same_ops_at_any_batch():
    """Off the CPU attention is batched: a per-image Python loop would run 8x more ops at batch 16."""
    fused = levit.fuse(levit.create_model("levit_128s")).to("meta")
    ops2 = _ops(fused, torch.empty(2, 3, 224, 224, device="meta"))
    ops16 = _ops(fused, torch.empty(16, 3, 224, 224, device="meta"))
    assert ops2 == ops16 and sum(ops2.values()) > 50
    cfg = fused.config
    assert ops2["aten.scaled_dot_product_attention.default"] == sum(cfg.depth) + cfg.num_stages - 1  # blocks + shrinks
    assert "aten.bmm.out" not in ops2


def test_attention_path_is_chosen_by_device_threads_and_dtype(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert kernels.attention_path("cpu") == "per_image"  # one thread, fp32: the measured exception
    assert kernels.attention_path("cpu", torch.bfloat16) == "matmul"
    for dev in ("cuda", "meta", "mps", "xpu"):
        assert kernels.attention_path(dev) == "sdpa"
        assert kernels.attention_path(dev, torch.float16) == "sdpa"
    monkeypatch.setattr(torch, "get_num_threads", lambda: kernels.PER_IMAGE_MAX_THREADS + 1)
    assert kernels.attention_path("cpu") == "matmul"
    with kernels.forced(attention_path="per_image"):
        assert kernels.attention_path("cuda") == "per_image"
        with kernels.forced(onednn=False):  # nested: each restores what it found
            assert kernels.attention_path("cuda") == "per_image"
    assert kernels.attention_path("cuda") == "sdpa"  # restored on exit
    kernels.set_attention_path("matmul")
    try:
        assert kernels.attention_path("cuda") == "matmul"
    finally:
        kernels.set_attention_path(None)
    assert kernels.attention_path("cuda") == "sdpa"
    with pytest.raises(ValueError, match="attention path must be one of"):
        kernels.set_attention_path("bogus")
    with pytest.raises(ValueError, match="set_onednn"):
        kernels.set_onednn("yes")


def test_batched_path_equals_per_image_path_and_unfused():
    model = randomized_model("levit_128s", seed=11)
    fused = levit.fuse(model)
    x = photos(3, seed=2)
    out = {}
    for path in kernels.ATTENTION_PATHS:
        with kernels.forced(attention_path=path), torch.inference_mode(), _OpCounter() as c:
            out[path] = fused(x)
        used = {
            p
            for p, op in (
                ("sdpa", "scaled_dot_product_attention.default"),
                ("per_image", "bmm.out"),
                ("matmul", "matmul.default"),
            )
            if c.ops[f"aten.{op}"]
        }
        assert used == {path}, (path, used)  # that path, and only it, really ran
    with torch.no_grad():
        ref = model(x)
    for path in ("matmul", "sdpa"):  # both batched forms
        assert rel_l2_error(out[path], out["per_image"]) <= 1e-5, path
        assert rel_l2_error(out[path], ref) <= FUSE_TOL, path
        assert (out[path].argmax(-1) == ref.argmax(-1)).all()


_ONEDNN_OPS = ("mkldnn._linear_pointwise", "mkldnn._convolution_pointwise")


@pytest.mark.parametrize("bf16_ok", [False, True])
def test_bf16_onednn_kernels_only_where_the_cpu_has_bf16(bf16_ok):
    x = photos(kernels.ONEDNN_MIN_BATCH, 64).bfloat16()
    with kernels.forced(cpu_bf16=bf16_ok), torch.inference_mode():
        assert kernels.onednn_ok(x) == (bf16_ok and torch.backends.mkldnn.is_available())
        assert kernels.onednn_ok(x.float()) == torch.backends.mkldnn.is_available()  # fp32 oneDNN: any x86
    if bf16_ok and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return  # forcing bf16 kernels on a CPU without them would (rightly) raise
    model = tiny_model(seed=4)
    fused = levit.fuse(model).bfloat16()
    with kernels.forced(cpu_bf16=bf16_ok), torch.inference_mode(), _OpCounter() as c:
        out = fused(x)
    used = any(k.startswith(f"{op}") for k in c.ops for op in _ONEDNN_OPS)
    assert used == bf16_ok
    if not bf16_ok:  # no bf16 convolution at all (oneDNN's raise on AVX2): the stem ran in fp32
        assert c.ops["aten.conv2d.default"] == 4 and c.conv_dtypes == {torch.float32}
    with torch.no_grad():
        ref = model(x.float())
    assert out.dtype == torch.bfloat16 and rel_l2_error(out.float(), ref) < 0.05


def test_onednn_switch_forces_the_plain_path(tiny):
    fused = levit.fuse(tiny)
    x = photos(kernels.ONEDNN_MIN_BATCH, 64)
    with kernels.forced(onednn=False), torch.inference_mode(), _OpCounter() as c:
        plain = fused(x)
    assert not any(k.startswith(op) for k in c.ops for op in _ONEDNN_OPS)
    with torch.inference_mode():
        assert rel_l2_error(fused(x), plain) < 1e-5


def test_onednn_kernels_from_the_measured_batch_size_up(tiny):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    fused = levit.fuse(tiny)
    x = photos(1, 64)
    for forced, expect in ((None, kernels.ONEDNN_MIN_BATCH <= 1), (True, True)):
        with kernels.forced(onednn=forced), torch.inference_mode(), _OpCounter() as c:
            fused(x)
        assert any(k.startswith(op) for k in c.ops for op in _ONEDNN_OPS) == expect, forced
    with torch.inference_mode():
        assert kernels.onednn_ok(torch.zeros(kernels.ONEDNN_MIN_BATCH, 4, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_without_graph_breaks(tiny, dtype):
    """The device/capability probes are skipped under torch.compile: one graph (else inductor falls back)."""
    fused = levit.fuse(tiny).to(dtype)
    x = photos(kernels.ONEDNN_MIN_BATCH, 64).to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="eager")  # raises on a graph break
    with torch.inference_mode():
        out = compiled(x)
        ref = fused(x)
    assert rel_l2_error(out.float(), ref.float()) < (1e-5 if dtype == torch.float32 else 0.05)


# ---- the walk: any LeViT, one skeleton ------------------------------------------------------------
def test_fuse_takes_a_feature_extractor(tiny):
    feats = levit.create_model("levit_tiny", img_size=64, features_only=True, out_indices=(0, 2))
    feats.model.load_state_dict(tiny.state_dict(), strict=False)  # the heads were pruned
    feats.eval()
    fused = levit.fuse(feats)
    assert fused.is_fused and not feats.is_fused and fused.feature_info.channels() == [32, 64]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    x = photos(2, (64, 96))
    with torch.no_grad():
        for a, b in zip(fused(x), feats(x), strict=True):
            assert rel_l2_error(a, b) <= FUSE_TOL


def test_the_fused_model_is_the_same_skeleton(tiny):
    """No second copy of the network: the fused model is a LeViT whose layers are the inference forms;
    its state dict keeps the layout fused files have always had (stem.0.weight, ...attn.attn_bias, head.weight)."""
    from levit.models.layers import FusedAttention, FusedMLP, FusedShrinkAttention, FusedStem
    from levit.models.network import LeViT, LeViTBlock, LeViTStage, ShrinkBlock

    fused = levit.fuse(tiny)
    assert isinstance(fused, LeViT) and type(fused).forward is LeViT.forward
    assert isinstance(fused.stem, FusedStem) and isinstance(fused.stages[0], LeViTStage)
    block, shrink = fused.stages[1].blocks[0], fused.stages[1].downsample
    assert isinstance(block, LeViTBlock) and isinstance(shrink, ShrinkBlock)
    assert isinstance(block.attn, FusedAttention) and isinstance(block.mlp, FusedMLP)
    assert isinstance(shrink.attn, FusedShrinkAttention)
    keys = set(fused.state_dict())
    assert {"stem.0.weight", "stem.6.bias", "stages.1.downsample.attn.kv.weight", "head.weight"} <= keys
    assert {
        "stages.0.blocks.0.attn.qkv.weight",
        "stages.0.blocks.0.attn.attn_bias",
        "stages.0.blocks.0.mlp.fc2.bias",
    } <= keys
    assert not any(k.startswith("head_dist") for k in keys)


class _Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def test_fused_model_fx_traces_at_any_size(tiny):
    """No Python branch on a traced value in the fused forward: the kernel and bias choices are fx
    leaves, so one traced graph runs the build size (with oneDNN's kernels from ONEDNN_MIN_BATCH images)
    and another size (the biases resampled inside the leaf)."""
    fused = levit.fuse(tiny)
    gm = torch.fx.symbolic_trace(fused)
    leaves = {n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"}
    assert {"linear", "attention", "conv_stem", "grid_bias"} <= leaves
    x = photos(kernels.ONEDNN_MIN_BATCH, 64)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), fused(x), atol=0, rtol=0)
    gf = torch.fx.symbolic_trace(_Features(fused))
    y = photos(1, (96, 80))
    with torch.no_grad():
        torch.testing.assert_close(gf(y), fused.forward_features(y), atol=0, rtol=0)
        assert rel_l2_error(gf(y), tiny.forward_features(y)) <= FUSE_TOL


def test_torch_export_with_a_dynamic_batch():
    """torch.export is the supported graph capture (torch.jit.script is deprecated in torch 2.x and
    not supported): the fused model exports once and runs any batch size, equal to eager."""
    from torch.export import Dim, export

    fused = levit.fuse(tiny_model(seed=6, img_size=32))
    program = export(fused, (photos(2, 32),), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    run = program.module()
    with torch.no_grad():
        for n in (1, 5):
            x = photos(n, 32, seed=n)
            got, want = run(x), fused(x)  # plain matmuls vs the eager path's kernels: fp32 rounding apart
            assert got.shape == want.shape and rel_l2_error(got, want) <= 1e-5
