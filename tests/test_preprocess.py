"""One preprocessing, from the model: a checkpoint's own crop, interpolation, mean and std reach every
way in (the library, ``levit predict``, ``levit eval``) and give the tensors an independent
implementation of the same recipe gives (timm's ``resolve_data_config`` + ``create_transform``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import randomize_weights, write_sample_jpegs

import levit
from levit.cli import main
from levit.data.preprocess import Preprocess

# not the authors' evaluation (0.875, bicubic, ImageNet mean/std): a fine-tune's own recipe
OWN = {"crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
RECIPES = [
    {},  # the authors'
    OWN,
    {"crop_pct": 0.95, "interpolation": "bilinear", "mean": (0.45, 0.45, 0.45), "std": (0.2, 0.3, 0.25)},
    {"crop_pct": 0.9, "crop_mode": "squash"},
]


def _model(recipe: dict) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = randomize_weights(levit.create_model("levit_tiny", img_size=64, num_classes=10), seed=3).eval()
    m.class_names = [f"thing{i}" for i in range(10)]
    m.pretrained_cfg = {**m.pretrained_cfg, **recipe}
    return m


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photo-like JPEGs, landscape and portrait, so that the crop decides what the model sees."""
    d = tmp_path_factory.mktemp("photos")
    write_sample_jpegs(d, 4, (90, 150), seed=1)
    write_sample_jpegs(d, 4, (160, 100), seed=7, prefix="tall")
    return sorted(d.glob("*.jpg"))


@pytest.mark.parametrize("recipe", RECIPES, ids=["authors", "own", "bilinear", "squash"])
def test_a_saved_recipe_gives_timms_tensors_bit_for_bit(recipe, photos, tmp_path):
    """Saved, loaded, and read by timm's own data config: the same tensors as ``Preprocess.from_model``."""
    from timm.data import create_transform, resolve_data_config

    from levit.data.images import open_rgb

    loaded = levit.create_model("levit_tiny", checkpoint=levit.save(_model(recipe), tmp_path / "m.safetensors"))
    assert {k: loaded.pretrained_cfg[k] for k in recipe} == recipe  # the recipe survives the file
    pre = Preprocess.from_model(loaded)
    timm_tf = create_transform(**resolve_data_config({}, model=loaded))
    for f in photos:
        assert torch.equal(pre(f), timm_tf(open_rgb(f))), f.name
    if recipe:  # and it is not the authors' recipe under another name
        assert not torch.equal(pre(photos[0]), Preprocess(64)(photos[0]))


def test_overrides_replace_the_models_values_and_none_keeps_them():
    m = _model(OWN)
    assert (
        Preprocess.from_model(m).settings() | {"max_pixels": None} == Preprocess(64, **OWN, max_pixels=None).settings()
    )
    pre = Preprocess.from_model(m, crop_pct=0.5, mean=None)
    assert (pre.crop_pct, pre.mean, pre.std) == (0.5, OWN["mean"], OWN["std"])
    with pytest.raises(TypeError, match="unknown preprocessing setting"):
        Preprocess.from_model(m, crop=0.5)
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
        Preprocess.from_model(m, crop_pct=1.5)


@pytest.fixture(scope="module")
def own(tmp_path_factory, photos):
    """A checkpoint with its own recipe, and what that recipe gives on ``photos`` (fused model)."""
    m = _model(OWN)
    ckpt = levit.save(m, tmp_path_factory.mktemp("ckpt") / "own.safetensors")
    pre = Preprocess(64, **OWN)
    with torch.no_grad():
        fused = levit.fuse(m)
        logits = fused(torch.stack([pre(f) for f in photos]))
        authors = fused(torch.stack([Preprocess(64)(f) for f in photos]))
    assert (logits.argmax(-1) != authors.argmax(-1)).any()  # the recipe changes answers on these photos
    return ckpt, logits


