"""`levit biases`: the attention-bias tables as (head, |dy|, |dx|) arrays and one PNG."""

from __future__ import annotations

import numpy as np
import torch
from helpers import tiny_model
from PIL import Image

import levit
from levit.cli import main
from levit.paper.attention_biases import attention_biases


def _known(tmp_path):
    """levit_tiny at 64px (token grids 4, 2, 1) with two bias tables set to a recognisable pattern."""
    torch.manual_seed(0)
    model = tiny_model(num_classes=3)
    r = 4
    pattern = torch.tensor([[100.0 * dy + dx for dx in range(r)] for dy in range(r)])
    with torch.no_grad():
        model.stages[0].blocks[0].attn.attention_biases[1] = pattern.flatten()  # block 0, head 1
        model.stages[1].downsample.attn.attention_biases[2] = -pattern.flatten()  # shrink into stage 1, head 2
    path = tmp_path / "known.safetensors"
    levit.save(model, path)
    return model, path, pattern.numpy()


def test_biases_command_puts_the_pattern_at_the_right_offsets(tmp_path):
    model, ckpt, pattern = _known(tmp_path)
    png = tmp_path / "b.png"
    assert main(["biases", "--checkpoint", str(ckpt), "--output", str(png)]) == 0
    arrays = np.load(tmp_path / "b.npz")
    assert list(arrays.keys()) == ["stage0.block0", "stage1.shrink", "stage1.block0", "stage2.shrink", "stage2.block0"]
    a = arrays["stage0.block0"]
    assert a.shape == (model.config.num_heads[0], 4, 4)
    np.testing.assert_array_equal(a[1], pattern)  # a[h, dy, dx]
    assert a[1, 3, 0] == 300 and a[1, 0, 3] == 3  # dy first, dx second
    assert not np.allclose(a[0], pattern)  # only head 1 carries it
    s = arrays["stage1.shrink"]
    assert s.shape == (model.config.shrink_heads[0], 4, 4)
    np.testing.assert_array_equal(s[2], -pattern)
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


def test_fused_model_gives_the_same_tables(tmp_path):
    model, _, _ = _known(tmp_path)
    ours, fused = attention_biases(model), attention_biases(levit.fuse(model))
    assert ours.keys() == fused.keys()
    for k in ours:
        np.testing.assert_allclose(fused[k], ours[k], rtol=1e-6, atol=1e-5)


def test_resampled_to_another_resolution(tmp_path):
    _, ckpt, _ = _known(tmp_path)
    png = tmp_path / "b128.png"
    assert main(["biases", "--checkpoint", str(ckpt), "--img-size", "128", "--output", str(png)]) == 0
    a = np.load(tmp_path / "b128.npz")["stage0.block0"]
    assert a.shape[1:] == (8, 8)  # 128 px: 8x8 tokens, offsets 0..7
    # the pattern grows with dy and dx: a resampled table keeps that ordering
    assert a[1, -1, 0] > a[1, 0, -1] > a[1, 0, 0]
    assert png.is_file()


def test_biases_errors(tmp_path, capsys):
    _, ckpt, _ = _known(tmp_path)
    assert main(["biases", "--checkpoint", str(ckpt), "--output", str(tmp_path / "b.jpg")]) == 2
    assert "expected a .png" in capsys.readouterr().err
    a5 = levit.create_model("levit_tiny", ablation="A5", img_size=32)
    levit.save(a5, tmp_path / "a5.safetensors")
    assert main(["biases", "--checkpoint", str(tmp_path / "a5.safetensors"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "has no attention biases" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.npz").exists()


def test_library_function_shapes():
    model = levit.create_model("levit_tiny", img_size=64)
    cfg = model.config
    tables = attention_biases(model)
    assert len(tables) == sum(cfg.depth) + cfg.num_stages - 1
    assert tables["stage2.block0"].shape == (cfg.num_heads[2], 1, 1)


def test_draw_biases_writes_the_picture_and_the_arrays_beside_it(tmp_path):
    from levit.paper.attention_biases import draw_biases

    model, _, pattern = _known(tmp_path)
    png, npz, layers = draw_biases(model, tmp_path / "pics" / "b.png")
    assert png == tmp_path / "pics" / "b.png" and npz == tmp_path / "pics" / "b.npz"
    assert layers == len(attention_biases(model)) == len(np.load(npz).files)
    np.testing.assert_array_equal(np.load(npz)["stage0.block0"][1], pattern)
    with Image.open(png) as im:
        assert im.format == "PNG"
