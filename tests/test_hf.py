"""Hugging Face transformers LeViT checkpoints in and out, checked against transformers' own model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FUSE_TOL, randomize_weights, rel_l2_error, sample_images

import levit
from levit.errors import CheckpointError
from levit.models.config import get_config
from levit.weights.format import read_metadata
from levit.weights.hf import hf_config_dict, levit_to_hf_state_dict, save_hf_pretrained

transformers = pytest.importorskip("transformers")


def _hf_config(name: str, num_labels: int = 10, **kw):
    c = get_config(name)
    return transformers.LevitConfig(
        image_size=c.img_size,
        hidden_sizes=list(c.embed_dim),
        num_attention_heads=list(c.num_heads),
        depths=list(c.depth),
        key_dim=[c.key_dim] * c.num_stages,
        num_labels=num_labels,
        **kw,
    )


def _randomised(module, seed=0):
    """Realistic BN statistics, bias tables of a trained model's magnitude (randomize_weights) and
    non-zero classifier biases: a fresh model hides mapping errors. The bias tables are left as drawn:
    redrawn after the calibration pass they no longer fit the BN statistics, and the model turns
    chaotic (fp32 vs float64 logits ~10% apart on levit_128s), so no fp32 comparison could pass."""
    randomize_weights(module, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("linear.bias"):  # the classifiers (after the last BN: statistics unaffected)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    # transformers' LeViT caches the gathered biases in eval mode (randomize_weights' calibration pass
    # filled that cache); switching to training mode clears it, so no stale table can be served
    return module.train().eval()


def _close(a, b, tol=1e-5):
    assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()


def _image(size=224):
    return sample_images(2, size, seed=7)  # photo-like: the inputs the randomised BN statistics fit


@pytest.mark.parametrize("name", ["levit_tiny", "levit_128s"])
def test_save_pretrained_folder_loads_with_equal_logits(name, tmp_path):
    hf = _randomised(transformers.LevitForImageClassificationWithTeacher(_hf_config(name)))
    hf.save_pretrained(tmp_path)
    assert read_metadata(tmp_path)["variant"] == name  # config.json names the variant: --model may be omitted
    model = levit.create_model(name, checkpoint=tmp_path).eval()
    assert model.config.num_classes == 10 and model.config.distillation
    x = _image(get_config(name).img_size)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
        _close(model(x), want)
        # fused inference too (heads merged like the teacher average), at the fusion checks' tolerance
        assert rel_l2_error(levit.fuse(model)(x), want) <= FUSE_TOL


def test_weight_files_without_config_and_back_to_hf(tmp_path):
    hf = _randomised(transformers.LevitForImageClassificationWithTeacher(_hf_config("levit_tiny")), seed=4)
    x = _image(224)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    from safetensors.torch import save_file

    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    for f in ("pytorch_model.bin", "model.safetensors"):  # no config.json: variant from the tensor shapes
        model = levit.create_model("levit_tiny", checkpoint=tmp_path / f).eval()
        with torch.no_grad():
            _close(model(x), want)
    # levit -> transformers: a strict load into a fresh HF model, and a from_pretrained folder
    fresh = transformers.LevitForImageClassificationWithTeacher(_hf_config("levit_tiny")).eval()
    fresh.load_state_dict(levit_to_hf_state_dict(model), strict=True)
    out = save_hf_pretrained(model, tmp_path / "exported")
    reloaded = transformers.LevitForImageClassificationWithTeacher.from_pretrained(out).eval()
    with torch.no_grad():
        _close(fresh(pixel_values=x).logits, want)
        _close(reloaded(pixel_values=x).logits, want)
    assert json.loads((out / "config.json").read_text())["hidden_sizes"] == [32, 48, 64]


def test_without_teacher_and_base_model(tmp_path):
    hf = _randomised(transformers.LevitForImageClassification(_hf_config("levit_tiny", num_labels=5)), seed=2)
    hf.save_pretrained(tmp_path / "cls")
    model = levit.create_model("levit_tiny", checkpoint=tmp_path / "cls").eval()
    assert model.head_dist is None and model.num_classes == 5
    x = _image(224)
    with torch.no_grad():
        _close(model(x), hf(pixel_values=x).logits)
    base = hf.levit  # LevitModel: no classifier, no "levit." prefix -> pooled features
    torch.save(base.state_dict(), tmp_path / "base.bin")
    feats = levit.create_model("levit_tiny", checkpoint=tmp_path / "base.bin").eval()
    assert feats.num_classes == 0
    with torch.no_grad():
        _close(feats(x), base(pixel_values=x).pooler_output)


def test_hf_errors_name_the_problem(tmp_path):
    hf = transformers.LevitForImageClassificationWithTeacher(_hf_config("levit_tiny"))
    hf.save_pretrained(tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="holds levit_tiny, but model levit_128s"):
        levit.create_model("levit_128s", checkpoint=tmp_path / "tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: a folder, but it holds no model.safetensors"):
        levit.create_model("levit_tiny", checkpoint=tmp_path / "empty")
    conf = json.loads((tmp_path / "tiny" / "config.json").read_text())
    conf["hidden_sizes"] = [40, 48, 64]
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="is not one of the levit variants"):
        levit.create_model("levit_tiny", checkpoint=tmp_path / "tiny")


def test_config_json_matches_transformers_defaults_for_the_paper_variants():
    # transformers' LevitConfig derives down_ops from the dims: ours must agree for every variant
    for name in ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]:
        ours = hf_config_dict(get_config(name))
        theirs = _hf_config(name).to_dict()
        for key in ("hidden_sizes", "num_attention_heads", "depths", "key_dim", "down_ops", "mlp_ratio"):
            assert list(ours[key]) == [list(v) if isinstance(v, tuple) else v for v in theirs[key]], (name, key)


def test_cli_reads_the_variant_and_labels_from_config_json(tmp_path, capsys):
    from PIL import Image

    from levit.cli import main

    labels = {0: "cat", 1: "dog", 2: "fox"}
    conf = _hf_config("levit_tiny", num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    hf = _randomised(transformers.LevitForImageClassificationWithTeacher(conf), seed=5)
    hf.save_pretrained(tmp_path / "hf")
    Image.new("RGB", (80, 70), (120, 30, 200)).save(tmp_path / "x.jpg")
    try:
        main(["predict", str(tmp_path / "x.jpg"), "-c", str(tmp_path / "hf"), "--topk", "3"])  # no --model
    except SystemExit as e:
        assert e.code in (0, None)
    out = capsys.readouterr().out
    assert all(name in out for name in labels.values())
