"""The paper's Table 5 ablations (A1-A7) as model switches: counts, structure, training, fusing, export."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import FUSE_TOL, photos, randomize_weights, rel_l2_error
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import levit
from levit.models.config import ABLATIONS, PAPER_ABLATIONS, VARIANTS, LeViTConfig
from levit.models.layers import Attention, ShrinkAttention

ROWS = ["base", *ABLATIONS]


def _ab(row: str) -> str | None:
    return None if row == "base" else row


@pytest.mark.parametrize("row", ROWS)
def test_counts_match_table5(row):
    """Params and FLOPs within 3% of the paper's Table 5 (no distillation head, 1000 classes, 224px)."""
    with torch.device("meta"):
        model = levit.create_model("levit_128s", ablation=_ab(row), distillation=False)
    paper = PAPER_ABLATIONS[row]
    params, flops = levit.count_params(model), levit.count_flops(model)
    assert abs(params / (paper.params_m * 1e6) - 1) < 0.03, params
    assert abs(flops / (paper.flops_m * 1e6) - 1) < 0.03, flops


def test_base_and_a4_a7_counts_are_the_base_models():
    """A4 (no distillation) is the base network; A7 only drops an activation: same params and FLOPs."""
    cfg = VARIANTS["levit_128s"].replace(distillation=False)
    base = (7_777_058 - (384 * 1000 + 1000 + 2 * 384), 305_108_946 - 384 * 1000)  # both heads - one head
    for row in (None, "A4", "A7"):
        with torch.device("meta"):
            m = levit.create_model("levit_128s", ablation=row, distillation=False)
        assert (levit.count_params(m), levit.count_flops(m)) == base
    assert levit.count_flops(cfg) == base[1]


@pytest.mark.parametrize("row", ROWS)
def test_flops_convention_matches_torch_counter(row):
    """flops.py counts every variant as the module really computes: torch's counter (matmuls and
    convs) plus the softmax term heads*Nq*Nk that the paper's convention adds per attention."""
    model = levit.create_model("levit_128s", ablation=_ab(row), distillation=False, img_size=(48, 32)).eval()
    softmax = 0
    for m in model.modules():  # (h, w) grids: non-square counts too
        if isinstance(m, ShrinkAttention):
            softmax += m.num_heads * math.prod(m.resolution_out) * math.prod(m.resolution)
        elif isinstance(m, Attention):
            softmax += m.num_heads * math.prod(m.resolution) ** 2
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, 48, 32))
    assert fc.get_total_flops() // 2 + softmax == levit.count_flops(model)