def test_levit_predict_uses_the_checkpoints_recipe(own, photos, capsys):
    ckpt, logits = own
    assert main(["predict", *map(str, photos), "-c", str(ckpt), "--topk", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = logits.softmax(-1).topk(5)
    assert [r["path"] for r in rows] == list(map(str, photos))
    assert [[t["class"] for t in r["top"]] for r in rows] == want.indices.tolist()
    got = [t["prob"] for r in rows for t in r["top"]]
    assert got == pytest.approx(want.values.flatten().tolist(), abs=2e-6)


def test_levit_eval_uses_the_checkpoints_recipe(own, photos, tmp_path, capsys):
    """The loss of ``levit eval`` is the cross-entropy of the recipe's logits: the same tensors."""
    ckpt, logits = own
    labels = [i % 10 for i in range(len(photos))]
    for f, c in zip(photos, labels):
        (tmp_path / "val" / f"thing{c}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / f"thing{c}" / f.name).write_bytes(f.read_bytes())
    order = sorted(range(len(photos)), key=lambda i: (f"thing{labels[i]}", photos[i].name))
    out = tmp_path / "eval.json"
    argv = ["eval", "--data", str(tmp_path / "val"), "-c", str(ckpt), "--workers", "0", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    want = torch.nn.functional.cross_entropy(logits[order], torch.tensor([labels[i] for i in order])).item()
    assert result["crop_pct"] == 1.0 and math.isclose(result["loss"], want, rel_tol=1e-5)
    assert "top-1" in capsys.readouterr().out


def test_a_job_leaves_the_callers_model_as_it_was(photos):
    """The pipeline runs the inference form: an unfused model is not fused in place, a fused one in
    training mode is not switched to eval mode (the job runs a copy)."""
    from levit.runtime.predict import predict_paths

    unfused, fused = _model(OWN), levit.fuse(_model(OWN)).train()
    for m in (unfused, fused):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        mode = m.training
        rows = predict_paths(m, photos[:2], topk=1, progress=False, workers=0, threads=1)
        assert len(rows) == 2 and m.training == mode
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert not unfused.is_fused


def test_a_reduced_precision_without_a_backend_gets_the_fastest_that_has_it():
    from levit.runtime.options import OptionError, PredictOptions

    assert PredictOptions().backend == "eager" and not PredictOptions().uses_runtime
    assert PredictOptions(precision="int8").backend == "auto"
    assert PredictOptions(precision="bf16", backend="openvino").backend == "openvino"
    with pytest.raises(OptionError, match=r"^crop_pct must be in \(0, 1\]") as e:
        PredictOptions(crop_pct=0)
    assert e.value.as_flags() == "--crop-pct must be in (0, 1], got 0"


def test_an_extreme_aspect_ratio_costs_no_more_than_a_photo(tmp_path):
    """A 1 x 8000 strip would resize to 256 x 2,048,000 pixels before the centre crop: cropped to
    MAX_ASPECT first, it costs megabytes, in a fresh process as `levit predict` would run it."""
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (8000, 1), (120, 130, 140)).save(tmp_path / "strip.png")
    code = (
        "import resource, sys\n"
        "from levit.data.preprocess import Preprocess\n"
        "pre = Preprocess(224)\n"
        "pre(sys.argv[1] + '/small.png')\n"  # everything imported and warmed up
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "x = pre(sys.argv[1] + '/strip.png')\n"
        "print(x.shape[1:], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "small.png")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    shape, grown_mb = out.stdout.rsplit(" ", 1)
    assert shape == "torch.Size([224, 224])" and int(grown_mb) < 50, out.stdout


@pytest.mark.parametrize("size", [(2000, 10), (10, 2000), (3000, 17)])
def test_the_bound_keeps_what_the_crop_sees(size):
    """Cropping a long strip before the resize changes the model's input by at most a rounding step,
    and an image within the ratio is passed through untouched."""
    import numpy as np
    from PIL import Image

    from levit.data.preprocess import MAX_ASPECT

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, max(size))[None, :, None]
    pixels = (ramp + rng.normal(0, 20, (1, max(size), 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(pixels, (min(size), max(size), 3)).copy())
    img = img if size[0] > size[1] else img.transpose(Image.Transpose.ROTATE_90)
    pre = Preprocess(224)
    bounded = pre.bounded(img)
    assert max(bounded.size) == MAX_ASPECT * min(bounded.size) < max(img.size)
    diff = (pre.transform(img) - pre.transform(bounded)).abs()
    assert diff.max() <= 2 / 255 / min(pre.std)  # one or two 8-bit levels, normalised
    photo = Image.new("RGB", (MAX_ASPECT * 20, 20))
    assert pre.bounded(photo) is photo


# ---- the tensor decoder: equal to the pil path but for 8-bit rounding; Pillow for everything else ----
ONE_LEVEL = 1 / 255 / 0.224 + 1e-6  # one 8-bit step, in the normalised units of the smallest ImageNet std


@pytest.mark.parametrize("recipe", RECIPES, ids=["authors", "own", "bilinear", "squash"])
def test_the_tensor_decoder_gives_the_pil_tensors_but_for_rounding(recipe, photos):
    m = _model(recipe)
    pil, tensor = Preprocess.from_model(m), Preprocess.from_model(m, decoder="tensor")
    a, b = torch.stack([pil(f) for f in photos]), torch.stack([tensor(f) for f in photos])
    assert (a - b).abs().max() <= ONE_LEVEL / min(pil.std) * 0.224 and (a - b).abs().mean() < ONE_LEVEL / 4
    with torch.no_grad():
        fused = levit.fuse(m)
        assert torch.equal(fused(a).argmax(-1), fused(b).argmax(-1))


def test_the_tensor_decoder_leaves_other_files_to_pillow(tmp_path, photos):
    """16-bit PNGs, palette and grey images, drafted JPEGs and bad files: the pil path's pixels
    (through Pillow) and its one-line reasons."""
    import numpy as np
    from PIL import Image

    from levit.errors import ImageError

    rng = np.random.default_rng(0)
    ramp = (np.linspace(0, 60000, 90)[None, :] + rng.integers(0, 3000, (70, 90))).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    Image.open(photos[0]).convert("P").save(tmp_path / "palette.png")
    Image.open(photos[1]).convert("L").save(tmp_path / "grey.jpg")
    whole = photos[2].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("a text file named like a photo\n")
    pil, tensor = Preprocess(64), Preprocess(64, decoder="tensor")
    for name in ("grey16.png", "palette.png", "grey.jpg"):
        assert (pil(tmp_path / name) - tensor(tmp_path / name)).abs().max() <= ONE_LEVEL, name
    fast_pil, fast_tensor = Preprocess(64, fast_decode=True), Preprocess(64, fast_decode=True, decoder="tensor")
    assert (fast_pil(photos[0]) - fast_tensor(photos[0])).abs().max() <= ONE_LEVEL
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        with pytest.raises(ImageError) as want:
            pil(tmp_path / name)
        with pytest.raises(ImageError) as got:
            tensor(tmp_path / name)
        assert got.value.reason == want.value.reason
    with pytest.raises(ImageError, match="over the limit of 100"):
        Preprocess(64, decoder="tensor", max_pixels=100)(photos[0])
    assert torch.equal(tensor(photos[3]), tensor(photos[3].read_bytes()))  # bytes as files


def test_torchvision_decodes_where_torchcodec_is_missing(monkeypatch, photos):
    """The tensor path's decoder: TorchCodec where installed, torchvision's otherwise; the same pixels."""
    import sys

    from levit.data import decoders

    data = torch.frombuffer(bytearray(photos[0].read_bytes()), dtype=torch.uint8)
    first = decoders._decoder()
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # import fails: not installed
    name, decode = decoders._decoder()
    assert name == "torchvision" and torch.equal(decode(data), first[1](data))


def test_predict_and_eval_take_the_decoder_flag(own, photos, tmp_path, capsys):
    ckpt, logits = own
    assert main(["predict", *map(str, photos), "-c", str(ckpt), "--topk", "1", "--json", "--decoder", "tensor"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["top"][0]["class"] for r in rows] == logits.argmax(-1).tolist()
    (tmp_path / "val" / "thing0").mkdir(parents=True)
    for f in photos:
        (tmp_path / "val" / "thing0" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "eval.json"
    argv = ["eval", "--data", str(tmp_path / "val"), "-c", str(ckpt), "--workers", "0", "--output", str(out)]
    assert main([*argv, "--decoder", "tensor"]) == 0
    want = torch.nn.functional.cross_entropy(logits, torch.zeros(len(photos), dtype=torch.long)).item()
    assert math.isclose(json.loads(out.read_text())["loss"], want, rel_tol=1e-2)
    assert main(["predict", str(photos[0]), "-c", str(ckpt), "--decoder", "simd"]) == 2


def test_a_pipe_named_like_a_photo_is_an_error_row_not_a_hang(tmp_path, photos):
    """A FIFO with no writer (reading it would wait forever) swapped in for a photo after the files
    were listed: one error row within a bounded time, with both decoders; the other image classified."""
    import os
    import threading

    from levit.runtime.pipeline import iter_batches

    (tmp_path / "a.jpg").write_bytes(photos[0].read_bytes())
    os.mkfifo(tmp_path / "b.jpg")
    m, files, rows = _model({}), [tmp_path / "a.jpg", tmp_path / "b.jpg"], []

    def job() -> None:
        for decoder in ("pil", "tensor"):
            for batch in iter_batches(m, files, topk=1, workers=0, threads=1, decoder=decoder):
                rows.extend((r["path"].rsplit("/", 1)[-1], r["error"]) for r in batch)

    worker = threading.Thread(target=job, daemon=True)  # a hang leaves only a daemon thread behind
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "reading a pipe blocked"
    pipe = "not a regular file (a pipe, socket or device), not an image file"
    assert rows == [("a.jpg", None), ("b.jpg", pipe)] * 2


@pytest.mark.parametrize("workers", [0, 2], ids=["lanes", "decoding-processes"])
def test_pixel_batches_normalised_where_the_model_runs_give_the_same_rows(photos, workers, monkeypatch):
    """A GPU's layout (uint8 batches, normalised on the device), forced on the CPU: the same logits,
    bit for bit, as batches normalised while decoding, with both decoders."""
    from levit.runtime.pipeline import iter_batches

    batches = []
    normalize = Preprocess.normalize

    def spy(self, x, out=None):
        if x.ndim == 4:  # a whole batch, normalised where the model runs
            batches.append(x.dtype)
        return normalize(self, x, out)

    monkeypatch.setattr(Preprocess, "normalize", spy)
    m = _model(OWN)
    for decoder in ("pil", "tensor"):
        common = dict(topk=3, batch_size=3, workers=workers, threads=2, include_logits=True, decoder=decoder)
        floats = [r for b in iter_batches(m, photos, pixel_batches=False, **common) for r in b]
        assert batches == []
        pixels = [r for b in iter_batches(m, photos, pixel_batches=True, **common) for r in b]
        assert batches and set(batches) == {torch.uint8}
        assert [r["logits"] for r in pixels] == [r["logits"] for r in floats]
        batches.clear()
    pre = Preprocess.from_model(m)
    x = torch.stack([pre.pixels(f) for f in photos])
    assert x.dtype == torch.uint8 and torch.equal(pre.normalize(x), torch.stack([pre(f) for f in photos]))


def test_the_cuda_decoders_batches_on_the_cpu_give_the_tensor_decoders_rows(photos, tmp_path):
    """The ``cuda`` decoder's layout (a batch of JPEGs decoded in one call on the model's device,
    resized there), run on the CPU: the ``tensor`` decoder's logits bit for bit; other formats through
    the CPU path; unreadable files are error rows with the pil path's reasons; ``auto`` on the CPU is pil."""
    from PIL import Image

    from levit.runtime.pipeline import iter_batches

    Image.open(photos[0]).save(tmp_path / "a.png")
    Image.open(photos[1]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    whole = photos[2].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "notes.jpg").write_text("a text file named like a photo\n")
    files = [*photos[:4], tmp_path / "a.png", tmp_path / "cmyk.jpg", tmp_path / "truncated.jpg", tmp_path / "notes.jpg"]
    m = _model(OWN)

    def rows(decoder: str) -> list[dict]:
        opts = dict(topk=2, batch_size=3, workers=0, threads=1, include_logits=True, decoder=decoder)
        return [r for b in iter_batches(m, files, **opts) for r in b]

    cuda, tensor = rows("cuda"), rows("tensor")
    assert [(r["path"], r["error"], r["logits"]) for r in cuda] == [
        (r["path"], r["error"], r["logits"]) for r in tensor
    ]
    assert [r["error"] is None for r in cuda] == [True] * 6 + [False] * 2
    assert [r["logits"] for r in rows("auto")] == [r["logits"] for r in rows("pil")]
