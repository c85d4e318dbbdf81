"""What a newcomer hit on a first afternoon: flags split by a recipe value, exported files given as
checkpoints, paths that are folders or devices, leftovers of a refused resume, a full disk, silent
skips and doubled warnings, clusters that can never answer. Each test pins one defect.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import cli, run_py

import levit


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of two small JPEGs."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A levit-format file of the tiny model (its variant is in the file: no --model needed)."""
    path = tmp_path / "tiny.safetensors"
    levit.save(levit.create_model("levit_tiny", img_size=64), path)
    return path


def one_line_error(r, code: int, *needles: str) -> str:
    """The last stderr line of a failed ``levit`` run, checked: the exit code, no traceback, the needles."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, last
    return last


# ---- 1. flags --------------------------------------------------------------------------------
def test_recipe_values_split_by_a_flag_all_reach_the_recipe(tmp_path, monkeypatch):
    import levit.train.run

    seen = []
    monkeypatch.setattr(
        levit.train.run,
        "train",
        lambda cfg, **kw: seen.append(cfg) or type("R", (), {"best_epoch": 1, "finished_before": False})(),
    )
    r = cli("train", "--dataset", "digits", "--output", tmp_path / "r", "epochs=1", "--distillation", "none", "lr=1e-3")
    assert r.returncode == 0, r.stderr
    assert seen[0].epochs == 1 and seen[0].lr == 1e-3 and seen[0].distillation == "none"
    # an unknown flag is still refused, by the sub-command
    r = cli("train", "--dataset", "digits", "epochs=1", "--bogus", "lr=1e-3")
    one_line_error(r, 2, "levit train: error: unrecognized arguments: --bogus")


def test_intermixed_paths_of_predict(photos, ckpt):
    r = cli("predict", photos / "a.jpg", "-c", ckpt, "--topk", "1", photos / "b.jpg", "--json")
    assert r.returncode == 0, r.stderr
    assert "a.jpg" in r.stdout and "b.jpg" in r.stdout


def test_exported_files_given_as_checkpoints_say_what_they_are(tmp_path, photos):
    onnx = tmp_path / "model.bin"  # an ONNX file known by its bytes, whatever its name
    onnx.write_bytes(b"\x08\x09\x12\x07pytorch\x1a\x062.1" + bytes(64))
    pte = tmp_path / "model.bin2"
    pte.write_bytes(b"\x1c\x00\x00\x00ET12" + bytes(64))
    for path, what in ((onnx, "exported ONNX file"), (pte, "exported ExecuTorch program")):
        r = cli("predict", photos, "-m", "levit_tiny", "-c", path)
        last = one_line_error(r, 1, str(path), what, "use it with")
        assert "Unpickl" not in last
        # without --model, reading the file's metadata says the same
        one_line_error(cli("predict", photos, "-c", path), 1, what)
    scripted = tmp_path / "model.pt"  # a TorchScript archive is a zip as torch.save's files are
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    one_line_error(cli("predict", photos, "-m", "levit_tiny", "-c", scripted), 1, "exported TorchScript model")
    (tmp_path / "m.onnx").write_bytes(b"garbage" * 10)
    one_line_error(cli("predict", photos, "-m", "levit_tiny", "-c", tmp_path / "m.onnx"), 1, "exported ONNX file")


def test_labels_that_are_not_a_readable_file_say_why(photos, ckpt, tmp_path, monkeypatch):
    base = ["predict", photos, "-c", ckpt, "--labels"]
    one_line_error(cli(*base, tmp_path), 2, "--labels", "is a folder")
    one_line_error(cli(*base, "/dev/null"), 2, "--labels", "not a regular file")
    one_line_error(cli(*base, tmp_path / "none.txt"), 2, "--labels", "no such file")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != labels and real(p, mode, **kw))
    one_line_error(cli(*base, labels), 2, "--labels", "permission denied")


def test_folders_that_cannot_be_listed_or_devices_given_as_images_say_why(photos, ckpt, monkeypatch):
    one_line_error(cli("predict", "/dev/null", "-c", ckpt), 1, "/dev/null", "not a regular file")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != photos and real(p, mode, **kw))
    one_line_error(cli("predict", photos, "-c", ckpt), 1, str(photos), "permission denied")


def test_a_pipe_or_a_broken_link_given_as_an_image_is_an_error_row_not_the_end_of_the_job(photos, ckpt, tmp_path):
    """Given on the command line among good images, or found in a folder, a pipe named like a photo, a
    loop of symbolic links and a link to nothing are error rows saying why, as unreadable images are:
    the job classifies the rest and exits 0. A path that is not there at all still stops it (a
    mistyped argument)."""
    import signal

    pipe = "not a regular file (a pipe, socket or device), not an image file"
    loop, dangling = "a loop of symbolic links, not an image file", "a symbolic link to a missing file"
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    given = [photos / "a.jpg", *(tmp_path / n for n in ("pipe.jpg", "loop1", "dangling.jpg"))]
    os.mkfifo(photos / "c.jpg")
    (photos / "d.jpg").symlink_to(photos / "d.jpg")
    (photos / "e.jpg").symlink_to(photos / "nowhere.jpg")

    def rows(*inputs) -> dict:
        out = tmp_path / f"out{len(inputs)}.jsonl"
        r = cli("predict", *inputs, "-c", ckpt, "-o", out)
        assert r.returncode == 0, r.stderr
        return {Path(x["path"]).name: x["error"] for x in map(json.loads, out.read_text().splitlines())}

    def hung(*_):
        raise AssertionError("reading a pipe blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        assert rows(*given) == {"a.jpg": None, "pipe.jpg": pipe, "loop1": loop, "dangling.jpg": dangling}
        assert rows(photos) == {"a.jpg": None, "b.jpg": None, "c.jpg": pipe, "d.jpg": loop, "e.jpg": dangling}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    one_line_error(cli("predict", photos / "a.jpg", tmp_path / "typo.jpg", "-c", ckpt), 1, "typo.jpg", "no such")


def test_an_unknown_option_before_the_command_is_refused_not_dropped():
    one_line_error(cli("--verbose", "models"), 2, "unrecognized arguments: --verbose")


def test_recipe_values_split_by_a_flag_reach_a_nested_command(tmp_path, monkeypatch):
    """`levit data teacher-cache` is a command inside a command: argparse cannot re-parse its parent
    intermixed (a TypeError), so its own parser takes the words."""
    from train_utils import make_dataset

    import levit.train.teacher_cache

    seen = []
    monkeypatch.setattr(
        levit.train.teacher_cache, "build_teacher_cache", lambda cfg, path, **kw: seen.append(cfg) or path
    )
    data = make_dataset(tmp_path / "data", classes=2, train=2, val=1)
    teacher = tmp_path / "t.safetensors"
    levit.save(levit.create_model("levit_tiny", img_size=32, num_classes=2), teacher)
    base = ["data", "teacher-cache", tmp_path / "t.cache", "epochs=1", "--data", data, "-m", "levit_tiny"]
    r = cli(*base, "--teacher-checkpoint", teacher, "seed=3")
    assert r.returncode == 0, r.stderr
    assert seen[0].epochs == 1 and seen[0].seed == 3
    one_line_error(cli(*base, "--teacher-checkpoint", teacher, "epochz=1"), 2, "unknown key(s) ['epochz']")


def test_an_output_that_is_the_checkpoint_is_refused_and_the_checkpoint_kept(tmp_path, monkeypatch):
    from train_utils import make_folder

    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck.pt"  # a state dict named as TorchScript files are: export would replace it
    torch.save(levit.create_model("levit_tiny", img_size=32, num_classes=2).state_dict(), ck)
    before = ck.read_bytes()
    one_line_error(cli("export", "-m", "levit_tiny", "-c", "ck.pt", "-o", ck), 2, "--output", "--checkpoint file")
    data = make_folder(tmp_path / "val", {"a": 1, "b": 1})
    r = cli("eval", "--data", data, "-m", "levit_tiny", "-c", ck, "--output", "./ck.pt", "--workers", "0")
    one_line_error(r, 2, "--output ck.pt is the --checkpoint file")
    r = cli("data", "teacher-cache", ck, "--data", data, "--teacher-checkpoint", ck)
    one_line_error(r, 2, "is the --teacher-checkpoint file")
    assert ck.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "val"]


def test_serve_refuses_calibration_images_for_a_float_model(ckpt, photos, monkeypatch):
    import levit.runtime.serve

    started = []
    monkeypatch.setattr(levit.runtime.serve, "serve", lambda *a, **k: started.append(a) or 0)
    r = cli("serve", "-c", ckpt, "--calibration", photos)
    one_line_error(r, 2, "--calibration", "--precision int8")
    assert started == []  # refused before the server starts (it would serve fp32, the images unused)


def test_an_output_with_a_wrong_suffix_is_named_as_given(photos, ckpt):
    one_line_error(cli("predict", photos, "-c", ckpt, "-o", "/dev/null"), 2, "--output", "'/dev/null'")


def test_a_file_named_like_an_option_is_named_with_the_way_out(photos, ckpt, monkeypatch):
    monkeypatch.chdir(photos)
    (photos / "a.jpg").rename(photos / "-a.jpg")
    one_line_error(cli("predict", "-a.jpg", "-c", ckpt), 2, "-a.jpg is read as an option", "./-a.jpg")
    assert cli("predict", "./-a.jpg", "-c", ckpt).returncode == 0


@pytest.mark.parametrize(
    ("teacher", "says"),
    [
        ("no_such_net", "'no_such_net' is neither a levit model nor a timm model name"),
        ("levit_128s", "holds a levit_tiny"),
    ],
)
def test_a_teacher_name_a_levit_teacher_file_contradicts_is_refused(tmp_path, teacher, says):
    """A levit file names its own variant; a --teacher beside it that is no model, or another variant,
    was ignored and written into the run's config.yaml as if it had taught."""
    from train_utils import make_dataset

    data = make_dataset(tmp_path / "data", classes=2, train=2, val=1)
    weights = tmp_path / "teacher.safetensors"
    levit.save(levit.create_model("levit_tiny", img_size=32, num_classes=2), weights)
    out = tmp_path / "run"
    r = cli(
        "train", "--data", data, "--output", out, "-m", "levit_tiny", "--img-size", "32", "--epochs", "1", "-b", "2",
        "--distillation", "hard", "--teacher", teacher, "--teacher-checkpoint", weights, "--device", "cpu",
        "workers=0", "progress=false", "total_batch=null",
    )  # fmt: skip
    one_line_error(r, 1, "--teacher", says)
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "ablate"])
def test_a_run_folder_that_is_a_file_or_cannot_be_made_is_refused_naming_the_flag(tmp_path, command):
    """It was an OS error naming a sub-folder (`[Errno 20] Not a directory: 'afile/checkpoints'`)
    after the data was read."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    args = ["--dataset", "digits", "--distillation", "none"] if command == "train" else ["--epochs", "1"]
    one_line_error(cli(command, *args, "--output", afile), 2, f"--output {afile} is a file; expected a folder")
    one_line_error(cli(command, *args, "--output", afile / "run"), 2, f"{afile} is a file, not a folder")
    one_line_error(cli(command, *args, "--output", "/proc/run"), 2, "--output /proc/run: cannot write in /proc")
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_eval_of_a_dataset_root_evaluates_its_val_folder(tmp_path):
    """Read as an image folder, a root with train/ and val/ was a two-class set named train and val."""
    from train_utils import make_dataset

    data = make_dataset(tmp_path / "data", classes=2, train=3, val=2)
    ckpt = levit.save(levit.create_model("levit_tiny", img_size=32, num_classes=2), tmp_path / "m.safetensors")
    outs = {}
    for name, folder in (("root", data), ("val", data / "val")):
        outs[name] = tmp_path / f"{name}.json"
        r = cli("eval", "--data", folder, "-c", ckpt, "--workers", "0", "--output", outs[name])
        assert r.returncode == 0, r.stderr
    root, val = (json.loads(outs[k].read_text()) for k in ("root", "val"))
    assert root["n"] == val["n"] == 4 and root["top1"] == val["top1"]


# ---- 2. a refused resume leaves nothing behind ------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_refused_resume_leaves_no_partial_file(photos, ckpt, tmp_path, suffix):
    out = tmp_path / "results" / f"out{suffix}"
    out.parent.mkdir()
    assert cli("predict", photos, "-c", ckpt, "--topk", "1", "--output", out).returncode == 0
    before = out.read_bytes()
    r = cli("predict", photos, "-c", ckpt, "--topk", "2", "--output", out, "--resume")
    one_line_error(r, 1, "--topk")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name] and out.read_bytes() == before


def test_resume_of_a_corrupt_file_leaves_no_partial_file(photos, ckpt, tmp_path):
    out = tmp_path / "results" / "out.jsonl"
    out.parent.mkdir()
    out.write_text("this is not JSON\n")
    one_line_error(cli("predict", photos, "-c", ckpt, "--output", out, "--resume"), 1, "not a JSON row")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert out.read_text() == "this is not JSON\n"


# ---- 3. a full disk, a read-only output ------------------------------------------------------
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def filling_open(room: int, modes: str = "wa"):
    """``open`` whose files opened in one of ``modes`` take ``room`` more characters each, then
    refuse as a full disk does (the other files open as usual)."""
    real_open = open

    def fake(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FillingFile(f, room) if any(m in mode for m in modes) else f

    return fake


class FillingFile:
    """A real file that takes ``room`` more characters, then refuses as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, text):
        if len(text) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(text)
        return self._f.write(text)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_predict_on_a_full_disk_is_one_line_and_keeps_the_partial_for_resume(
    photos, ckpt, tmp_path, monkeypatch, suffix
):
    import levit.runtime.writers as writers

    out = tmp_path / "results" / f"out{suffix}"
    out.parent.mkdir()
    # room for the header and the first image's row, not for the second
    monkeypatch.setattr(writers, "open", filling_open(450), raising=False)
    r = cli("predict", photos, "-c", ckpt, "-b", "1", "--output", out)
    one_line_error(r, 1, f"{out.name}.partial", "no space left on device (ENOSPC)", "--resume")
    assert sorted(p.name for p in out.parent.iterdir()) == [f"{out.name}.partial"]
    monkeypatch.undo()  # room again: the resumed run finishes the file
    r = cli("predict", photos, "-c", ckpt, "-b", "1", "--output", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert sorted(Path(row["path"]).name for row in writers.read_results(out)) == ["a.jpg", "b.jpg"]


def test_train_on_a_full_disk_is_one_line_naming_the_file_and_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    from train_utils import make_dataset

    import levit.train.rundir as rundir

    data = make_dataset(tmp_path / "data", classes=2, train=2, val=1)
    monkeypatch.setattr(rundir, "open", filling_open(0, modes="w"), raising=False)  # checkpoints, not the log
    out = tmp_path / "run"
    r = cli(
        "train", "--data", data, "--output", out, "-m", "levit_tiny", "--distillation", "none", "--img-size", "32",
        "--epochs", "1", "-b", "2", "--device", "cpu", "workers=0", "progress=false", "total_batch=null",
    )  # fmt: skip
    last = one_line_error(r, 1, str(out), ".pth", "no space left on device (ENOSPC)")
    assert "unexpected pos" not in last
    # no weights were saved: nothing to resume, so the run folder it made goes (the next run may start)
    assert not out.exists()


def test_train_into_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == ro or ro in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    r = cli("train", "--dataset", "digits", "--output", ro / "run", "epochs=1", "--distillation", "none")
    one_line_error(r, 1, str(ro), "read-only file system (EROFS)")


def test_ablate_on_a_full_disk_is_one_line_and_leaves_no_empty_folder(tmp_path, monkeypatch):
    import levit.data.digits

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(levit.data.digits, "make_digits_folder", full)
    out = tmp_path / "sweep"
    r = cli("ablate", "--variants", "base", "--epochs", "1", "--output", out)
    one_line_error(r, 1, str(out), "no space left on device (ENOSPC)")
    assert not out.exists()


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "exports"
    out.mkdir()
    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        if ".tmp" in self.name:
            real_write_bytes(self, bytes(data)[:100])  # a full disk takes the first bytes only
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    r = cli("export", "-c", ckpt, "--output", out / "m.pt")
    one_line_error(r, 1, str(out / "m.pt"), "no space left on device (ENOSPC)")
    assert list(out.iterdir()) == []


def test_openvino_export_on_a_full_disk_names_the_file_not_a_stream_error(ckpt, tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino")
    import shutil

    def save_model(model, path, **kwargs):
        Path(path).write_bytes(b"<?xml")  # what a full disk lets through, then OpenVINO's C++ stream error
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", save_model)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    out = tmp_path / "exports"
    out.mkdir()
    r = cli("export", "-c", ckpt, "--output", out / "m.xml")
    last = one_line_error(r, 1, str(out / "m.xml"), "no space left on device (ENOSPC)")
    assert "iostream" not in last and list(out.iterdir()) == []


def test_shards_on_a_full_disk_or_a_file_name_dst_and_leave_no_half_written_folder(tmp_path, monkeypatch):
    import webdataset
    from train_utils import make_dataset

    data = make_dataset(tmp_path / "data", classes=2, train=3, val=1)
    write = webdataset.ShardWriter.write

    def full(self, sample):  # the first sample written, then a flush that names no file
        write(self, sample)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(webdataset.ShardWriter, "write", full)
    dst = tmp_path / "shards"
    one_line_error(cli("data", "shard", data, dst), 1, f"DST {dst}", "no space left on device (ENOSPC)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # neither DST nor its partial folder
    # a DST that is a file, or where no folder can be made: named before anything is read
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    one_line_error(cli("data", "shard", data, afile), 2, f"DST {afile} is a file; expected a folder")
    one_line_error(cli("data", "shard", data, "/proc/shards"), 2, "DST /proc/shards: cannot write in /proc")
    # SRC without the layout: named as the command names it
    one_line_error(cli("data", "shard", data / "train", dst), 1, f"SRC: {data / 'train'} has no 'train' sub-folder")
    assert afile.read_text() == "keep me"


# ---- 4. silence and noise ----------------------------------------------------------------------
def test_files_skipped_in_a_folder_are_counted_with_their_extensions(photos, ckpt):
    (photos / "IMG_0001.HEIC").write_bytes((photos / "a.jpg").read_bytes())  # JPEG bytes, unknown name
    (photos / "notes.txt").write_text("not an image")
    r = cli("predict", photos, "-c", ckpt, "--json")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "skipped 2 file(s)" in lines[0] and ".heic .txt" in lines[0], r.stderr
    # given by name, a file is tried whatever its extension
    assert cli("predict", photos / "IMG_0001.HEIC", "-c", ckpt).returncode == 0


def test_a_precision_warning_prints_once_per_run(photos, ckpt, monkeypatch):
    import levit.runtime.cpu

    monkeypatch.setattr(levit.runtime.cpu, "cpu_bf16_supported", lambda: False)
    r = cli("predict", photos, "-c", ckpt, "--backend", "eager", "--precision", "bf16", "-b", "1", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith("warning: this CPU has no native bf16") for line in r.stderr.splitlines()) == 1


INT8 = ("onnxruntime", "openvino")


def test_int8_runs_print_no_preprocessing_advice_and_no_cuda_notice(photos, ckpt):
    """ONNX Runtime's quantizer ("Please consider to run pre-processing", through the root logger) and
    NNCF's import (torch's "No CUDA runtime is found") stay off stderr: both int8 backends in one fresh
    interpreter (a warning shows only in the first process that meets it). Each run reports its
    agreement with fp32 on stderr and keeps stdout to its JSON rows (the quantizers' progress output
    stays off it)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("nncf")
    runs = [["predict", str(photos), "-c", str(ckpt), "--json", "--backend", b, "--precision", "int8"] for b in INT8]
    code = (
        "import contextlib, io, json, sys\nfrom levit.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        assert main(argv) == 0\n"
        "    assert sorted(r['path'].rsplit('/', 1)[1] for r in json.loads(out.getvalue())) == ['a.jpg', 'b.jpg']\n"
    )
    r = run_py(code, json.dumps(runs))
    assert r.returncode == 0, r.stderr
    for noise in ("Please consider", "WARNING:root", "CUDA"):
        assert noise not in r.stderr, r.stderr
    for backend in INT8:
        assert f"{backend} int8: top-1 agreement" in r.stderr, r.stderr


def test_hf_folder_files_get_the_umask_permissions_as_levit_save(tmp_path):
    from levit.weights.hf import save_hf_pretrained

    model = levit.create_model("levit_tiny", img_size=64)
    old = os.umask(0o022)
    try:
        folder = save_hf_pretrained(model, tmp_path / "hf")
        own = levit.save(model, tmp_path / "own.safetensors")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}
    assert own.stat().st_mode & 0o777 == 0o644


# `levit predict --ray`'s stderr (only levit's lines): tests/test_pipeline.py's Ray run checks it,
# on the run that also checks its rows, so that the suite starts one Ray cluster for both.


# ---- 5. requests that could never be met end, in one line -------------------------------------
def closed_port() -> int:
    """A local TCP port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_with_an_unreachable_ray_address_fails_in_bounded_time(photos, ckpt):
    """The address is checked before Ray is started (``ray.init`` would retry it for minutes), so the
    run ends in one line, in this process, without Ray ever starting."""
    import threading

    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    address, done = f"127.0.0.1:{closed_port()}", []
    argv = ("predict", photos / "a.jpg", "-c", ckpt, "--ray", address)
    run = threading.Thread(target=lambda: done.append(cli(*argv)), daemon=True)
    run.start()
    run.join(60)
    assert done, "levit predict --ray with an unreachable address still running after 60 s"
    one_line_error(done[0], 1, f"no Ray cluster answers at {address}", "connection refused")
    assert not ray.is_initialized()


def test_serve_ray_asking_for_more_cpus_than_the_cluster_has_fails_before_deploying(monkeypatch):
    """A local cluster cannot grow: more replica CPUs than it has is one line, before Ray Serve is
    asked for replicas it would wait for for ever (the started cluster's resources stand in)."""
    pytest.importorskip("ray.serve")
    import ray

    import levit.runtime.serve_ray as serve_ray
    from levit.errors import LeViTError
    from levit.runtime.serve import ServeConfig

    deployed = []
    monkeypatch.setattr(serve_ray, "init_ray", lambda *a, **k: True)  # "this call started Ray"
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(serve_ray, "run_deployment", lambda *a, **k: deployed.append(k))
    model = levit.create_model("levit_tiny", img_size=32)
    with pytest.raises(LeViTError, match=r"--replicas 2 x --replica-cpus 2 need 4 CPUs; this Ray cluster has 2"):
        serve_ray.start_ray(model, ServeConfig(), replicas=2, replica_cpus=2)
    assert deployed == []
    serve_ray.start_ray(model, ServeConfig(), replicas=2, replica_cpus=1)  # fits: deployed
    assert deployed == [{"replicas": 2, "replica_cpus": 1}]


# ---- 6. figures say where they come from ---------------------------------------------------------
def test_readme_speed_figures_name_the_avx512_cpu_as_docs_speed_does():
    import re

    root = Path(__file__).resolve().parents[1]
    flat = " ".join((root / "docs" / "speed.md").read_text().split())  # line breaks are not words
    cpu = re.search(r"\*\*(AMD EPYC \(Zen 4, AVX-512[^)]*\))", flat).group(1)
    readme = " ".join((root / "README.md").read_text().split())
    table = readme.index("| clients | requests/s")
    assert cpu in readme[max(0, table - 600) : table], "the README's serving figures do not name their AVX-512 CPU"


def test_edge_benchmark_reports_an_int8_agreement_below_the_export_check(tmp_path, monkeypatch, capsys):
    import importlib.util
    from types import SimpleNamespace

    from levit.runtime import edge

    pytest.importorskip("executorch")
    spec = importlib.util.spec_from_file_location(
        "edge_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "edge.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    agreement = 0.481  # what ExecuTorch static int8 reached on an AVX2-only CPU

    def export_executorch(model, path, *, precision="fp32", int8=None, **kwargs):
        if precision == "int8" and agreement < int8.min_agreement:  # the export's own check
            raise edge.ExportError(f"agrees on {agreement:.1%}")
        return SimpleNamespace(size_bytes=100, top1_agreement=agreement, max_rel_error=0.5)

    monkeypatch.setattr(bench.edge, "export_executorch", export_executorch)
    monkeypatch.setattr(bench, "build_model", lambda name, checkpoint: None)
    fidelity = SimpleNamespace(fidelity={"top1_agreement": 0.9, "max_rel_error": 0.1})
    monkeypatch.setattr(bench, "deploy", lambda *a, **kw: fidelity)
    monkeypatch.setattr(bench, "resolve", lambda *a: ("openvino", "int8"))
    args = SimpleNamespace(models=["levit_128s"], checkpoint=None, quick=True)
    rows = bench.section_int8(args, tmp_path, torch.zeros(2, 3, 224, 224))
    assert rows[0]["executorch static"]["top1_agreement"] == agreement
    assert "BELOW the export's 50% check" in capsys.readouterr().out
