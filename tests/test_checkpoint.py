"""Checkpoint formats, conversion, errors and the pretrained download."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import warnings
from pathlib import Path

import pytest
import torch
from helpers import randomize_weights, rel_l2_error, tiny_model
from safetensors.torch import save_file

import levit
from levit.errors import CheckpointError
from levit.models.fuse import FusedLeViT
from levit.weights.convert import to_official_state_dict, to_timm_state_dict
from levit.weights.format import read_metadata
from levit.weights.hub import download_checkpoint

X = torch.randn(2, 3, 64, 64)


def _out(model):
    with torch.no_grad():
        return model.eval()(X)


def _tiny(**kw):
    return levit.create_model("levit_tiny", img_size=64, **kw)


@pytest.mark.parametrize("fmt", ["official", "timm-pth", "timm-bare-pth", "timm-safetensors", "levit", "levit-fused"])
def test_every_format_round_trips(tiny, tmp_path, fmt):
    path = tmp_path / f"ckpt.{'safetensors' if 'safetensors' in fmt or 'levit' in fmt else 'pth'}"
    if fmt == "official":
        torch.save({"model": to_official_state_dict(tiny)}, path)
    elif fmt == "timm-pth":
        torch.save({"state_dict": to_timm_state_dict(tiny)}, path)
    elif fmt == "timm-bare-pth":
        torch.save(to_timm_state_dict(tiny), path)
    elif fmt == "timm-safetensors":
        save_file({k: v.contiguous() for k, v in to_timm_state_dict(tiny).items()}, path)
    elif fmt == "levit":
        levit.save(tiny, path)
    else:
        levit.save(levit.fuse(tiny), path)
    loaded = levit.create_model("levit_tiny", img_size=64, checkpoint=path)
    assert isinstance(loaded, FusedLeViT) == (fmt == "levit-fused")
    assert rel_l2_error(_out(loaded), _out(tiny)) <= (1e-5 if fmt == "levit-fused" else 0.0)


def test_own_format_describes_itself(tiny, tmp_path):
    tiny.class_names = [f"digit {i}" for i in range(1000)]
    path = levit.save(tiny, tmp_path / "sub" / "m.safetensors")
    meta = read_metadata(path)
    assert meta["format_version"] == 1 and meta["variant"] == "levit_tiny" and meta["fused"] is False
    assert meta["config"]["img_size"] == 64 and meta["config"]["embed_dim"] == [32, 48, 64]
    # the saved config is the base: no need to repeat img_size, class names come back
    loaded = levit.create_model("levit_tiny", checkpoint=path)
    assert loaded.config == tiny.config and loaded.class_names[3] == "digit 3"
    assert not list(path.parent.glob("*.tmp"))


def test_other_num_classes_reinitialises_only_the_heads(tiny, tmp_path):
    path = levit.save(tiny, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="checkpoint has 1000 classes, model has 10: the classifier head"):
        model = levit.create_model("levit_tiny", checkpoint=path, num_classes=10)
    assert model.head.linear.weight.shape == (10, 64)
    sd, ref = model.state_dict(), tiny.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in sd if not k.startswith("head"))


def test_distillation_head_dropped_or_copied(tiny, tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": to_official_state_dict(tiny)}, path)
    with pytest.warns(UserWarning, match="head_dist dropped"):
        single = levit.create_model("levit_tiny", img_size=64, distillation=False, checkpoint=path)
    assert single.head_dist is None
    torch.testing.assert_close(single.head.linear.weight, tiny.head.linear.weight)
    path2 = levit.save(single, tmp_path / "single.safetensors")
    with pytest.warns(UserWarning, match="no head_dist: it starts as a copy of head"):
        both = levit.create_model("levit_tiny", checkpoint=path2, distillation=True)
    torch.testing.assert_close(both.head_dist.linear.weight, both.head.linear.weight)


def test_other_resolution_resamples_bias_tables(tmp_path):
    model = randomize_weights(levit.create_model("levit_128s"), seed=2)
    path = tmp_path / "official.pth"
    torch.save({"model": to_official_state_dict(model)}, path)
    big = levit.create_model("levit_128s", checkpoint=path, img_size=288)
    assert big.config.resolutions == (18, 9, 5)
    t = big.stages[0].blocks[0].attn.attention_biases
    assert t.shape == (4, 18 * 18)
    src = model.stages[0].blocks[0].attn.attention_biases
    # offset 0 and the largest offset keep their values (align_corners resampling)
    torch.testing.assert_close(t[:, 0], src[:, 0])
    torch.testing.assert_close(t[:, -1], src[:, -1])
    with torch.no_grad():
        out = big.eval()(torch.randn(1, 3, 288, 288))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ---- errors ------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*nope\.pth"):
        _tiny(checkpoint=tmp_path / "nope.pth")


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_truncated_file(tiny, tmp_path, suffix):
    path = tmp_path / f"m.{suffix}"
    if suffix == "pth":
        torch.save({"model": to_official_state_dict(tiny)}, path)
    else:
        levit.save(tiny, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"m\.\w+: cannot read it as a checkpoint: truncated, corrupt, or not a torch"
    ):
        _tiny(checkpoint=path)


def test_not_a_levit_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"resnet\.pth: not a LeViT checkpoint .*first key is 'conv1.weight'"):
        _tiny(checkpoint=path)
    text = tmp_path / "notes.txt"
    text.write_text("hello world, not weights")
    with pytest.raises(CheckpointError, match=r"notes\.txt: cannot read it as a checkpoint"):
        _tiny(checkpoint=text)


def test_wrong_variant_names_the_first_mismatching_tensor(tmp_path):
    with torch.device("cpu"):
        big = levit.create_model("levit_128")
    path = tmp_path / "LeViT-128.pth"
    torch.save({"model": to_official_state_dict(big)}, path)
    with pytest.raises(CheckpointError) as e:
        levit.create_model("levit_128s", checkpoint=path)
    msg = str(e.value)
    assert msg.endswith(
        "LeViT-128.pth: checkpoint does not fit levit_128s: first mismatch is 'blocks.4.m.attention_biases' (4, 196)"
        " in the checkpoint vs 'blocks.4.attention_biases' (8, 196) in the model; the file holds levit_128"
    )
    assert "\n" not in msg
    timm_file = tmp_path / "timm.pth"
    torch.save(to_timm_state_dict(levit.create_model("levit_192")), timm_file)
    with pytest.raises(
        CheckpointError,
        match=r"first mismatch is 'stem.conv1.linear.weight' \(24, 3, 3, 3\) in the "
        r"checkpoint vs \(16, 3, 3, 3\) in the model; the file holds levit_192",
    ):
        levit.create_model("levit_128s", checkpoint=timm_file)
    own = levit.save(big, tmp_path / "own.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint holds levit_128, but model levit_128s was asked for"):
        levit.create_model("levit_128s", checkpoint=own)


def test_checkpoint_and_pretrained_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either checkpoint"):
        _tiny(checkpoint=tmp_path / "x.pth", pretrained=True)
    with pytest.raises(CheckpointError, match="no released weights for levit_tiny"):
        _tiny(pretrained=True)


# ---- download ----------------------------------------------------------------------------------
class _Server:
    def __init__(self, root: Path):
        hits = self.hits = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def do_GET(self):
                hits.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tiny, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    src = root / "tmp.pth"
    torch.save({"model": to_official_state_dict(tiny)}, src)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    good = src.rename(root / f"LeViT-tiny-{sha[:8]}.pth")
    (root / "LeViT-bad-00000000.pth").write_bytes(good.read_bytes())
    server = _Server(root)
    yield server, good.name
    server.close()


def test_download_verifies_hash_and_reuses_cache(served, tmp_path, tiny, monkeypatch):
    server, name = served
    cache = tmp_path / "cache"
    path = download_checkpoint(f"{server.url}/{name}", cache, progress=False)
    assert path == cache / name and path.is_file()
    assert download_checkpoint(f"{server.url}/{name}", cache, progress=False) == path
    assert server.hits == [f"/{name}"]  # fetched once, then reused

    with pytest.raises(CheckpointError, match=r"LeViT-bad-00000000\.pth has SHA-256 .*expected 00000000"):
        download_checkpoint(f"{server.url}/LeViT-bad-00000000.pth", cache, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [name]  # nothing half-written left

    # create_model(pretrained=True) through a mirror, into the torch hub cache
    from levit.models import config

    monkeypatch.setitem(config.PAPER_RESULTS, "levit_tiny", config.PaperResult(0, 0, 0, 0, 0, f"https://x/{name}"))
    monkeypatch.setenv("LEVIT_PRETRAINED_URL", server.url)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = levit.create_model("levit_tiny", img_size=64, pretrained=True)
    assert (tmp_path / "hub" / "checkpoints" / name).is_file()
    assert rel_l2_error(_out(model), _out(tiny)) == 0.0


def test_offline_download_says_where_to_put_the_file(tmp_path):
    server = _Server(tmp_path)
    url = server.url
    server.close()  # nothing listens any more
    with pytest.raises(CheckpointError) as e:
        download_checkpoint(f"{url}/LeViT-128S-96703c44.pth", tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "cannot download" in msg and str(tmp_path / "cache" / "LeViT-128S-96703c44.pth") in msg
    assert "--checkpoint PATH" in msg
    assert not (tmp_path / "cache" / "LeViT-128S-96703c44.pth.partial").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_weights_are_refused_with_name_and_dtype(tiny, tmp_path, dtype):
    sd = {k: v.contiguous() for k, v in to_timm_state_dict(tiny).items()}
    sd["stages.0.blocks.0.attn.qkv.linear.weight"] = sd["stages.0.blocks.0.attn.qkv.linear.weight"].to(dtype)
    path = tmp_path / "ints.safetensors"
    save_file(sd, path)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"'stages.0.blocks.0.attn.qkv.linear.weight' has dtype {name}"):
        _tiny(checkpoint=path)


def test_integer_index_buffers_of_official_files_still_load(tiny, tmp_path):
    sd = to_official_state_dict(tiny)
    assert sd["blocks.0.m.attention_bias_idxs"].dtype == torch.int64
    path = tmp_path / "official.pth"
    torch.save({"model": sd}, path)
    assert rel_l2_error(_out(_tiny(checkpoint=path)), _out(tiny)) == 0.0


def test_one_unwrapper_for_every_wrapper_and_flag_named_errors(tiny, tmp_path):
    from levit.weights.format import read_checkpoint, unwrap_state_dict

    sd = to_timm_state_dict(tiny)
    for key in ("model", "state_dict", "model_state_dict", "state_dict_ema"):
        got, _ = unwrap_state_dict({key: {"module." + k: v for k, v in sd.items()}, "epoch": 3})
        assert got.keys() == sd.keys()
    assert unwrap_state_dict({"epoch": 3}) == (None, None)
    bad = tmp_path / "epoch.pth"
    torch.save({"epoch": 3}, bad)
    with pytest.raises(CheckpointError, match=r"^--teacher-checkpoint: .*epoch\.pth: no state dict of tensors"):
        read_checkpoint(bad, flag="--teacher-checkpoint")


def test_save_is_atomic_and_uses_the_umask(tiny, tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        path = levit.save(tiny, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_file_put_in_the_cache_by_hand_is_hash_checked(tmp_path, tiny):
    cache = tmp_path / "cache"
    cache.mkdir()
    fake = cache / "LeViT-128S-96703c44.pth"
    torch.save({"model": to_official_state_dict(tiny)}, fake)  # random weights under the release's name
    with pytest.raises(CheckpointError) as e:
        download_checkpoint("https://example.invalid/LeViT-128S-96703c44.pth", cache, progress=False)
    msg = str(e.value)
    actual = hashlib.sha256(fake.read_bytes()).hexdigest()
    assert str(fake) in msg and actual[:12] in msg and "expected 96703c44" in msg and "\n" not in msg
    assert fake.exists()  # the user's file is reported, not deleted


def test_preprocessing_travels_with_the_weights(tmp_path):
    """A training run's evaluation crop (its checkpoint's ``eval``) becomes the model's pretrained_cfg
    and survives levit.save, fusing and reloading, so `levit eval` on a re-saved file crops the same."""
    from train_utils import cli, make_folder

    from levit.weights.format import build_metadata

    tiny = tiny_model(seed=1, num_classes=2)
    run_file = tmp_path / "best.pth"  # as a training run writes it
    torch.save(
        {"model": tiny.state_dict(), "levit": build_metadata(tiny, eval={"img_size": 64, "crop_pct": 1.0})}, run_file
    )
    assert levit.create_model("levit_tiny", checkpoint=run_file).pretrained_cfg["crop_pct"] == 1.0
    resaved = levit.save(levit.create_model("levit_tiny", checkpoint=run_file), tmp_path / "re.safetensors")
    assert read_metadata(resaved)["pretrained_cfg"]["crop_pct"] == 1.0
    fused = levit.save(levit.fuse(levit.create_model("levit_tiny", checkpoint=resaved)), tmp_path / "f.safetensors")
    loaded = levit.create_model("levit_tiny", checkpoint=fused)
    assert loaded.is_fused and loaded.pretrained_cfg["crop_pct"] == 1.0
    assert (
        levit.create_model("levit_tiny", checkpoint=levit.save(tiny, tmp_path / "plain.safetensors")).pretrained_cfg[
            "crop_pct"
        ]
        == 0.875
    )
    data = make_folder(tmp_path / "val", {"a": 2, "b": 2}, size=80)
    crops = {}
    for f in (run_file, resaved, fused):
        out = tmp_path / f"{f.stem}.json"
        assert cli("eval", "--data", data, "-c", f, "--workers", "0", "--output", out).returncode == 0
        crops[f.stem] = json.loads(out.read_text())
    assert {r["crop_pct"] for r in crops.values()} == {1.0}
    assert crops["re"]["loss"] == pytest.approx(crops["best"]["loss"], abs=1e-6)  # same weights, same numbers
