"""The inference pipeline behind `levit predict` (levit.runtime.pipeline, levit.runtime.writers, levit.runtime.predict):
the official preprocessing unchanged, the rows of every output format, resume after a kill, bad
files, and the same rows from Ray Data."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fake_lanes, randomize_weights, write_sample_jpegs
from PIL import Image

import levit
from levit.cli import main
from levit.data.images import open_rgb
from levit.data.preprocess import Preprocess
from levit.data.transforms import eval_transform
from levit.errors import ImageError
from levit.runtime import pipeline
from levit.runtime.pipeline import iter_batches
from levit.runtime.predict import iter_predictions, predict_paths
from levit.runtime.writers import partial_path, read_results

SRC = str(Path(levit.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Photo-like JPEGs of a few sizes, a grey PNG, an RGBA PNG, a 16-bit PNG and three bad files."""
    d = tmp_path_factory.mktemp("photos")
    write_sample_jpegs(d, 6, (90, 120), seed=1)
    write_sample_jpegs(d / "sub", 3, (150, 100), seed=10, prefix="tall")
    rng = np.random.default_rng(0)
    ramp = (np.linspace(0, 255, 80)[None, :] + rng.integers(-20, 20, (60, 80))).clip(0, 255).astype(np.uint8)
    Image.fromarray(ramp).save(d / "grey.png")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(d / "grey16.png")
    Image.fromarray(rng.integers(0, 255, (70, 100, 4), dtype=np.uint8)).save(d / "rgba.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("a text file named like a photo\n")
    whole = (d / "img_00000.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return d


BAD = {"empty.jpg": "empty file", "notes.jpg": "not an image", "truncated.jpg": "truncated image"}


# The model of these tests carries its own preprocessing, not the authors' default: every way in
# (the library, `levit predict`, its checkpoint, Ray) must take it from the model.
OWN_PREPROCESS = {"crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = randomize_weights(levit.create_model("levit_tiny", img_size=64, num_classes=10), seed=3).eval()
    m.class_names = [f"thing {i}" for i in range(10)]
    m.pretrained_cfg = {**m.pretrained_cfg, **OWN_PREPROCESS}
    return m


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    return levit.save(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def reference(model, folder) -> list[dict]:
    """The rows of an uninterrupted run, decoding in this process, one model thread."""
    return list(iter_predictions(model, [folder], topk=3, batch_size=2, workers=0, threads=1))


def _files(folder: Path) -> list[Path]:
    return levit.runtime.predict.list_inputs([folder])


def test_preprocess_is_the_official_eval_transform_exactly(folder):
    """Default Preprocess == eval_transform(open_rgb(file)), bit for bit, on JPEG, grey, RGBA and 16-bit
    PNGs, square and (H, W) sizes, from a path or from bytes, and after pickling (workers, Ray)."""
    for size, crop in ((64, 0.875), ((48, 80), 0.9)):
        pre = Preprocess(size, crop)
        pre2 = pickle.loads(pickle.dumps(pre))
        for f in ("img_00000.jpg", "sub/tall_00001.jpg", "grey.png", "rgba.png", "grey16.png"):
            want = eval_transform(size, crop)(open_rgb(folder / f))
            got = pre(folder / f)
            assert got.dtype == torch.float32 and got.shape == (3, *pre.out_hw)
            assert torch.equal(got, want), f
            assert torch.equal(pre2((folder / f).read_bytes()), want), f
    # the 16-bit PNG is the 8-bit picture: the same tensor
    assert torch.equal(Preprocess(64)(folder / "grey16.png"), Preprocess(64)(folder / "grey.png"))
    m = levit.create_model("levit_tiny", img_size=(48, 80))
    assert Preprocess.from_model(m, crop_pct=0.9).out_hw == (48, 80)


@pytest.mark.parametrize(("name", "reason"), sorted(BAD.items()))
def test_bad_images_raise_one_line_image_errors(folder, name, reason):
    pre = Preprocess(64)
    with pytest.raises(ImageError) as e:
        pre(folder / name)
    assert reason in e.value.reason and str(e.value) == f"{folder / name}: {e.value.reason}"
    assert "\n" not in str(e.value)
    with pytest.raises(ImageError, match=reason):  # the same from bytes, without a file name
        pre((folder / name).read_bytes())
    err = pickle.loads(pickle.dumps(e.value))
    assert (err.reason, err.source) == (e.value.reason, e.value.source)


def test_too_many_pixels_is_refused_before_decoding_without_pillows_warning(folder, monkeypatch):
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 6000)  # Pillow warns from 6,000 pixels, fails from 12,000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with pytest.raises(ImageError, match=r"image is 120x90 = 10,800 pixels, over the limit of 1,000"):
            Preprocess(64, max_pixels=1000)(folder / "img_00000.jpg")
        assert Preprocess(64, max_pixels=None)(folder / "img_00000.jpg").shape == (3, 64, 64)  # no warning
        monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 4000)
        with pytest.raises(ImageError, match="image too large"):  # over Pillow's own hard limit
            Preprocess(64, max_pixels=None)(folder / "img_00000.jpg")


def test_rows_match_the_old_per_image_loop(model, folder, reference):
    """The rows equal the pre-pipeline implementation: each image decoded and preprocessed alone with
    the model's own recipe, batched, through the fused model, softmax, top-k; unreadable files
    reported, not classified."""
    fused = levit.fuse(model)
    tf = eval_transform(64, **OWN_PREPROCESS)
    good = [f for f in _files(folder) if f.name not in BAD]
    with torch.no_grad():
        probs = fused(torch.stack([tf(open_rgb(f)) for f in good])).softmax(-1)
        authors = fused(torch.stack([eval_transform(64)(open_rgb(f)) for f in good])).softmax(-1)
    assert not torch.equal(probs.argmax(-1), authors.argmax(-1))  # the recipe changes the answers
    rows = {r["path"]: r for r in reference}
    assert len(rows) == len(reference) == len(good) + len(BAD)
    for f, p in zip(good, probs):
        top_p, top_i = p.topk(3)
        got = rows[str(f)]
        assert got["error"] is None and [t["class"] for t in got["top"]] == top_i.tolist()
        assert [t["prob"] for t in got["top"]] == pytest.approx(top_p.tolist(), abs=2e-6)
        assert [t["label"] for t in got["top"]] == [f"thing {i}" for i in top_i.tolist()]
    for name, reason in BAD.items():
        assert rows[str(folder / name)]["top"] == [] and reason in rows[str(folder / name)]["error"]
    # predict_paths (the small-job list) keeps its shape: readable images only, errors to on_error
    errors = []
    listed = predict_paths(
        model, [folder], topk=3, batch_size=2, progress=False, on_error=lambda p, m: errors.append(p)
    )
    assert [r["path"] for r in listed] == [str(f) for f in good] and all(set(r) == {"path", "top"} for r in listed)
    assert sorted(p.name for p in errors) == sorted(BAD)


@pytest.mark.parametrize(
    ("workers", "lanes_decode_up_to", "processes"), [(None, 8, False), (2, 8, True), (None, 1, True)]
)
def test_both_layouts_give_the_same_rows(model, folder, reference, monkeypatch, workers, lanes_decode_up_to, processes):
    """Eager on the CPU: two one-thread lanes each decoding its own batch (the default, no process
    started), and decoding in two worker processes while two lanes run the model (``workers=2``, or
    by default beyond LANES_DECODE_UP_TO lanes) give the rows of one lane decoding in order, in the
    same order; torch's thread count is restored."""
    loaders = []
    real = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **kw: loaders.append(kw) or real(*a, **kw))
    monkeypatch.setattr(pipeline, "LANES_DECODE_UP_TO", lanes_decode_up_to)
    before = torch.get_num_threads()
    rows = [r for b in iter_batches(model, _files(folder), topk=3, batch_size=2, workers=workers, threads=2) for r in b]
    assert rows == reference
    assert torch.get_num_threads() == before
    assert [kw["num_workers"] for kw in loaders] == ([2] if processes else [])


def test_closing_the_iterator_stops_the_lanes_within_an_image(model, folder, monkeypatch):
    """A consumer that stops early (Ctrl-C, an error writing rows) does not wait for the lanes to
    decode their whole batches: each lane stops before its next image."""
    decoded = []
    slow = Preprocess.__call__

    def call(self, src):
        time.sleep(0.05)
        decoded.append(src)
        return slow(self, src)

    monkeypatch.setattr(Preprocess, "__call__", call)
    files = _files(folder) * 8  # 96 files: 2 lanes x batches of 12, 4 batches queued or running
    it = iter_batches(model, files, topk=1, batch_size=12, threads=2)
    first = next(it)
    t = time.perf_counter()
    it.close()
    assert len(first) == 12 and time.perf_counter() - t < 0.5  # a whole batch would take 0.6 s
    assert len(decoded) <= 12 + 12 + 2 + 2  # the batch taken, the other lane's, one more image each


def test_plan_spreads_a_small_job_over_the_decoding_processes(tmp_path, monkeypatch):
    """24 phone photos at batch 32 are two batches of 12 on a 2-core machine (each process decodes
    half; one batch would leave a core idle), a few small files decode in this process (starting
    processes costs more), and a long job keeps the full batch."""
    monkeypatch.setattr(pipeline, "available_cores", lambda: 2)
    big = []
    for i in range(24):
        (f := tmp_path / f"big{i}.jpg").write_bytes(b"\0" * (pipeline.WORKERS_FROM_BYTES // 8))
        big.append(f)
    small = big[:3]
    assert pipeline.plan(big, 32) == (2, 12)
    assert pipeline.plan(small, 32) == (0, 32)  # 3/8 MB: not worth starting processes
    assert pipeline.plan(big[:9], 32) == (2, 5)  # 1.1 MB in one batch: two batches of at most 5
    assert pipeline.plan(["x"] * 1000, 32) == (2, 32)  # many batches: no file is even looked at
    assert pipeline.plan(["x"] * 100, 32) == (2, 25)  # 4 batches of 25, not 32 + 32 + 32 + 4
    assert pipeline.plan(big, 32, workers=0) == (0, 32) and pipeline.plan(big, 32, workers=1) == (1, 32)


def test_a_runner_backend_is_called_with_the_batches(model, folder, reference):
    """A backend passed as ``runner`` (a levit.deploy predictor) gets the batches and makes the rows."""
    pred = levit.deploy(model, backend="eager", batch_size=2, threads=1)
    rows = list(iter_predictions(model, [folder], topk=3, runner=pred, workers=0))
    assert [r["path"] for r in rows] == [r["path"] for r in reference]
    for r, ref in zip(rows, reference):
        assert [t["class"] for t in r["top"]] == [t["class"] for t in ref["top"]] and r["error"] == ref["error"]


@pytest.mark.parametrize("workers", [None, 2])
def test_a_list_of_runners_runs_as_lanes(model, folder, reference, monkeypatch, workers):
    """One backend per lane (``levit predict --backend onnxruntime`` builds one one-thread copy per
    core): every copy computes batches, the lanes decode their own batches (or worker processes do,
    with ``workers``), and the rows are the reference rows in order."""
    calls = {0: 0, 1: 0}

    def lane(i):
        pred = levit.deploy(model, backend="eager", batch_size=2, threads=1)

        def run(x):
            calls[i] += 1
            time.sleep(0.02)  # long enough that the two lanes overlap
            return pred(x)

        run.batch_size, run.img_size = 2, pred.img_size  # what a levit.deploy predictor says of itself
        return run

    loaders = []
    real = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **kw: loaders.append(kw) or real(*a, **kw))
    rows = list(iter_predictions(model, [folder], topk=3, runner=[lane(0), lane(1)], workers=workers))
    assert [r["path"] for r in rows] == [r["path"] for r in reference]
    for r, ref in zip(rows, reference):
        assert [t["class"] for t in r["top"]] == [t["class"] for t in ref["top"]] and r["error"] == ref["error"]
    assert calls[0] > 0 and calls[1] > 0, calls
    assert [kw["num_workers"] for kw in loaders] == ([] if workers is None else [2])


def test_predict_builds_one_backend_per_lane(ckpt, folder, monkeypatch, capsys):
    """``levit predict --backend X --threads 2``: two one-thread copies of X on the CPU; int8 one copy."""
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend")
    import levit.runtime.deploy as deploy_mod

    real = deploy_mod.deploy
    made = []

    def counting(model, **kw):
        made.append((kw["backend"], kw["threads"]))
        return real(model, **{**kw, "backend": "eager", "precision": "fp32", "calibration": None})

    fake_lanes(monkeypatch, counting)
    argv = ["predict", str(folder / "sub"), "-c", str(ckpt), "--json", "--backend", "onnxruntime", "--threads", "2"]
    assert main(argv) == 0
    assert made == [("onnxruntime", 1), ("onnxruntime", 1)]
    assert len(json.loads(capsys.readouterr().out)) == 3


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_each_output_format_reads_back_to_the_same_rows(model, ckpt, folder, tmp_path, capsys, ext):
    if ext == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"label, with comma {i}\n" for i in range(10)))  # CSV quoting
    out = tmp_path / f"preds{ext}"
    argv = ["predict", str(folder), "-c", str(ckpt), "--topk", "3", "-b", "2", "--workers", "0", "--threads", "1"]
    assert main([*argv, "--labels", str(labels), "--include-logits", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert out.exists() and not partial_path(out).exists()
    names = [f"label, with comma {i}" for i in range(10)]
    want = list(
        iter_predictions(
            model, [folder], topk=3, batch_size=2, workers=0, threads=1, include_logits=True, class_names=names
        )
    )
    got = list(read_results(out))
    assert got == want  # every field, every row, in order: probabilities and float32 logits exactly
    for r in got:
        if r["error"] is None:  # the logits are the model's: their softmax gives the probabilities
            p = torch.tensor(r["logits"]).softmax(-1)
            assert len(r["logits"]) == 10 and [t["prob"] for t in r["top"]] == pytest.approx(
                p.topk(3).values.tolist(), abs=2e-6
            )
        else:
            assert r["logits"] is None
    for name, reason in BAD.items():
        assert f"skipped {folder / name}: {reason}" in err
    assert f"{len(want) - 3} classified, 3 unreadable" in err and "img/s" in err


def test_an_existing_output_is_never_replaced_without_overwrite(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    argv = ["predict", str(folder / "sub"), "-c", str(ckpt), "--workers", "0", "--output", str(out)]
    assert main(argv) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"levit predict: error: --output: {out} exists: add --resume to add missing images or --overwrite to replace it"
    )
    assert out.read_bytes() == before
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert main([*argv[:4], "--resume"]) == 2 and "--resume needs --output FILE" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "p.txt")]) == 2 and "--output must end in .jsonl" in capsys.readouterr().err
    # --resume on the finished file with new images: only those are classified, every image once
    (folder / "sub" / "more").mkdir(exist_ok=True)
    try:
        write_sample_jpegs(folder / "sub" / "more", 2, (80, 80), seed=50)
        assert main([*argv, "--resume"]) == 0
        assert "2 classified, 0 unreadable, 3 already in" in capsys.readouterr().err
        paths = [r["path"] for r in read_results(out)]
        assert len(paths) == len(set(paths)) == 5 and out.read_bytes().startswith(before)
        assert main([*argv, "--overwrite", "--topk", "1"]) == 0
        assert {len(r["top"]) for r in read_results(out)} == {1}
    finally:
        for f in (folder / "sub" / "more").iterdir():
            f.unlink()
        (folder / "sub" / "more").rmdir()


