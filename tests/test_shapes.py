"""Any image shape: (H, W) configs, resampled bias tables, inputs of another size than the build size."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FUSE_TOL, photos, rel_l2_error, tiny_model

import levit
from levit.models.config import LeViTConfig
from levit.weights.format import to_official_state_dict


def _tiny(img_size, seed=0):
    return tiny_model(seed, img_size)


def _set_additive_tables(model):
    """Every bias table becomes f(dy) + g(dx), f and g increasing and different per axis."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("attention_biases"):
                h, w = model.get_submodule(n.rsplit(".", 1)[0]).resolution
                f, g = torch.linspace(0, 2, h) ** 2, -(torch.linspace(0, 1, w) ** 3)
                p.copy_((f[:, None] + g[None, :]).reshape(1, -1).expand_as(p))


def _check_resampled(model, src):
    """Bicubic over offsets, each axis on its own (corners aligned): the resampled tables are still
    f'(dy) + g'(dx) and keep the corner values (offsets 0 and the largest, per axis)."""
    for n, p in model.named_parameters():
        if not n.endswith("attention_biases"):
            continue
        owner = n.rsplit(".", 1)[0]
        (h, w), (h0, w0) = model.get_submodule(owner).resolution, src.get_submodule(owner).resolution
        t = p.detach()[0].reshape(h, w)
        t0 = src.get_parameter(n).detach()[0].reshape(h0, w0)
        ey, ex = (h0 - 1 if h > 1 else 0), (w0 - 1 if w > 1 else 0)  # a 1-long axis keeps offset 0 only
        for i, j in [(0, 0), (1, 1), (0, 1), (1, 0)]:
            torch.testing.assert_close(t[-i, -j], t0[i * ey, j * ex], atol=1e-5, rtol=0, msg=n)
        additive = t - t[:, :1] - t[:1, :] + t[0, 0]
        torch.testing.assert_close(additive, torch.zeros_like(t), atol=1e-5, rtol=0, msg=n)


def test_img_size_pairs_are_validated_and_normalised():
    cfg = levit.create_model("levit_tiny", img_size=(320, 192)).config
    assert cfg.img_size == (320, 192) and cfg.img_hw == (320, 192)
    assert cfg.grid_sizes == ((20, 12), (10, 6), (5, 3))
    assert levit.create_model("levit_tiny", img_size=(64, 64)).config.img_size == 64  # one spelling
    assert levit.LeViTConfig.from_dict(cfg.to_dict()) == cfg
    for bad in [(320, 200), (64,), (64, 64, 64), 100, "224"]:
        with pytest.raises(ValueError, match="img_size"):
            levit.create_model("levit_tiny", img_size=bad)


def test_non_square_model_runs_and_counts_flops():
    model = _tiny((96, 64))
    out = model(photos(2, (96, 64)))
    assert out.shape == (2, 1000)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, 96, 64\)"):
        model(photos(2, (64, 96)))
    # FLOPs follow the token count: a 96x64 input costs less than 96x96, more than 64x64
    f = [levit.count_flops(levit.create_model("levit_tiny", img_size=s)) for s in (64, (96, 64), 96)]
    assert f[0] < f[1] < f[2]
    fused = levit.fuse(model)
    x = photos(2, (96, 64))
    assert rel_l2_error(fused(x), model(x)) <= FUSE_TOL


def test_released_square_weights_resample_onto_a_non_square_grid(tmp_path):
    src = _tiny(224)
    _set_additive_tables(src)
    path = tmp_path / "official.pth"
    torch.save({"model": to_official_state_dict(src)}, path)  # the authors' layout, made at 224
    model = levit.create_model("levit_tiny", img_size=(320, 192), checkpoint=path).eval()
    assert model.config.grid_sizes[0] == (20, 12)
    _check_resampled(model, src)
    assert model(photos(1, (320, 192))).isfinite().all()


def test_levit_file_resamples_from_its_own_non_square_grid(tmp_path):
    src = _tiny((96, 64))
    _set_additive_tables(src)
    path = levit.save(src, tmp_path / "m.safetensors")
    model = levit.create_model("levit_tiny", img_size=(64, 96), checkpoint=path)
    _check_resampled(model, src)


def test_other_input_size_equals_a_model_built_for_it(tmp_path):
    """Running a 64-px model on 96x80 images = building for 96x80 from the 64-px weights."""
    model = _tiny(64)
    path = levit.save(model, tmp_path / "m.safetensors")
    built = levit.create_model("levit_tiny", img_size=(96, 80), checkpoint=path).eval()
    x = photos(2, (96, 80))
    torch.testing.assert_close(model.forward_features(x), built.forward_features(x), atol=1e-5, rtol=1e-5)
    fused = levit.fuse(model)
    assert rel_l2_error(fused.forward_features(x), built.forward_features(x)) <= FUSE_TOL
    # at the build size nothing is resampled: exactly the classification path
    y = photos(2, 64)
    assert torch.equal(model.forward_head(model.forward_features(y)), model(y))