def test_switches_build_the_papers_variants():
    def make(row):
        with torch.device("meta"):
            return levit.create_model("levit_128s", ablation=row)

    a1 = make("A1")
    assert len(a1.stages) == 1 and len(a1.stages[0].blocks) == 11 and a1.config.resolutions == (14,)
    attn = a1.stages[0].blocks[0].attn
    assert (attn.num_heads, attn.key_dim, a1.config.embed_dim) == (3, 19, (114,))
    a2 = make("A2")
    (conv,) = [m for m in a2.stem.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (16, 16) and conv.stride == (16, 16)
    a3 = make("A3")
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in a3.modules())
    assert isinstance(a3.stages[1].blocks[0].norm1, nn.LayerNorm)
    a5 = make("A5")
    assert a5.pos_embed.shape == (1, 196, 128)
    assert all(m.attention_biases is None for m in a5.modules() if isinstance(m, Attention | ShrinkAttention))
    assert "pos_embed" in a5.no_weight_decay()
    a6 = make("A6")
    shrink = a6.stages[1].downsample.attn
    assert (shrink.num_heads, shrink.key_dim, shrink.val_dim) == (16, 30, 30)
    blk = a6.stages[2].blocks[0]
    assert (blk.attn.num_heads, blk.attn.key_dim, blk.attn.val_dim, blk.mlp.fc1.linear.out_features) == (8, 30, 30, 960)
    a7 = make("A7")
    assert all(isinstance(m.act, nn.Identity) for m in a7.modules() if isinstance(m, Attention | ShrinkAttention))
    base, a4 = make(None), make("A4")
    assert {k: v.shape for k, v in a4.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert a4.config.ablation == "A4" and base.config.ablation is None


def test_strict_ablation_values():
    with pytest.raises(ValueError, match="valid: None, A1, A2"):
        levit.create_model("levit_tiny", ablation="A9")
    with pytest.raises(ValueError, match="unknown ablation"):
        LeViTConfig("x", (32,), 8, (2,), (1,), ablation="a3")
    with pytest.raises(ValueError, match="norm must be one of bn, ln"):
        VARIANTS["levit_tiny"].replace(norm="layernorm")
    with pytest.raises(ValueError, match="levit_128s"):  # A1/A6 are the paper's LeViT-128S widths
        levit.create_model("levit_tiny", ablation="A6")
    with pytest.raises(ValueError, match="ablation A3 needs"):  # a label without its switch would lie
        VARIANTS["levit_tiny"].replace(ablation="A3")
    # the switch-only rows apply to any variant
    assert levit.create_model("levit_tiny", ablation="A3").config.norm == "ln"


@pytest.mark.parametrize("row", ["A1", "A2", "A3", "A5", "A6", "A7"])
def test_forward_backward(row):
    torch.manual_seed(0)
    model = levit.create_model("levit_128s", ablation=row, img_size=32, num_classes=5)
    model.set_distilled_training(True)
    a, b = model.train()(torch.randn(4, 3, 32, 32))
    (a.logsumexp(-1).sum() + b.logsumexp(-1).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the switched-in parameters learn
    if row == "A5":
        assert model.pos_embed.grad.abs().sum() > 0
    if row == "A3":
        assert model.stages[0].blocks[0].norm1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("row", ["A1", "A2", "A5", "A6", "A7"])
def test_fuse_parity(row):
    torch.manual_seed(0)
    model = randomize_weights(levit.create_model("levit_128s", ablation=row, img_size=48, num_classes=10)).eval()
    fused = levit.fuse(model)
    x = photos(3, 48)  # photo-like: what randomize_weights calibrated the BatchNorms on
    with torch.no_grad():
        ref = model(x)
        out = fused(x)
    assert rel_l2_error(out, ref) <= FUSE_TOL
    assert ref.std() > 0.05  # the check sees real signal, not a degenerate model


def test_a7_fused_has_no_hardswish():
    """The fused A7 differs from the fused base only by the missing activation: same weights, other output."""
    base = randomize_weights(levit.create_model("levit_tiny", img_size=64)).eval()
    a7 = randomize_weights(levit.create_model("levit_tiny", img_size=64, ablation="A7")).eval()  # same draws
    assert all(torch.equal(p, q) for p, q in zip(a7.parameters(), base.parameters()) if p.ndim == 2)
    x = photos(2, 64)
    with torch.no_grad():
        assert rel_l2_error(a7(x), base(x)) > 100 * FUSE_TOL
        assert rel_l2_error(levit.fuse(a7)(x), a7(x)) <= FUSE_TOL


def test_a3_fuses_keeping_its_layernorms():
    """A3 has no BatchNorm to fold: its inference form keeps the pre-norm LayerNorms (they normalise
    each token by its own statistics) and folds the rest (q scale, bias tables, the two heads, whose
    LayerNorm affine goes into one merged linear layer). deploy runs it without a warning."""
    model = randomize_weights(levit.create_model("levit_tiny", ablation="A3", img_size=32)).eval()
    fused = levit.fuse(model)
    assert fused.is_fused and fused.head_dist is None
    norms = [m for m in fused.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 5 + 1  # norm1, norm2 of 3 blocks + 2 shrink blocks, and the head's
    assert not fused.head.bn.elementwise_affine  # the head's affine is in its linear layer
    x = photos(2, 32)
    with torch.no_grad():
        assert rel_l2_error(fused(x), model(x)) <= FUSE_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = levit.deploy(model, backend="eager", batch_size=2)
    with torch.no_grad():
        assert rel_l2_error(pred(x), model(x)) <= FUSE_TOL


def test_export_onnx_a3_and_a5_fused(tmp_path):
    pytest.importorskip("onnxruntime")
    from levit.runtime.export import export

    for row in ("A3", "A5"):
        model = randomize_weights(levit.create_model("levit_tiny", ablation=row, img_size=32)).eval()
        result = export(model, tmp_path / f"{row}.onnx")
        assert result.path.is_file() and result.max_rel_error < 1e-4


def test_save_load_roundtrip_keeps_the_variant(tmp_path):
    model = randomize_weights(levit.create_model("levit_128s", ablation="A5", img_size=32, num_classes=3)).eval()
    levit.save(model, tmp_path / "a5.safetensors")
    loaded = levit.create_model("levit_128s", checkpoint=tmp_path / "a5.safetensors").eval()
    assert loaded.config.ablation == "A5" and loaded.config.pos == "embed"
    x = photos(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_training_recipe_takes_ablation():
    from levit.errors import LeViTError
    from levit.train.run import parse_overrides, resolve_config

    assert parse_overrides(["ablation=A3"]) == {"ablation": "A3"}
    cfg = resolve_config(dataset="digits", model="levit_128s", ablation="A3")
    assert cfg.ablation == "A3"
    with pytest.raises(LeViTError, match="ablation: unknown ablation 'A8'"):
        resolve_config(dataset="digits", model="levit_128s", ablation="A8")
    with pytest.raises(LeViTError, match=r"A4 .* distillation=none"):
        resolve_config(dataset="digits", model="levit_128s", ablation="A4", distillation="hard")


def test_bench_knows_the_ablations():
    from levit.paper.speed import _build, list_bench_models

    assert {"levit_128s_a1", "levit_128s_a3", "levit_128s_a7"} <= set(list_bench_models())
    from levit.paper.speed import BENCH_MODELS

    module, *_ = _build(BENCH_MODELS["levit_128s_a3"], 32)
    assert module.is_fused and module.config.norm == "ln"  # A3 timed fused, its LayerNorms kept
    module, *_ = _build(BENCH_MODELS["levit_128s_a2"], 32)
    assert module.is_fused


def test_models_ablations_cli(capsys):
    from levit.cli import main

    assert main(["models", "--ablations"]) == 0
    out = capsys.readouterr().out
    assert "A6" in out and "6,195,819" in out and "312M" in out


def test_train_cli_rejects_a_bad_ablation(tmp_path, capsys):
    from levit.cli import main

    args = ["train", "--dataset", "digits", "--output", str(tmp_path / "run"), "ablation=A9"]
    assert main(args) == 2  # a bad recipe value is a usage error
    err = capsys.readouterr().err
    assert "unknown ablation 'A9'" in err and "A1" in err
    assert not (tmp_path / "run").exists()


def test_eval_and_predict_run_an_a3_checkpoint(tmp_path, capsys):
    """The commands share one inference-form policy: an A3 checkpoint runs fused (LayerNorms kept) in
    `levit eval` and `levit predict`, with the unfused model's answers."""
    import json

    from train_utils import make_folder

    from levit.cli import main
    from levit.data.transforms import eval_transform
    from levit.runtime.predict import list_inputs

    model = randomize_weights(levit.create_model("levit_tiny", ablation="A3", img_size=32, num_classes=2)).eval()
    ckpt = levit.save(model, tmp_path / "a3.safetensors")
    data = make_folder(tmp_path / "val", {"a": 2, "b": 2}, size=32)
    out = tmp_path / "eval.json"
    args = ["eval", "--data", str(data), "-c", str(ckpt), "--workers", "0", "--output", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    assert json.loads(out.read_text())["fused"] is True
    files = list_inputs([data])
    assert main(["predict", *map(str, files), "-m", "levit_tiny", "-c", str(ckpt), "--json", "--topk", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    from PIL import Image

    x = torch.stack([eval_transform(32)(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    assert [r["top"][0]["class"] for r in got] == probs.argmax(-1).tolist()
    for r, p in zip(got, probs.max(-1).values.tolist()):
        assert r["top"][0]["prob"] == pytest.approx(p, abs=1e-5)


@pytest.mark.parametrize("row", ["A2", "A5", "A7"])
def test_other_input_size_and_non_square_builds(row, tmp_path):
    """Ablations keep the any-shape features: a model run at another size equals one built there from
    its weights (A5: position embedding resampled like the bias tables), fused too, and FX traces."""
    model = randomize_weights(levit.create_model("levit_tiny", ablation=row, img_size=32, num_classes=4)).eval()
    path = levit.save(model, tmp_path / "m.safetensors")
    built = levit.create_model("levit_tiny", img_size=(48, 32), checkpoint=path).eval()
    assert built.config.ablation == row and built.config.img_hw == (48, 32)
    x = photos(2, (48, 32))
    with torch.no_grad():
        want = built.forward_features(x)
        assert rel_l2_error(model.forward_features(x), want) <= 1e-5
        assert rel_l2_error(levit.fuse(model).forward_features(x), want) <= FUSE_TOL
        maps = built.forward_intermediates(x, intermediates_only=True)
        assert [tuple(m.shape[2:]) for m in maps] == [(3, 2), (2, 1), (1, 1)]
        gm = torch.fx.symbolic_trace(model)
        y = photos(2, 32)
        torch.testing.assert_close(gm(y), model(y), atol=0, rtol=0)