_SLOW_WRITER = """
import sys, time
import levit.runtime.writers as w
write = w.ResultWriter.write
def slow(self, rows):  # a batch every 0.3 s, so that the kill lands mid-run
    write(self, rows)
    time.sleep(0.3)
w.ResultWriter.write = slow
from levit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_then_resume_classifies_every_image_once_as_an_uninterrupted_run(ckpt, folder, tmp_path, reference):
    out = tmp_path / "killed.jsonl"
    argv = ["predict", str(folder), "-c", str(ckpt), "--topk", "3", "-b", "2", "--threads", "1", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, *argv], env=env, stderr=subprocess.DEVNULL)
    part = partial_path(out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not part.exists() or part.read_bytes().count(b"\n") < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = part.read_bytes()
    assert not out.exists() and 4 <= written.count(b"\n") < len(reference), "the kill did not land mid-run"
    with open(part, "ab") as f:
        f.write(b'{"path": "half a line, as a kill in the middle of a write lea')
    assert main([*argv, "--workers", "2", "--resume"]) == 0
    rows = list(read_results(out))
    assert rows == reference  # each image once, in order, the very same rows
    assert out.read_bytes().startswith(written) and not part.exists()


def test_labels_must_match_the_classes(ckpt, folder, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    assert main(["predict", str(folder / "grey.png"), "-c", str(ckpt), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"levit predict: error: --labels: {labels} has 2 lines, the model predicts 10 classes"


def test_all_unreadable_is_a_failure(ckpt, folder, capsys):
    assert main(["predict", str(folder / "empty.jpg"), str(folder / "notes.jpg"), "-c", str(ckpt)]) == 1
    err = capsys.readouterr().err
    first = f"{folder / 'empty.jpg'}: empty file (0 bytes)"  # the last line names the first and why
    assert (
        "skipped" in err
        and err.strip().splitlines()[-1]
        == f"levit predict: error: none of the 2 image file(s) could be read (the first: {first})"
    )


def test_fast_decode_skips_pixels_of_large_jpegs_only(folder, tmp_path):
    """--fast-decode: a large JPEG is decoded at 1/8 scale (DCT draft), the tensor close to the
    official one; a JPEG too small to scale, and a PNG, give the official tensor exactly."""
    big = write_sample_jpegs(tmp_path, 1, (600, 800), seed=7)[0]
    fast, full = Preprocess(64, fast_decode=True), Preprocess(64)
    assert fast.decode(big).size == (100, 75) and full.decode(big).size == (800, 600)  # 1/8: short side >= 73
    a, b = fast(big), full(big)
    assert a.shape == b.shape and (a - b).abs().mean() < 0.03 and not torch.equal(a, b)
    assert torch.equal(fast(folder / "img_00000.jpg"), full(folder / "img_00000.jpg"))  # 120x90: nothing to skip
    png = tmp_path / "x.png"
    Image.open(big).save(png)
    assert torch.equal(fast(png), full(png))


def test_ray_data_gives_the_same_rows_and_resumes(model, ckpt, folder, tmp_path, reference):
    """`levit predict --ray` as a user runs it (a new local Ray cluster, in its own process): bad files
    reported the same way, the same rows as a local run, resuming a partial file, and nothing on
    stderr but levit's own lines (Ray's core-worker and token notices stay out)."""
    pytest.importorskip("ray.data", reason="--ray needs Ray Data (pip install 'levit[cluster]')")
    pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow")
    out = tmp_path / "ray.jsonl"
    part = partial_path(out)
    part.write_text("".join(json.dumps(r) + "\n" for r in reference[:4]))  # a run killed after two batches
    argv = ["predict", str(folder), "-c", str(ckpt), "--topk", "3", "-b", "2", "--output", str(out), "--resume"]
    env = {**os.environ, "PYTHONPATH": SRC}
    run = subprocess.run(
        [sys.executable, "-m", "levit", *argv, "--ray"], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    err = run.stderr
    done = {r["path"] for r in reference[:4]}
    assert str(folder / "empty.jpg") in done  # reported by the run that wrote it, not again
    for name, reason in BAD.items():
        assert (f"skipped {folder / name}: {reason}" in err) == (str(folder / name) not in done)
    assert f"{len(reference) - 4 - 2} classified, 2 unreadable, 4 already in {out}" in err
    lines = err.strip().splitlines()
    assert lines == [line for line in lines if "levit" in line or line.startswith("skipped ")], err
    for noise in ("core_worker.cc", "Token authentication", "RAY_BACKEND_LOG_LEVEL", "logging.cc"):
        assert noise not in err, err
    rows = list(read_results(out))
    assert [r["path"] for r in rows] == [r["path"] for r in reference]  # each image once, in order
    for r, ref in zip(rows, reference):
        assert r["error"] == ref["error"] and [t["class"] for t in r["top"]] == [t["class"] for t in ref["top"]]
        assert [t["prob"] for t in r["top"]] == pytest.approx([t["prob"] for t in ref["top"]], abs=2e-6)


def test_an_unfusable_model_runs_unfused(folder):
    """Ablation A3 (LayerNorm: nothing to fold) is classified as it is, not refused or mis-fused."""
    torch.manual_seed(0)
    m = levit.create_model("levit_tiny", img_size=64, num_classes=10, ablation="A3").eval()
    files = [folder / "img_00001.jpg", folder / "grey.png"]
    rows = list(iter_predictions(m, files, topk=2, workers=0, threads=1))
    with torch.no_grad():
        want = m(torch.stack([Preprocess(64)(f) for f in files])).softmax(-1).topk(2)
    assert [[t["class"] for t in r["top"]] for r in rows] == want.indices.tolist()
    got = [t["prob"] for r in rows for t in r["top"]]
    assert got == pytest.approx(want.values.flatten().tolist(), abs=2e-6)


def test_unreadable_files_are_listed_up_to_a_limit_then_counted(ckpt, folder, capsys, monkeypatch):
    monkeypatch.setattr(levit.cli.predict, "PREDICT_ERROR_LINES", 1)
    argv = ["predict", str(folder / "empty.jpg"), str(folder / "notes.jpg"), str(folder / "truncated.jpg")]
    assert main([*argv, str(folder / "grey.png"), "-c", str(ckpt), "--topk", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped ") == 1 and "... and 2 more unreadable file(s)\n" in err
    assert "1 classified, 3 unreadable" in err


def test_too_little_shared_memory_for_the_decoding_processes_is_one_line_and_no_output(
    ckpt, folder, tmp_path, capsys, monkeypatch
):
    """A container's small /dev/shm: `levit predict --workers 2` says in one line how much shared
    memory its decoding processes need and what to do, before any worker starts (instead of torch's
    RuntimeError and a traceback), and leaves no output file."""
    from types import SimpleNamespace

    real = os.statvfs
    monkeypatch.setattr(
        os, "statvfs", lambda p: SimpleNamespace(f_bavail=32, f_frsize=4096) if p == "/dev/shm" else real(p)
    )
    out = tmp_path / "p.jsonl"
    argv = ["predict", str(folder), "-c", str(ckpt), "--workers", "2", "-b", "2", "--output", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(
        r"levit predict: error: decoding processes need [\d.]+ MB of shared memory and /dev/shm has 0.1 MB free: "
        r"decode in this process \(--workers 0\), .*\(docker run --shm-size\)",
        err[-1],
    ), err
    assert not out.exists()
    assert main([*argv[:4], "--workers", "0", *argv[6:]]) == 0 and out.exists()  # what the message says works