@pytest.mark.parametrize("fused", [False, True])
def test_no_stale_bias_after_load_state_dict(fused):
    """A forward at another size, then new weights: the next forward uses the new weights."""
    a, b = _tiny(64, seed=1), _tiny(64, seed=2)
    if fused:
        a, b = levit.fuse(a), levit.fuse(b)
    x = photos(1, (96, 80))
    with torch.no_grad():
        before = a.forward_features(x)
        a.load_state_dict(b.state_dict())
        after = a.forward_features(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, b.forward_features(x), atol=0, rtol=0)
        # an in-place edit of the (fused) bias or table is seen too
        tensors = dict(a.named_buffers()) | dict(a.named_parameters())
        name = "attn_bias" if fused else "attention_biases"
        table = next(t for n, t in tensors.items() if n.endswith(name))
        table.add_(torch.randn(table.shape, generator=torch.Generator().manual_seed(0)))  # softmax ignores constants
        assert not torch.allclose(a.forward_features(x), after)


def test_training_at_another_size_reaches_the_bias_tables():
    model = _tiny(64).train()  # randomised: a fresh model's zero BN weights would block the gradients
    out = model.forward_features(photos(2, (96, 80))).sum()
    out.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("attention_biases")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_evaluation_transform_and_export_take_a_pair(tmp_path):
    from PIL import Image

    from levit.data.transforms import eval_transform

    assert eval_transform((320, 192))(Image.new("RGB", (500, 300))).shape == (3, 320, 192)
    pytest.importorskip("onnxruntime")
    from levit.runtime.export import export

    result = export(_tiny((96, 64)), tmp_path / "m.onnx", format="onnx")
    assert result.max_rel_error < 1e-4


def test_cli_takes_height_x_width(tmp_path, capsys):
    """`--img-size HxW` builds the (H, W) model: predict gives the Python API's answer, export writes that shape."""
    import numpy as np
    from PIL import Image

    from levit.cli import main
    from levit.data.transforms import eval_transform

    ckpt = levit.save(_tiny(64), tmp_path / "tiny.safetensors")
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8)).save(img)
    assert main(["predict", str(img), "-m", "levit_tiny", "-c", str(ckpt), "--img-size", "48x96", "--topk", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()[1]
    model = levit.create_model("levit_tiny", checkpoint=ckpt, img_size=(48, 96)).eval()
    with torch.no_grad():
        probs = model(eval_transform((48, 96))(Image.open(img).convert("RGB"))[None]).softmax(-1)[0]
    assert f"{probs.max().item() * 100:.2f}%" in printed and f"(class {probs.argmax().item()})" in printed
    pytest.importorskip("onnx")
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", "-m", "levit_tiny", "-c", str(ckpt), "--img-size", "48x96", "--output", str(out)]) == 0
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 48, 96]


def test_one_grid_bias_for_both_forms_never_stale():
    """The trained table and the fused matrix give the same bias at every grid through the one
    ``grid_bias``, and nothing is cached: an in-place edit or a dtype move is seen by the next call."""
    from levit.models import layers
    from levit.models.layers import grid_bias

    model = _tiny(64)
    fused = levit.fuse(model)
    pairs = [(model.stages[0].blocks[0].attn, fused.stages[0].blocks[0].attn)]
    pairs.append((model.stages[1].downsample.attn, fused.stages[1].downsample.attn))
    for trained, inference in pairs:
        for hw in (trained.resolution, (6, 5), (3, 7)):
            want = trained.bias_for(*hw)
            assert want.shape[1:] == (
                math.prod(LeViTConfig.subsampled_grid(hw)) if trained.stride == 2 else math.prod(hw),
                math.prod(hw),
            )
            got = grid_bias(inference.attn_bias, inference.resolution, *hw, stride=inference.stride)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not any(isinstance(v, dict) for k, v in vars(layers).items() if k.isupper())  # no module-level cache
    x = photos(1, (96, 80))
    attn = fused.stages[0].blocks[0].attn
    with torch.no_grad():
        first = fused.forward_features(x)
        torch.testing.assert_close(fused.forward_features(x), first, atol=0, rtol=0)
        attn.attn_bias.mul_(2)  # in place: the very same tensor object, new numbers
        changed = fused.forward_features(x)
        assert not torch.allclose(changed, first)
        fused.double()
        assert rel_l2_error(fused.forward_features(x.double()), changed) <= 1e-5


def test_deploy_runs_a_non_square_model_with_image_calibration(tmp_path):
    """deploy on a (H, W) model: image files are cropped to (H, W), a wrong shape is named."""
    from PIL import Image

    from levit.runtime.deploy import DeployError

    model = levit.create_model("levit_tiny", img_size=(64, 48)).eval()
    Image.fromarray((torch.rand(80, 90, 3) * 255).byte().numpy()).save(tmp_path / "a.png")
    pred = levit.deploy(model, backend="eager", precision="bf16", calibration=[tmp_path / "a.png"], batch_size=2)
    assert pred(torch.zeros(3, 3, 64, 48)).shape == (3, model.config.num_classes)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 48\)"):
        pred(torch.zeros(1, 3, 48, 64))
    with pytest.raises(DeployError, match="48x64, the model takes 64x48"):
        levit.deploy(model, backend="eager", precision="bf16", calibration=torch.zeros(2, 3, 48, 64))
