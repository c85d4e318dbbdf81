"""Bad and unusual input through every ``levit`` command, the way a new user types it: each case
runs ``python -m levit ...`` in its own subprocess, in its own folder of a temporary directory,
under a time limit, and gets a verdict:

- **ok**: bad input ends with the CLI's exit code (2 for a usage error, 1 for a failure), no
  traceback, a short last line of stderr that names the offending flag or file; good but unusual
  input ends with exit 0 and the right output; nothing half-written is left behind (no ``*.partial``,
  no empty folder, the user's files untouched); done within the time limit.
- **weak**: it works, but the message does not name the flag or file, the exit code is the other
  non-zero one, or stderr carries noise (a line twice, a third-party warning).
- **defect**: a traceback, a hang (time limit), exit 0 on bad input, a good input refused, a file
  lost, overwritten or half-written, a crash.

Every input is generated here (random-weight ``levit_tiny`` checkpoints, tiny image folders and
datasets, broken files); nothing is downloaded. Full and read-only disks are tiny tmpfs mounts when
this process may mount (root in a container that allows it); otherwise those cases are skipped.
Permission bits are not among the cases (they do not stop root); ``/proc`` stands for a place no one
can write. ``levit serve`` appears only with input it must refuse before it starts.

    python benchmarks/bad_inputs.py --out bad_inputs.md                 # all cases, 2 at a time
    python benchmarks/bad_inputs.py --only predict-out --jobs 1          # the cases whose id has the text
    python benchmarks/bad_inputs.py --only train-key --keep              # keep logs/: each case's output

Prints one line per case and writes a markdown page: the counts (all, then per command), then one
row per case. Exits 1 when a case is a defect.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

Check = Callable[[Path, subprocess.CompletedProcess], "str | None"]
FIXTURES: list[Path] = []  # the fixtures folder of this run (set by main), for the cases' setups

# third-party warnings and runtime chatter: levit's own notes start with "levit" or "warning:"
NOISE = re.compile(r"Warning\b|WARNING|^\[W |^W\d{4}|warn\(|^/.*\.py:\d+:")
OWN_WARNINGS = ("levit", "warning:", "WARNING: no --checkpoint or --pretrained")  # levit's own lines
# a usage error prints argparse's usage block first; its lines are not noise
USAGE_LINE = re.compile(r"^(usage: |\s+\[|\s+[a-z]|\s{10,})")


@dataclass
class Case:
    """One command line and what a good CLI does with it."""

    id: str
    cmd: str  # as typed after ``levit``; $FX is the fixtures folder, $FULL / $RO the special mounts
    codes: tuple[int, ...]  # accepted exit codes; (0,) for good input
    needle: str = ""  # bad input: text stderr must contain (the flag or the file)
    check: Check | None = None  # good input: a problem with the output, or None
    timeout: float = 90.0
    setup: Callable[[Path], None] | None = None  # files the user already has in the case folder
    leaves: bool = False  # a failure that may keep what it wrote (a run folder with its log)
    changes: tuple[str, ...] = ()  # the user's files this good input may rewrite (--overwrite, --resume)
    needs: str = ""  # "mount" (tmpfs) or a module that must import


@dataclass
class Result:
    """A case's outcome: verdict and why."""

    case: Case
    code: int | None
    seconds: float
    verdict: str
    why: str
    first_line: str = ""
    notes: list[str] = field(default_factory=list)


# ---- fixtures ------------------------------------------------------------------------------------
def jpeg_bytes(size=(40, 30), mode="RGB", seed=0, **kw) -> bytes:
    """A small random JPEG."""
    import io

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds almost no data (a decompression bomb's
    first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def make_images(d: Path) -> None:
    """One file per kind of image a user's folder holds, good, odd and broken."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    rgb.save(d / "ok.jpg")
    rgb.save(d / "ok.png")
    rgb.save(d / "UPPER.JPG")
    rgb.save(d / "name with spaces.jpg")
    rgb.save(d / "photo_é_日本.jpg")
    rgb.save(d / "-dash.jpg")
    rgb.save(d / "ok.bmp")
    rgb.save(d / "ok.webp")
    rgb.save(d / "ok.tiff")
    rgb.save(d / "progressive.jpg", progressive=True)
    rgb.convert("L").save(d / "gray.png")
    rgb.convert("RGBA").save(d / "rgba.png")
    rgb.convert("P").save(d / "palette.png")
    rgb.convert("LA").save(d / "gray_alpha.png")
    rgb.convert("1").save(d / "bilevel.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16)).save(d / "16bit.png")
    Image.fromarray(rng.random((30, 40)).astype(np.float32)).save(d / "float.tiff")
    rgb.convert("P").save(d / "static.gif")
    frames = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "one_pixel.png")
    Image.new("RGB", (2000, 2), (9, 9, 9)).save(d / "strip.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a phone photo
    rgb.save(d / "rotated.jpg", exif=exif)
    (d / "zero.jpg").write_bytes(b"")
    (d / "random.jpg").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    full = (d / "ok.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "html.png").write_text("<html><body>404 Not Found</body></html>")
    (d / "IMG_0001.HEIC").write_bytes(full)
    (d / "png_named.jpg").write_bytes((d / "ok.png").read_bytes())
    (d / "huge.png").write_bytes(huge_png_header(100_000, 100_000))
    (d / "bomb.png").write_bytes(huge_png_header(12_000, 9_000))  # 108 MP: over Pillow's limit
    (d / "noext").write_bytes(full)
    (d / "notes.txt").write_text("holiday photos\n")


def make_folder(root: Path, per_class: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """An ImageFolder of small learnable images."""
    rng = np.random.default_rng(seed)
    for k, (cls, n) in enumerate(sorted(per_class.items())):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[(k * 7 + 3) % (size - 4) :][:4, :, k % 3] = 230
            Image.fromarray(img).save(root / cls / f"{cls}_{i:03d}.png")
    return root


def make_datasets(fx: Path) -> None:
    """Training layouts: one good, the rest each broken one way."""
    two = {"cat": 4, "dog": 4}
    make_folder(fx / "data" / "train", two)
    make_folder(fx / "data" / "val", {"cat": 2, "dog": 2}, seed=1)
    make_folder(fx / "no_val" / "train", two)
    make_folder(fx / "one_class" / "train", {"cat": 4})
    make_folder(fx / "one_class" / "val", {"cat": 2})
    make_folder(fx / "empty_class" / "train", two)
    (fx / "empty_class" / "train" / "emu").mkdir()
    make_folder(fx / "empty_class" / "val", {"cat": 2, "dog": 2})
    make_folder(fx / "flat" / "train", {"x": 3})
    for p in (fx / "flat" / "train" / "x").iterdir():
        p.rename(fx / "flat" / "train" / p.name)
    (fx / "flat" / "train" / "x").rmdir()
    make_folder(fx / "flat" / "val", {"cat": 2})
    make_folder(fx / "val_other" / "train", two)
    make_folder(fx / "val_other" / "val", {"cow": 2, "pig": 2})
    make_folder(fx / "train_file", {})
    (fx / "train_file").mkdir(exist_ok=True)
    (fx / "train_file" / "train").write_text("not a folder")
    make_folder(fx / "train_file" / "val", {"cat": 2})
    make_folder(fx / "corrupt_img" / "train", two)
    (fx / "corrupt_img" / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n garbage")
    make_folder(fx / "corrupt_img" / "val", {"cat": 2, "dog": 2})
    make_folder(fx / "pipe_img" / "train", two)
    os.mkfifo(fx / "pipe_img" / "train" / "cat" / "pipe.png")  # no writer: a plain open waits forever
    make_folder(fx / "pipe_img" / "val", {"cat": 2, "dog": 2})
    make_folder(fx / "no_images" / "train", {})
    for c in ("cat", "dog"):
        (fx / "no_images" / "train" / c).mkdir(parents=True)
        (fx / "no_images" / "train" / c / "readme.txt").write_text("x")
    make_folder(fx / "no_images" / "val", {"cat": 1, "dog": 1})
    (fx / "empty_dir").mkdir()
    make_folder(fx / "evalset", {"cat": 3, "dog": 3})
    make_folder(fx / "evalset_many", {f"c{k:02d}": 1 for k in range(12)})


def make_checkpoints(fx: Path) -> None:
    """Random-weight checkpoints, good and broken."""
    import torch

    import levit

    tiny = levit.create_model("levit_tiny", img_size=64)
    levit.save(tiny, fx / "tiny.safetensors")
    two = levit.create_model("levit_tiny", img_size=64, num_classes=2)
    levit.save(two, fx / "tiny2.safetensors")
    levit.save(levit.fuse(two.eval()), fx / "tiny2_fused.safetensors")
    torch.save(tiny.state_dict(), fx / "tiny_sd.pth")
    torch.save({"model": tiny.state_dict()}, fx / "tiny_wrapped.pth")
    torch.save({"weights": {"foo.weight": torch.zeros(3)}}, fx / "foreign.pth")
    torch.save(torch.zeros(3), fx / "tensor.pth")
    levit.save(levit.create_model("levit_128s", num_classes=10), fx / "levit128s.safetensors")
    full = (fx / "tiny.safetensors").read_bytes()
    (fx / "truncated.safetensors").write_bytes(full[: len(full) // 2])
    (fx / "empty.safetensors").write_bytes(b"")
    (fx / "text.pth").write_text("model weights go here\n")
    (fx / "random.pth").write_bytes(np.random.default_rng(2).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    (fx / "ckpt_dir").mkdir()
    (fx / "model.onnx").write_bytes(b"\x08\x09\x12\x07pytorch\x1a\x062.1" + bytes(64))
    (fx / "model.pte").write_bytes(b"\x1c\x00\x00\x00ET12" + bytes(64))
    with warnings.catch_warnings():  # "torch.jit is deprecated": the file is what a user still has
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), fx / "scripted.pt")
    (fx / "tiny.safetensors.pth").write_bytes((fx / "tiny_sd.pth").read_bytes())
    (fx / "labels2.txt").write_text("cat\ndog\n")
    (fx / "labels3.txt").write_text("cat\ndog\nemu\n")
    (fx / "labels_empty.txt").write_text("")
    (fx / "bad.yaml").write_text("epochs: [1, 2\n")
    (fx / "list.yaml").write_text("- 1\n- 2\n")
    (fx / "unknown_key.yaml").write_text("epochz: 1\n")
    (fx / "recipe.yaml").write_text("model: levit_tiny\nepochs: 1\n")


def make_fixtures(fx: Path) -> None:
    """Every generated input, under ``fx``."""
    make_images(fx / "img")
    only = fx / "photos"
    only.mkdir()
    for name in ("ok.jpg", "ok.png"):
        shutil.copy(fx / "img" / name, only / name)
    (fx / "no_images_here").mkdir()
    (fx / "no_images_here" / "a.txt").write_text("x")
    (fx / "photos.jpg").mkdir()  # a folder named like an image
    shutil.copy(fx / "img" / "ok.jpg", fx / "photos.jpg" / "inside.jpg")
    os.symlink(fx / "img" / "ok.jpg", fx / "link.jpg")
    os.symlink(fx / "missing.jpg", fx / "dangling.jpg")
    many = fx / "many"
    many.mkdir()
    for i in range(30):
        (many / f"bad{i:02d}.jpg").write_bytes(b"nope")
    shutil.copy(fx / "img" / "ok.jpg", many / "good.jpg")
    make_datasets(fx)
    make_checkpoints(fx)


def snapshot(root: Path) -> dict[str, str]:
    """Every file (with a hash of its bytes) and folder under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link"
        elif p.is_dir():
            out[rel + "/"] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


# ---- the special places: a full disk, a read-only disk, a busy port -----------------------------
class Mounts:
    """A 256 KiB tmpfs left with about 8 KiB free ($FULL) and a read-only tmpfs ($RO), if this
    process may mount; unmounted on ``close``."""

    def __init__(self, root: Path) -> None:
        self.full, self.ro, self.ok = root / "full", root / "ro", False
        if os.geteuid() != 0 or not shutil.which("mount"):
            return
        self.full.mkdir()
        self.ro.mkdir()
        a = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(self.full)], capture_output=True)
        b = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(self.ro)], capture_output=True)
        self.ok = a.returncode == 0 and b.returncode == 0
        if self.ok:
            (self.full / "filler").write_bytes(bytes(248 * 1024))

    def refill(self) -> None:
        """Whatever a case wrote goes; the filler stays (each case meets the same full disk)."""
        for p in self.full.iterdir():
            if p.name != "filler":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def close(self) -> None:
        """Unmount both."""
        for d in (self.full, self.ro):
            if d.is_dir():
                subprocess.run(["umount", str(d)], capture_output=True)


def busy_port() -> tuple[socket.socket, int]:
    """A listening socket (a port another program holds)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- output checks for good input ---------------------------------------------------------------
def stdout_has(*texts: str) -> Check:
    """stdout holds every text."""

    def check(case_dir: Path, r: subprocess.CompletedProcess) -> str | None:
        missing = [t for t in texts if t not in r.stdout]
        return f"stdout lacks {missing}" if missing else None

    return check


def file_has(name: str, *texts: str, min_bytes: int = 1) -> Check:
    """The case folder's file ``name`` exists, holds ``min_bytes`` and every text."""

    def check(case_dir: Path, r: subprocess.CompletedProcess) -> str | None:
        p = case_dir / name
        if not p.is_file() or p.stat().st_size < min_bytes:
            return f"{name} missing or empty"
        body = p.read_bytes().decode("utf-8", "replace")
        missing = [t for t in texts if t not in body]
        return f"{name} lacks {missing}" if missing else None

    return check


def rows_in(name: str, n: int) -> Check:
    """``name`` (JSONL or CSV) has ``n`` result rows."""

    def check(case_dir: Path, r: subprocess.CompletedProcess) -> str | None:
        p = case_dir / name
        if not p.is_file():
            return f"{name} missing"
        lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
        got = len(lines) - (1 if name.endswith(".csv") else 0)
        return None if got == n else f"{name} has {got} rows, expected {n}"

    return check


def both(*checks: Check) -> Check:
    """Every check."""

    def check(case_dir: Path, r: subprocess.CompletedProcess) -> str | None:
        return next((p for c in checks if (p := c(case_dir, r))), None)

    return check


def existing(name: str, text: str = "keep me\n") -> Callable[[Path], None]:
    """Setup: the user already has ``name`` with ``text``."""

    def setup(case_dir: Path) -> None:
        p = case_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    return setup


def copy_in(src: str, dst: str) -> Callable[[Path], None]:
    """Setup: a copy of fixture ``src`` (relative to $FX, found via the environment) at ``dst``."""

    def setup(case_dir: Path) -> None:
        s = FIXTURES[0] / src
        d = case_dir / dst
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(s, d) if s.is_dir() else shutil.copy(s, d)

    return setup


# ---- the cases --------------------------------------------------------------------------------
CK = "-c $FX/tiny.safetensors"
CK2 = "-c $FX/tiny2.safetensors"
BAD_CKPTS = [  # (suffix of the id, flag text, needle, exit codes)
    ("missing", "-c nope.safetensors", "nope.safetensors", (1, 2)),
    ("dir", "-c $FX/ckpt_dir", "ckpt_dir", (1, 2)),
    ("empty", "-c $FX/empty.safetensors", "empty.safetensors", (1,)),
    ("truncated", "-c $FX/truncated.safetensors", "truncated.safetensors", (1,)),
    ("text", "-m levit_tiny -c $FX/text.pth", "text.pth", (1,)),
    ("random", "-m levit_tiny -c $FX/random.pth", "random.pth", (1,)),
    ("onnx", "-c $FX/model.onnx", "ONNX", (1,)),
    ("pte", "-c $FX/model.pte", "ExecuTorch", (1,)),
    ("torchscript", "-m levit_tiny -c $FX/scripted.pt", "TorchScript", (1,)),
    ("foreign", "-m levit_tiny -c $FX/foreign.pth", "foreign.pth", (1,)),
    ("tensor", "-m levit_tiny -c $FX/tensor.pth", "tensor.pth", (1,)),
    ("wrong-variant", "-m levit_tiny -c $FX/levit128s.safetensors", "levit", (1, 2)),
    ("sd-no-model", "-c $FX/tiny_sd.pth", "--model", (1, 2)),
    ("devnull", "-m levit_tiny -c /dev/null", "/dev/null", (1, 2)),
    ("model-typo", "-m levit_tinny", "levit_tinny", (2,)),
    ("no-model", "", "--model|--checkpoint", (2,)),
    ("both", "-c $FX/tiny.safetensors --pretrained -m levit_tiny", "--pretrained", (2,)),
]
FEW_BAD_CKPTS = [c for c in BAD_CKPTS if c[0] in ("missing", "truncated", "onnx", "wrong-variant", "no-model")]
BAD_IMG_SIZES = [("0", "0", (2,)), ("30", "30", (2,)), ("neg", "-16", (2,)), ("abc", "abc", (2,)),
                 ("3x", "64x", (2,)), ("huge", "16384", (1, 2))]  # fmt: skip


def predict_cases() -> list[Case]:
    """``levit predict``: images of every kind, flags, outputs."""
    P, cs = "predict", []
    goods = ["ok.jpg", "ok.png", "UPPER.JPG", "name with spaces.jpg", "photo_é_日本.jpg", "ok.bmp", "ok.webp",
             "ok.tiff", "progressive.jpg", "gray.png", "rgba.png", "palette.png", "gray_alpha.png", "bilevel.png",
             "cmyk.jpg", "16bit.png", "float.tiff", "static.gif", "anim.gif", "one_pixel.png", "strip.png",
             "rotated.jpg", "IMG_0001.HEIC", "png_named.jpg", "noext"]  # fmt: skip
    for g in goods:
        name = re.sub(r"[^A-Za-z0-9_]+", "-", g)
        cs.append(Case(f"predict-image-{name}", f"{P} {shlex.quote('$FX/img/' + g)} {CK} --topk 1", (0,),
                       check=stdout_has(g)))  # fmt: skip
    cs.append(Case("predict-image-dash-name", f"{P} ./-dash.jpg {CK} --topk 1", (0,), setup=copy_in("img/-dash.jpg", "-dash.jpg"), check=stdout_has("-dash.jpg")))  # fmt: skip
    cs.append(Case("predict-image-dash-bare", f"{P} -dash.jpg {CK}", (2,), "-d", setup=copy_in("img/-dash.jpg", "-dash.jpg")))  # fmt: skip
    bads = [("zero.jpg", "empty"), ("random.jpg", "random.jpg"), ("truncated.jpg", "truncated.jpg"),
            ("text.jpg", "text.jpg"), ("html.png", "html.png"), ("huge.png", "huge.png"), ("bomb.png", "bomb.png"),
            ("notes.txt", "notes.txt")]  # fmt: skip
    for b, needle in bads:
        cs.append(Case(f"predict-broken-{b.split('.')[0]}", f"{P} $FX/img/{b} {CK}", (1,), needle))
    cs += [
        Case("predict-folder-mixed", f"{P} $FX/img {CK} --topk 1 --json", (0,), check=stdout_has("ok.jpg", "cmyk.jpg")),
        Case("predict-folder-mixed-output", f"{P} $FX/img {CK} -o out.jsonl", (0,), check=file_has("out.jsonl", "zero.jpg", "error")),
        Case("predict-folder-only-text", f"{P} $FX/no_images_here {CK}", (1,), "no_images_here"),
        Case("predict-folder-empty", f"{P} $FX/empty_dir {CK}", (1,), "empty_dir"),
        Case("predict-folder-named-jpg", f"{P} $FX/photos.jpg {CK} --topk 1", (0,), check=stdout_has("inside.jpg")),
        Case("predict-many-broken", f"{P} $FX/many {CK}", (0,), check=stdout_has("good.jpg")),
        Case("predict-only-broken", f"{P} $FX/img/zero.jpg $FX/img/random.jpg {CK}", (1,), "zero.jpg"),
        Case("predict-symlink", f"{P} $FX/link.jpg {CK} --topk 1", (0,), check=stdout_has("link.jpg")),
        Case("predict-dangling-symlink", f"{P} $FX/dangling.jpg {CK}", (1,), "dangling.jpg"),
        Case("predict-missing-file", f"{P} nothere.jpg {CK}", (1,), "nothere.jpg"),
        Case("predict-missing-among-good", f"{P} $FX/img/ok.jpg nothere.jpg {CK}", (1,), "nothere.jpg"),
        Case("predict-glob-unmatched", f"{P} '*.jpg' {CK}", (1,), "*.jpg"),
        Case("predict-devnull", f"{P} /dev/null {CK}", (1,), "/dev/null"),
        Case("predict-proc-file", f"{P} /proc/cpuinfo {CK}", (1,), "cpuinfo"),
        Case("predict-same-file-twice", f"{P} $FX/img/ok.jpg $FX/img/ok.jpg {CK} --json", (0,), check=stdout_has("ok.jpg")),
        Case("predict-no-paths", f"{P} {CK}", (2,), "paths"),
        Case("predict-no-model", f"{P} $FX/img/ok.jpg", (2,), "--model"),
        Case("predict-paths-after-flags", f"{P} {CK} --topk 1 $FX/img/ok.jpg", (0,), check=stdout_has("ok.jpg")),
        Case("predict-plain-pth", f"{P} $FX/img/ok.jpg -m levit_tiny -c $FX/tiny_sd.pth --img-size 64 --topk 1", (0,), check=stdout_has("ok.jpg")),
        Case("predict-wrapped-pth", f"{P} $FX/img/ok.jpg -m levit_tiny -c $FX/tiny_wrapped.pth --topk 1", (0,), check=stdout_has("ok.jpg")),
        Case("predict-fused-ckpt", f"{P} $FX/img/ok.jpg -c $FX/tiny2_fused.safetensors --topk 1", (0,), check=stdout_has("ok.jpg")),
        Case("predict-model-alias", f"{P} $FX/img/ok.jpg -m LeViT_tiny -c $FX/tiny.safetensors --topk 1", (0, 2), "LeViT_tiny"),
        Case("predict-double-suffix", f"{P} $FX/img/ok.jpg -m levit_tiny -c $FX/tiny.safetensors.pth --topk 1", (0,), check=stdout_has("ok.jpg")),
        Case("predict-pretrained-offline", f"{P} $FX/img/ok.jpg -m levit_tiny --pretrained", (1, 2), "levit_tiny", timeout=120),
    ]  # fmt: skip
    for suf, flags, needle, codes in BAD_CKPTS:
        cs.append(Case(f"predict-ckpt-{suf}", f"{P} $FX/img/ok.jpg {flags}", codes, needle))
    for suf, v, codes in BAD_IMG_SIZES:
        cs.append(Case(f"predict-img-size-{suf}", f"{P} $FX/img/ok.jpg {CK} --img-size {v}", codes, "--img-size"))
    flag_bads = [("topk-0", "--topk 0", "--topk"), ("topk-neg", "--topk -3", "--topk"), ("topk-abc", "--topk five", "--topk"),
                 ("topk-float", "--topk 1.5", "--topk"), ("batch-0", "-b 0", "--batch-size"), ("batch-neg", "-b -1", "--batch-size"),
                 ("crop-0", "--crop-pct 0", "--crop-pct"), ("crop-2", "--crop-pct 2", "--crop-pct"), ("crop-nan", "--crop-pct nan", "--crop-pct"),
                 ("decoder", "--decoder turbo", "--decoder"), ("backend", "--backend tensorrt", "--backend"),
                 ("precision", "--precision fp8", "--precision"), ("device", "--device tpu", "--device"),
                 ("device-cuda", "--device cuda", "--device cuda"), ("threads-0", "--threads 0", "--threads"),
                 ("workers-neg", "--workers -1", "--workers"), ("max-pixels-0", "--max-pixels 0", "--max-pixels"),
                 ("calibration-fp32", "--calibration $FX/photos", "--calibration"),
                 ("int8-eager", "--backend eager --precision int8", "int8"),
                 ("cudagraph-cpu", "--backend cudagraph", "cudagraph"),
                 ("resume-no-output", "--resume", "--resume"), ("overwrite-no-output", "--overwrite", "--overwrite"),
                 ("resume-and-overwrite", "-o r.jsonl --resume --overwrite", "--overwrite"),
                 ("unknown-flag", "--top-k 3", "--top-k"), ("fast-decode-value", "--fast-decode=yes", "--fast-decode"),
                 ("labels-missing", "--labels none.txt", "none.txt"), ("labels-dir", "--labels $FX/photos", "--labels"),
                 ("labels-devnull", "--labels /dev/null", "--labels"), ("labels-short", "--labels $FX/labels3.txt", "labels3.txt"),
                 ("labels-empty", "--labels $FX/labels_empty.txt", "labels_empty.txt")]  # fmt: skip
    for suf, flags, needle in flag_bads:
        cs.append(Case(f"predict-flag-{suf}", f"{P} $FX/img/ok.jpg {CK} {flags}", (2, 1), needle))
    cs += [
        Case("predict-fp16-cpu", f"{P} $FX/img/ok.jpg {CK} --precision fp16 --topk 1", (0,), check=stdout_has("ok.jpg"), timeout=180),
        Case("predict-max-pixels-small", f"{P} $FX/img/ok.jpg {CK} --max-pixels 100", (1,), "ok.jpg"),
        Case("predict-labels-ok", f"{P} $FX/img/ok.jpg {CK2} --labels $FX/labels2.txt --topk 1", (0,), check=stdout_has("ok.jpg")),
        Case("predict-topk-huge", f"{P} $FX/img/ok.jpg {CK2} --topk 50", (0, 2), "--topk"),
        Case("predict-batch-huge", f"{P} $FX/photos {CK} -b 100000 --topk 1", (0,), check=stdout_has("ok.jpg")),
        Case("predict-img-size-rect", f"{P} $FX/img/ok.jpg {CK} --img-size 64x96 --topk 1", (0,), check=stdout_has("ok.jpg")),
        Case("predict-tensor-decoder", f"{P} $FX/img {CK} --decoder tensor --topk 1 --json", (0,), check=stdout_has("cmyk.jpg")),
        Case("predict-fast-decode", f"{P} $FX/img {CK} --fast-decode --topk 1 --json", (0,), check=stdout_has("rotated.jpg")),
        Case("predict-include-logits", f"{P} $FX/photos {CK} --include-logits -o l.jsonl", (0,), check=file_has("l.jsonl", "logits")),
        Case("predict-onnxruntime", f"{P} $FX/photos {CK} --backend onnxruntime --topk 1", (0,), check=stdout_has("ok.jpg"), needs="onnxruntime"),
        Case("predict-openvino", f"{P} $FX/photos {CK} --backend openvino --topk 1", (0,), check=stdout_has("ok.jpg"), needs="openvino"),
        Case("predict-bf16", f"{P} $FX/photos {CK} --backend eager --precision bf16 --topk 1", (0,), check=stdout_has("ok.jpg")),
        Case("predict-int8-onnxruntime", f"{P} $FX/photos {CK} --backend onnxruntime --precision int8 --topk 1", (0,), check=stdout_has("ok.jpg"), needs="onnxruntime", timeout=180),
        Case("predict-int8-calibration-missing", f"{P} $FX/photos {CK} --backend onnxruntime --precision int8 --calibration nocal/", (1, 2), "nocal", needs="onnxruntime"),
        Case("predict-int8-calibration-broken", f"{P} $FX/photos {CK} --backend onnxruntime --precision int8 --calibration $FX/img/zero.jpg", (1, 2), "calibration", needs="onnxruntime"),
    ]  # fmt: skip
    cs += output_cases(P, f"{P} $FX/photos {CK} --topk 1")
    cs.append(Case("predict-ray-unreachable", f"{P} $FX/img/ok.jpg {CK} --ray 127.0.0.1:{closed_port()}", (1,), "127.0.0.1", timeout=120, needs="ray"))  # fmt: skip
    cs.append(Case("predict-ray-bad-address", f"{P} $FX/img/ok.jpg {CK} --ray not-a-host:xx", (1, 2), "not-a-host", timeout=120, needs="ray"))  # fmt: skip
    return cs


def output_cases(cmd: str, base: str) -> list[Case]:
    """``predict --output`` in every odd place."""
    c = "predict-out"
    return [
        Case(f"{c}-jsonl", f"{base} -o r.jsonl", (0,), check=rows_in("r.jsonl", 2)),
        Case(f"{c}-csv", f"{base} -o r.csv", (0,), check=rows_in("r.csv", 2)),
        Case(f"{c}-parquet", f"{base} -o r.parquet", (0,), check=file_has("r.parquet"), needs="pyarrow"),
        Case(f"{c}-suffix-txt", f"{base} -o r.txt", (2,), "r.txt"),
        Case(f"{c}-no-suffix", f"{base} -o results", (2,), "results"),
        Case(f"{c}-missing-folder", f"{base} -o new/sub/r.jsonl", (0, 1, 2), "new/sub"),
        Case(f"{c}-is-folder", f"{base} -o adir", (2,), "adir", setup=lambda d: (d / "adir").mkdir()),
        Case(f"{c}-parent-is-file", f"{base} -o afile/r.jsonl", (1, 2), "afile", setup=existing("afile")),
        Case(f"{c}-exists", f"{base} -o r.jsonl", (1, 2), "r.jsonl", setup=existing("r.jsonl")),
        Case(f"{c}-exists-overwrite", f"{base} -o r.jsonl --overwrite", (0,), check=rows_in("r.jsonl", 2), setup=existing("r.jsonl"), changes=("r.jsonl",)),
        Case(f"{c}-resume-foreign", f"{base} -o r.jsonl --resume", (1,), "r.jsonl", setup=existing("r.jsonl", "not json\n")),
        Case(f"{c}-resume-csv-foreign", f"{base} -o r.csv --resume", (1,), "r.csv", setup=existing("r.csv", "a,b\n1,2\n")),
        Case(f"{c}-resume-empty", f"{base} -o r.jsonl --resume", (0,), check=rows_in("r.jsonl", 2), setup=existing("r.jsonl", ""), changes=("r.jsonl",)),
        Case(f"{c}-resume-nothing", f"{base} -o r.jsonl --resume", (0,), check=rows_in("r.jsonl", 2)),
        Case(f"{c}-stale-partial", f"{base} -o r.jsonl", (0, 1, 2), "r.jsonl.partial", setup=existing("r.jsonl.partial", "")),
        Case(f"{c}-proc", f"{base} -o /proc/r.jsonl", (1, 2), "/proc/r.jsonl"),
        Case(f"{c}-devnull", f"{base} -o /dev/null", (0, 2), "/dev/null"),
        Case(f"{c}-full-disk", f"{cmd} $FX/photos {CK} --include-logits -o $FULL/r.jsonl", (1,), "no space & --resume", needs="mount", leaves=True),
        Case(f"{c}-read-only", f"{base} -o $RO/r.jsonl", (1, 2), "$RO", needs="mount"),
    ]  # fmt: skip


def eval_cases() -> list[Case]:
    """``levit eval``: datasets and flags."""
    E, cs = "eval", []
    cs += [
        Case("eval-ok", f"{E} --data $FX/evalset {CK2} -b 4 --workers 0", (0,), check=stdout_has("top-1")),
        Case("eval-ok-output", f"{E} --data $FX/evalset {CK2} -b 4 --workers 0 --output e.json", (0,), check=file_has("e.json", "top")),
        Case("eval-no-fuse", f"{E} --data $FX/evalset {CK2} --no-fuse --workers 0", (0,), check=stdout_has("top-1")),
        Case("eval-fused-ckpt", f"{E} --data $FX/evalset -c $FX/tiny2_fused.safetensors --workers 0", (0,), check=stdout_has("top-1")),
        Case("eval-no-data", f"{E} {CK2}", (2,), "--data"),
        Case("eval-data-missing", f"{E} --data nowhere {CK2}", (1, 2), "nowhere"),
        Case("eval-data-file", f"{E} --data $FX/img/ok.jpg {CK2}", (1, 2), "ok.jpg"),
        Case("eval-data-empty", f"{E} --data $FX/empty_dir {CK2}", (1, 2), "empty_dir"),
        Case("eval-data-no-images", f"{E} --data $FX/no_images/train {CK2} --workers 0", (1, 2), "no_images"),
        Case("eval-data-flat", f"{E} --data $FX/flat/train {CK2} --workers 0", (1, 2), "flat"),
        Case("eval-data-train-val-root", f"{E} --data $FX/data {CK2} --workers 0", (0,), check=stdout_has("(4 images)")),
        Case("eval-more-classes-than-model", f"{E} --data $FX/evalset_many {CK2} --workers 0", (1, 2), "class"),
        Case("eval-corrupt-image", f"{E} --data $FX/corrupt_img/train {CK2} --workers 0", (0, 1), "broken.png"),
        Case("eval-pipe-image", f"{E} --data $FX/pipe_img/train {CK2} --workers 0", (0, 1), "pipe.png"),
        Case("eval-output-missing-folder", f"{E} --data $FX/evalset {CK2} --workers 0 --output no/e.json", (0, 1, 2), "no/e.json"),
        Case("eval-output-is-folder", f"{E} --data $FX/evalset {CK2} --workers 0 --output adir", (1, 2), "adir", setup=lambda d: (d / "adir").mkdir()),
        Case("eval-output-proc", f"{E} --data $FX/evalset {CK2} --workers 0 --output /proc/e.json", (1, 2), "/proc/e.json"),
        Case("eval-output-read-only", f"{E} --data $FX/evalset {CK2} --workers 0 --output $RO/e.json", (1, 2), "$RO", needs="mount"),
        Case("eval-output-is-checkpoint", f"{E} --data $FX/evalset -c ck.json --workers 0 --output ck.json", (2,), "ck.json", setup=copy_in("tiny2.safetensors", "ck.json")),
        Case("eval-batch-0", f"{E} --data $FX/evalset {CK2} -b 0", (2,), "--batch-size"),
        Case("eval-workers-neg", f"{E} --data $FX/evalset {CK2} --workers -2", (2,), "--workers"),
        Case("eval-device-cuda", f"{E} --data $FX/evalset {CK2} --device cuda", (1, 2), "cuda"),
        Case("eval-crop-0", f"{E} --data $FX/evalset {CK2} --crop-pct 0", (2,), "--crop-pct"),
        Case("eval-decoder-bad", f"{E} --data $FX/evalset {CK2} --decoder x", (2,), "--decoder"),
        Case("eval-shards-pattern-missing", f"{E} --data 'val-{{000000..000003}}.tar' {CK2}", (1, 2), "val-"),
    ]  # fmt: skip
    for suf, flags, needle, codes in FEW_BAD_CKPTS:
        cs.append(Case(f"eval-ckpt-{suf}", f"{E} --data $FX/evalset {flags}", codes, needle))
    for suf, v, codes in BAD_IMG_SIZES[1:3]:
        cs.append(Case(f"eval-img-size-{suf}", f"{E} --data $FX/evalset {CK2} --img-size {v}", codes, "--img-size"))
    return cs


def export_cases() -> list[Case]:
    """``levit export``: formats, outputs, flags."""
    X, cs = "export", []
    cs += [
        Case("export-onnx", f"{X} {CK} --img-size 64 -o m.onnx", (0,), check=file_has("m.onnx", min_bytes=1000), timeout=120, needs="onnx"),
        Case("export-torchscript", f"{X} {CK} --img-size 64 -o m.pt", (0,), check=file_has("m.pt", min_bytes=1000), timeout=120),
        Case("export-openvino", f"{X} {CK} --img-size 64 -o m.xml", (0,), check=file_has("m.xml"), timeout=120, needs="openvino"),
        Case("export-format-flag", f"{X} {CK} --img-size 64 -f torchscript -o model.bin", (0, 2), "model.bin", timeout=120),
        Case("export-executorch", f"{X} {CK} --img-size 64 -o m.pte", (0,), check=file_has("m.pte", min_bytes=1000), timeout=240, needs="executorch"),
        Case("export-suffix-unknown", f"{X} {CK} -o model.xyz", (2,), "model.xyz"),
        Case("export-no-suffix", f"{X} {CK} -o model", (2,), "model"),
        Case("export-format-bad", f"{X} {CK} -f tflite -o m.tflite", (2,), "tflite"),
        Case("export-format-suffix-clash", f"{X} {CK} -f onnx -o m.pt", (0, 2), "m.pt", timeout=120),
        Case("export-no-output", f"{X} {CK}", (2,), "--output"),
        Case("export-output-missing-folder", f"{X} {CK} --img-size 64 -o new/m.pt", (0, 1, 2), "new/m.pt", timeout=120),
        Case("export-output-is-folder", f"{X} {CK} -o adir.pt", (1, 2), "adir.pt", setup=lambda d: (d / "adir.pt").mkdir()),
        Case("export-output-parent-file", f"{X} {CK} -o afile/m.pt", (1, 2), "afile", setup=existing("afile")),
        Case("export-output-exists", f"{X} {CK} --img-size 64 -o m.pt", (0,), check=file_has("m.pt", min_bytes=1000), setup=existing("m.pt"), changes=("m.pt",), timeout=120),
        Case("export-output-is-checkpoint", f"{X} -m levit_tiny -c ck.pt -o ck.pt", (2,), "ck.pt", setup=copy_in("tiny_sd.pth", "ck.pt")),
        Case("export-output-proc", f"{X} {CK} -o /proc/m.pt", (1, 2), "/proc/m.pt"),
        Case("export-full-disk-onnx", f"{X} {CK} --img-size 64 -o $FULL/m.onnx", (1,), "no space", needs="mount", timeout=120),
        Case("export-full-disk-openvino", f"{X} {CK} --img-size 64 -o $FULL/m.xml", (1,), "no space", needs="mount", timeout=120),
        Case("export-full-disk-torchscript", f"{X} {CK} --img-size 64 -o $FULL/m.pt", (1,), "no space", needs="mount", timeout=120),
        Case("export-read-only", f"{X} {CK} --img-size 64 -o $RO/m.onnx", (1, 2), "$RO", needs="mount", timeout=120),
        Case("export-opset-low", f"{X} {CK} --img-size 64 -o m.onnx --opset 5", (1, 2), "--opset", timeout=120),
        Case("export-opset-high", f"{X} {CK} --img-size 64 -o m.onnx --opset 99", (1, 2), "--opset", timeout=120),
        Case("export-opset-text", f"{X} {CK} -o m.onnx --opset latest", (2,), "--opset"),
        Case("export-batch-0", f"{X} {CK} -o m.onnx -b 0", (2,), "--batch-size"),
        Case("export-int8-onnx", f"{X} {CK} -o m.onnx --precision int8", (2,), "--precision"),
        Case("export-int8-no-calibration", f"{X} {CK} -o m.pte --precision int8", (2,), "--calibration"),
        Case("export-calibration-fp32", f"{X} {CK} -o m.pte --calibration $FX/photos", (2,), "--calibration"),
        Case("export-int8-activations-fp32", f"{X} {CK} -o m.pte --int8-activations static", (2,), "--int8-activations"),
        Case("export-dynamic-batch-onnx", f"{X} {CK} -o m.onnx --dynamic-batch", (0, 2), "--dynamic-batch", timeout=120),
        Case("export-min-agreement-2", f"{X} {CK} -o m.pte --precision int8 --calibration $FX/photos --min-agreement 2", (2,), "--min-agreement"),
        Case("export-tolerance-neg", f"{X} {CK} -o m.onnx --tolerance -1", (2,), "--tolerance"),
        Case("export-int8-calibration-broken", f"{X} {CK} -o m.pte --precision int8 --calibration $FX/img/zero.jpg", (1, 2), "calibration", timeout=120),
    ]  # fmt: skip
    for suf, flags, needle, codes in FEW_BAD_CKPTS:
        cs.append(Case(f"export-ckpt-{suf}", f"{X} {flags} -o m.onnx", codes, needle))
    for suf, v, codes in BAD_IMG_SIZES[1:3]:
        cs.append(Case(f"export-img-size-{suf}", f"{X} {CK} -o m.onnx --img-size {v}", codes, "--img-size"))
    return cs


TRAIN_FAST = "-m levit_tiny --img-size 32 --epochs 1 -b 2 --distillation none --device cpu workers=0 progress=false total_batch=null"  # fmt: skip


def train_cases() -> list[Case]:
    """``levit train``: layouts, recipes, outputs."""
    T, cs = "train", []
    good = f"{T} --data $FX/data -o run {TRAIN_FAST}"
    cs += [
        Case("train-ok", good, (0,), check=file_has("run/best.pth", min_bytes=1000), timeout=240),
        Case("train-ok-recipe-split", f"{T} --data $FX/data -o run epochs=1 -m levit_tiny lr=1e-3 --img-size 32 -b 2 --distillation none --device cpu workers=0 progress=false total_batch=null", (0,), check=file_has("run/best.pth"), timeout=240),
        Case("train-ok-config-file", f"{T} --data $FX/data -o run --config $FX/recipe.yaml --img-size 32 -b 2 --distillation none --device cpu workers=0 progress=false total_batch=null", (0,), check=file_has("run/best.pth"), timeout=240),
        Case("train-corrupt-image", f"{T} --data $FX/corrupt_img -o run {TRAIN_FAST}", (0, 1), "broken.png", timeout=240, leaves=True),
        Case("train-pipe-image", f"{T} --data $FX/pipe_img -o run {TRAIN_FAST} repeated_aug=1", (0, 1), "pipe.png", leaves=True),
        Case("train-no-data", f"{T} -o run {TRAIN_FAST}", (2,), "--data"),
        Case("train-data-and-dataset", f"{T} --data $FX/data --dataset digits -o run {TRAIN_FAST}", (2,), "--dataset"),
        Case("train-dataset-bad", f"{T} --dataset mnist -o run", (2,), "--dataset"),
        Case("train-data-missing", f"{T} --data nowhere -o run {TRAIN_FAST}", (1, 2), "nowhere"),
        Case("train-data-file", f"{T} --data $FX/img/ok.jpg -o run {TRAIN_FAST}", (1, 2), "ok.jpg"),
        Case("train-data-empty", f"{T} --data $FX/empty_dir -o run {TRAIN_FAST}", (1, 2), "empty_dir"),
        Case("train-no-val", f"{T} --data $FX/no_val -o run {TRAIN_FAST}", (1, 2), "val"),
        Case("train-one-class", f"{T} --data $FX/one_class -o run {TRAIN_FAST}", (0, 1, 2), "class", timeout=240, leaves=True),
        Case("train-empty-class", f"{T} --data $FX/empty_class -o run {TRAIN_FAST}", (1, 2), "emu"),
        Case("train-flat-layout", f"{T} --data $FX/flat -o run {TRAIN_FAST}", (1, 2), "flat"),
        Case("train-val-other-classes", f"{T} --data $FX/val_other -o run {TRAIN_FAST}", (1, 2), "val"),
        Case("train-train-is-file", f"{T} --data $FX/train_file -o run {TRAIN_FAST}", (1, 2), "train"),
        Case("train-no-images", f"{T} --data $FX/no_images -o run {TRAIN_FAST}", (1, 2), "no_images"),
        Case("train-data-is-train-folder", f"{T} --data $FX/data/train -o run {TRAIN_FAST}", (1, 2), "train"),
        Case("train-epochs-0", f"{T} --data $FX/data -o run --epochs 0", (2,), "--epochs"),
        Case("train-epochs-neg", f"{T} --data $FX/data -o run --epochs -1", (2,), "--epochs"),
        Case("train-epochs-float", f"{T} --data $FX/data -o run --epochs 1.5", (2,), "--epochs"),
        Case("train-batch-0", f"{T} --data $FX/data -o run -b 0", (2,), "--batch-size"),
        Case("train-img-size-30", f"{T} --data $FX/data -o run --img-size 30", (2,), "--img-size"),
        Case("train-img-size-rect", f"{T} --data $FX/data -o run --img-size 32x48", (2,), "--img-size"),
        Case("train-model-bad", f"{T} --data $FX/data -o run -m resnet50", (2,), "resnet50"),
        Case("train-distillation-bad", f"{T} --data $FX/data -o run --distillation medium", (2,), "--distillation"),
        Case("train-device-bad", f"{T} --data $FX/data -o run --device tpu", (2,), "--device"),
        Case("train-device-cuda", f"{T} --data $FX/data -o run -m levit_tiny --device cuda --distillation none", (1, 2), "cuda"),
        Case("train-hard-no-teacher-ckpt", f"{T} --data $FX/data -o run -m levit_tiny --distillation hard --img-size 32 workers=0", (1, 2), "teacher", timeout=120),
        Case("train-teacher-ckpt-missing", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --teacher-checkpoint nope.pth", (1, 2), "nope.pth"),
        Case("train-teacher-ckpt-text", f"{T} --data $FX/data -o run {TRAIN_FAST.replace('none', 'hard')} --teacher levit_tiny --teacher-checkpoint $FX/text.pth", (1, 2), "text.pth", timeout=120),
        Case("train-teacher-bad", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation hard --teacher no_such_net --teacher-checkpoint $FX/tiny2.safetensors", (1, 2), "no_such_net", timeout=120),
        Case("train-teacher-other-variant", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation hard --teacher levit_128s --teacher-checkpoint $FX/tiny2.safetensors", (1, 2), "levit_128s", timeout=120),
        Case("train-config-missing", f"{T} --data $FX/data -o run --config none.yaml", (1, 2), "none.yaml"),
        Case("train-config-bad-yaml", f"{T} --data $FX/data -o run --config $FX/bad.yaml", (1, 2), "bad.yaml"),
        Case("train-config-list", f"{T} --data $FX/data -o run --config $FX/list.yaml", (1, 2), "list.yaml"),
        Case("train-config-unknown-key", f"{T} --data $FX/data -o run --config $FX/unknown_key.yaml", (1, 2), "epochz"),
        Case("train-config-name-bad", f"{T} --data $FX/data -o run --config paperz", (1, 2), "paperz"),
        Case("train-key-unknown", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation none epochz=1", (2,), "epochz"),
        Case("train-key-bad-value", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation none lr=fast", (2,), "lr"),
        Case("train-key-no-equals", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation none epochs", (2,), "epochs"),
        Case("train-key-empty-value", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation none lr=", (2,), "lr"),
        Case("train-key-neg-lr", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation none lr=-1", (2,), "lr"),
        Case("train-key-mixup-neg", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation none mixup=-1", (2,), "mixup"),
        Case("train-key-drop-path", f"{T} --data $FX/data -o run -m levit_tiny -b 2 --distillation none drop_path=1.5", (2,), "drop_path"),
        Case("train-key-twice", f"{T} --data $FX/data -o run {TRAIN_FAST} lr=1e-3 lr=2e-3", (0, 2), "lr", timeout=240),
        Case("train-resume-missing", f"{T} --data $FX/data -o run -m levit_tiny --resume nope.pth", (2,), "nope.pth"),
        Case("train-resume-auto-empty", f"{T} --data $FX/data -o run {TRAIN_FAST} --resume auto", (0, 1, 2), "--resume", timeout=240),
        Case("train-resume-text", f"{T} --data $FX/data -o run {TRAIN_FAST} --resume $FX/text.pth", (1, 2), "text.pth"),
        Case("train-resume-other-model", f"{T} --data $FX/data -o run {TRAIN_FAST} --resume $FX/levit128s.safetensors", (1, 2), "levit128s", timeout=120),
        Case("train-output-is-file", f"{T} --data $FX/data -o afile {TRAIN_FAST}", (1, 2), "afile", setup=existing("afile")),
        Case("train-output-existing-run", f"{T} --data $FX/data -o run {TRAIN_FAST}", (0, 1, 2), "run", setup=existing("run/notes.txt"), timeout=240),
        Case("train-output-proc", f"{T} --data $FX/data -o /proc/run {TRAIN_FAST}", (1, 2), "/proc/run"),
        Case("train-output-read-only", f"{T} --data $FX/data -o $RO/run {TRAIN_FAST}", (1, 2), "$RO", needs="mount"),
        Case("train-output-full-disk", f"{T} --data $FX/data -o $FULL/run {TRAIN_FAST}", (1,), "no space", needs="mount", timeout=240),
        Case("train-shards-pattern-missing", f"{T} -o run -m levit_tiny --distillation none 'train_shards=t-{{0..3}}.tar' 'val_shards=v-{{0..1}}.tar'", (1, 2), "t-"),
        Case("train-digits-tiny", f"{T} --dataset digits -o run -m levit_tiny --img-size 32 --epochs 1 --distillation none workers=0 progress=false", (0,), check=file_has("run/best.pth"), timeout=300),
    ]  # fmt: skip
    return cs


def other_cases(port: int) -> list[Case]:
    """``levit``, ``models``, ``bench``, ``biases``, ``ablate``, ``data``, ``serve``."""
    cs = [
        Case("cli-no-command", "", (2,), "COMMAND"),
        Case("cli-unknown-command", "classify x.jpg", (2,), "classify"),
        Case("cli-version", "--version", (0,), check=stdout_has("levit")),
        Case("cli-help", "--help", (0,), check=stdout_has("predict")),
        Case("cli-typo-flag-global", "--verbose models", (2,), "--verbose"),
    ]
    for c in ("models", "predict", "serve", "bench", "export", "train", "eval", "ablate", "data", "biases"):
        cs.append(Case(f"{c}-help", f"{c} --help", (0,), check=stdout_has("examples")))
    cs += [
        Case("models-ok", "models", (0,), check=stdout_has("levit_128s")),
        Case("models-json", "models 'levit_1*' --json", (0,), check=stdout_has("levit_128s")),
        Case("models-alias", "models LeViT_128S", (0,), check=stdout_has("levit_128s")),
        Case("models-no-match", "models 'resnet*'", (1, 2), "resnet*"),
        Case("models-ablations", "models --ablations", (0,), check=stdout_has("A1")),
        Case("models-two-patterns", "models levit_128 levit_256", (2,), "levit_256"),
        Case("models-pipe-closed", "models", (0,), check=stdout_has("levit")),
        Case("bench-list", "bench --list", (0,), check=stdout_has("levit_tiny")),
        Case("bench-tiny", "bench --models levit_tiny --img-size 64 -b 2 --warmup 0.2 --windows 1 --window 0.2", (0,), check=stdout_has("levit_tiny"), timeout=120),
        Case("bench-tiny-output", "bench --models levit_tiny --img-size 64 -b 2 --warmup 0.2 --windows 1 --window 0.2 -o b.csv", (0,), check=file_has("b.csv", "levit_tiny"), timeout=120),
        Case("bench-model-bad", "bench --models levit_999", (2,), "levit_999"),
        Case("bench-models-empty", "bench --models ''", (2,), "--models"),
        Case("bench-models-comma", "bench --models levit_tiny, --img-size 64 -b 2 --warmup 0.2 --windows 1 --window 0.2", (0, 2), "--models", timeout=120),
        Case("bench-batch-0", "bench --models levit_tiny -b 0", (2,), "--batch-size"),
        Case("bench-batch-list-bad", "bench --models levit_tiny -b 1,x", (2,), "--batch-size"),
        Case("bench-threads-0", "bench --models levit_tiny --threads 0", (2,), "--threads"),
        Case("bench-window-neg", "bench --models levit_tiny --window -1", (2,), "--window"),
        Case("bench-windows-0", "bench --models levit_tiny --windows 0", (2,), "--windows"),
        Case("bench-warmup-neg", "bench --models levit_tiny --warmup -1", (2,), "--warmup"),
        Case("bench-img-size-30", "bench --models levit_tiny --img-size 30", (2,), "--img-size"),
        Case("bench-suite-bad", "bench --suite mobile", (2,), "--suite"),
        Case("bench-backend-bad", "bench --backend tvm", (2,), "--backend"),
        Case("bench-device-cuda", "bench --device cuda --models levit_tiny", (1, 2), "cuda"),
        Case("bench-output-suffix", "bench --models levit_tiny -o b.txt", (2,), "b.txt"),
        Case("bench-output-missing-folder", "bench --models levit_tiny -o no/b.csv", (1, 2), "no/b.csv"),
        Case("bench-plot-suffix", "bench --models levit_tiny --plot p.jpg", (2,), "p.jpg"),
        Case("bench-output-proc", "bench --models levit_tiny -o /proc/b.csv", (1, 2), "/proc/b.csv"),
        Case("biases-ok", f"biases {CK} -o b.png", (0,), check=file_has("b.png", min_bytes=100), timeout=120, needs="matplotlib"),
        Case("biases-model-only", "biases -m levit_tiny -o b.png", (0,), check=file_has("b.png"), timeout=120, needs="matplotlib"),
        Case("biases-resampled", f"biases {CK} --img-size 128 -o b.png", (0,), check=file_has("b.png"), timeout=120, needs="matplotlib"),
        Case("biases-fused", "biases -c $FX/tiny2_fused.safetensors -o b.png", (0, 1), "fused", timeout=120, needs="matplotlib"),
        Case("biases-output-jpg", f"biases {CK} -o b.jpg", (0, 2), "b.jpg", timeout=120),
        Case("biases-output-missing-folder", f"biases {CK} -o no/b.png", (0, 1, 2), "no/b.png", timeout=120),
        Case("biases-output-folder", f"biases {CK} -o adir", (1, 2), "adir", setup=lambda d: (d / "adir").mkdir()),
        Case("biases-output-proc", f"biases {CK} -o /proc/b.png", (1, 2), "/proc/b.png"),
        Case("biases-output-read-only", f"biases {CK} -o $RO/b.png", (1, 2), "$RO", needs="mount"),
        Case("biases-output-exists", f"biases {CK} -o b.png", (0,), check=file_has("b.png", min_bytes=100), setup=existing("b.png"), changes=("b.png",), timeout=120),
    ]  # fmt: skip
    for suf, flags, needle, codes in FEW_BAD_CKPTS:
        cs.append(Case(f"biases-ckpt-{suf}", f"biases {flags} -o b.png", codes, needle))
    cs += [Case(f"biases-img-size-{s}", f"biases {CK} --img-size {v} -o b.png", c, "--img-size") for s, v, c in BAD_IMG_SIZES[1:3]]  # fmt: skip
    cs += ablate_cases() + data_cases() + serve_cases(port)
    return cs


def ablate_cases() -> list[Case]:
    """``levit ablate``."""
    A = "ablate --epochs 1 --bench-seconds 0.1 --bench-img-size 32"
    return [
        Case("ablate-variant-bad", f"{A} --variants base,A9 -o sweep", (2,), "A9"),
        Case("ablate-variants-empty", f"{A} --variants '' -o sweep", (2,), "--variants"),
        Case("ablate-epochs-0", "ablate --epochs 0 -o sweep", (2,), "--epochs"),
        Case("ablate-img-size-30", "ablate --img-size 30 -o sweep", (2,), "--img-size"),
        Case("ablate-batch-0", "ablate -b 0 -o sweep", (2,), "--batch-size"),
        Case("ablate-threads-0", "ablate --threads 0 -o sweep", (2,), "--threads"),
        Case("ablate-bench-seconds-neg", "ablate --bench-seconds -1 -o sweep", (2,), "--bench-seconds"),
        Case("ablate-resume-bad", "ablate --resume yes -o sweep", (2,), "--resume"),
        Case("ablate-resume-nothing", f"{A} --variants base --resume auto -o sweep", (0, 1, 2), "sweep", timeout=300),
        Case("ablate-data-missing", f"{A} --data nowhere -o sweep", (1, 2), "nowhere"),
        Case("ablate-data-flat", f"{A} --data $FX/flat -o sweep", (1, 2), "flat"),
        Case("ablate-output-file", f"{A} -o afile", (1, 2), "afile", setup=existing("afile")),
        Case("ablate-output-proc", f"{A} -o /proc/sweep", (1, 2), "/proc/sweep"),
        Case("ablate-output-read-only", f"{A} -o $RO/sweep", (1, 2), "$RO", needs="mount"),
        Case("ablate-key-unknown", f"{A} -o sweep epochz=1", (2,), "epochz"),
        Case("ablate-teacher-missing", f"{A} -o sweep --teacher-checkpoint nope.pth", (1, 2), "nope.pth"),
        Case("ablate-base-tiny", f"{A} --variants base --data $FX/data -b 4 -o sweep workers=0", (0,), check=file_has("sweep/ablations.md"), timeout=300),
    ]  # fmt: skip


def data_cases() -> list[Case]:
    """``levit data shard`` and ``levit data teacher-cache``."""
    TC = "data teacher-cache t.cache epochs=1 batch_size=2 --data $FX/data -m levit_tiny --teacher levit_tiny"
    return [
        Case("data-no-action", "data", (2,), "ACTION"),
        Case("data-action-bad", "data convert a b", (2,), "convert"),
        Case("data-shard-ok", "data shard $FX/data shards --shard-size 3", (0,), check=file_has("shards/levit-shards.json")),
        Case("data-shard-src-missing", "data shard nowhere shards", (1, 2), "nowhere"),
        Case("data-shard-src-file", "data shard $FX/img/ok.jpg shards", (1, 2), "ok.jpg"),
        Case("data-shard-src-flat", "data shard $FX/flat shards", (1, 2), "flat"),
        Case("data-shard-no-val", "data shard $FX/no_val shards", (0, 1, 2), "val"),
        Case("data-shard-empty-class", "data shard $FX/empty_class shards", (0, 1, 2), "emu"),
        Case("data-shard-corrupt", "data shard $FX/corrupt_img shards", (0, 1), "broken.png"),
        Case("data-shard-pipe", "data shard $FX/pipe_img shards", (0, 1), "pipe.png"),
        Case("data-shard-size-0", "data shard $FX/data shards --shard-size 0", (2,), "--shard-size"),
        Case("data-shard-dst-exists", "data shard $FX/data shards", (1, 2), "shards", setup=existing("shards/keep.txt")),
        Case("data-shard-dst-file", "data shard $FX/data afile", (1, 2), "afile", setup=existing("afile")),
        Case("data-shard-dst-inside-src", "data shard src src/shards", (0,), check=file_has("src/shards/levit-shards.json"), setup=copy_in("data", "src")),
        Case("data-shard-dst-proc", "data shard $FX/data /proc/shards", (1, 2), "/proc/shards"),
        Case("data-shard-dst-read-only", "data shard $FX/data $RO/shards", (1, 2), "$RO", needs="mount"),
        Case("data-shard-dst-full", "data shard $FX/data $FULL/shards", (1,), "no space & $FULL", needs="mount"),
        Case("data-shard-missing-dst", "data shard $FX/data", (2,), "DST"),
        Case("data-teacher-no-ckpt", "data teacher-cache t.cache --data $FX/data", (2,), "--teacher-checkpoint"),
        Case("data-teacher-ckpt-missing", f"{TC} --teacher-checkpoint nope.pth", (1, 2), "nope.pth"),
        Case("data-teacher-ckpt-text", f"{TC} --teacher-checkpoint $FX/text.pth", (1, 2), "text.pth"),
        Case("data-teacher-topk-0", f"{TC} --teacher-checkpoint $FX/tiny2.safetensors --topk 0", (2,), "--topk"),
        Case("data-teacher-no-data", "data teacher-cache t.cache -m levit_tiny --teacher-checkpoint $FX/tiny2.safetensors", (2,), "--data"),
        Case("data-teacher-data-missing", f"{TC.replace('$FX/data', 'nowhere')} --teacher-checkpoint $FX/tiny2.safetensors", (1, 2), "nowhere"),
        Case("data-teacher-output-dir", f"{TC.replace('t.cache', 'adir')} --teacher-checkpoint $FX/tiny2.safetensors", (1, 2), "adir", setup=lambda d: (d / "adir").mkdir()),
        Case("data-teacher-output-missing-folder", f"{TC.replace('t.cache', 'no/t.cache')} --teacher-checkpoint $FX/tiny2.safetensors img_size=32 distillation=hard", (0, 1, 2), "no/t.cache", timeout=180),
        Case("data-teacher-output-is-teacher", f"{TC.replace('t.cache', 'teacher.pth')} --teacher-checkpoint teacher.pth", (2,), "teacher.pth", setup=copy_in("tiny2.safetensors", "teacher.pth")),
        Case("data-teacher-key-bad", f"{TC} --teacher-checkpoint $FX/tiny2.safetensors epochz=1", (2,), "epochz"),
        Case("data-teacher-ok", f"{TC} --teacher-checkpoint $FX/tiny2.safetensors img_size=32 distillation=hard workers=0", (0,), check=file_has("t.cache", min_bytes=10), timeout=180),
    ]  # fmt: skip


def serve_cases(port: int) -> list[Case]:
    """``levit serve``: only input that must be refused before serving (a server that starts runs until
    stopped, so good input is not a case here; tests/test_serve.py covers it)."""
    S = f"serve {CK}"
    return [
        Case("serve-port-neg", f"{S} --port -1", (2,), "--port"),
        Case("serve-port-big", f"{S} --port 70000", (2,), "--port"),
        Case("serve-port-text", f"{S} --port http", (2,), "--port"),
        Case("serve-port-busy", f"{S} --port {port} --quiet", (1,), str(port), timeout=60),
        Case("serve-host-bad", f"{S} --host 256.1.1.1 --port 0 --quiet", (1, 2), "256.1.1.1", timeout=60),
        Case("serve-max-batch-0", f"{S} --max-batch-size 0", (2,), "--max-batch-size"),
        Case("serve-max-wait-neg", f"{S} --max-wait-ms -5", (2,), "--max-wait-ms"),
        Case("serve-max-body-0", f"{S} --max-body-mb 0", (2,), "--max-body-mb"),
        Case("serve-topk-0", f"{S} --topk 0", (2,), "--topk"),
        Case("serve-lanes-0", f"{S} --lanes 0", (2,), "--lanes"),
        Case("serve-threads-0", f"{S} --threads 0", (2,), "--threads"),
        Case("serve-max-queue-0", f"{S} --max-queue 0", (2,), "--max-queue"),
        Case("serve-decode-workers-0", f"{S} --decode-workers 0", (2,), "--decode-workers"),
        Case("serve-replicas-no-ray", f"{S} --replicas 2", (2,), "--replicas"),
        Case("serve-grpc-with-ray", f"{S} --ray --grpc-port 0", (2,), "--grpc-port"),
        Case("serve-ckpt-missing", "serve -c nope.safetensors", (1, 2), "nope.safetensors"),
        Case("serve-ckpt-onnx", "serve -c $FX/model.onnx", (1,), "ONNX"),
        Case("serve-model-bad", "serve -m levit_999", (2,), "levit_999"),
        Case("serve-model-pair-missing", "serve -m a=nope.safetensors", (1, 2), "nope.safetensors"),
        Case("serve-model-pair-twice", "serve -m a=$FX/tiny.safetensors -m a=$FX/tiny.safetensors", (2,), "a"),
        Case("serve-calibration-fp32", f"{S} --calibration $FX/photos", (2,), "--calibration"),
        Case("serve-int8-eager", f"{S} --backend eager --precision int8", (1, 2), "int8"),
        Case("serve-crop-0", f"{S} --crop-pct 0", (2,), "--crop-pct"),
        Case("serve-img-size-30", f"{S} --img-size 30", (2,), "--img-size"),
        Case("serve-drain-neg", f"{S} --drain-timeout -1", (2,), "--drain-timeout"),
    ]  # fmt: skip


def all_cases(port: int) -> list[Case]:
    """Every case, in a stable order."""
    return predict_cases() + eval_cases() + export_cases() + train_cases() + other_cases(port)


# ---- running and judging ----------------------------------------------------------------------
def expand(text: str, fx: Path, mounts: Mounts) -> str:
    """The command with the fixture and mount folders filled in."""
    return text.replace("$FX", str(fx)).replace("$FULL", str(mounts.full)).replace("$RO", str(mounts.ro))


def clean_lines(stderr: str) -> list[str]:
    """stderr's lines without progress bars (the last state of each ``\\r`` line)."""
    out = []
    for line in stderr.splitlines():
        line = line.split("\r")[-1].rstrip()
        if line and not re.search(r"\d+it/s|it/s\]|\| *\d+/\d+ \[", line):
            out.append(line)
    return out


def judge(case: Case, r: subprocess.CompletedProcess, case_dir: Path, before: dict[str, str], fx: Path, mounts: Mounts) -> tuple[str, str]:  # fmt: skip
    """The verdict and its reason."""
    lines = clean_lines(r.stderr)
    if "Traceback (most recent call last)" in r.stderr:
        return "defect", "traceback"
    if r.returncode < 0 or r.returncode not in (0, 1, 2):
        return "defect", f"crash (exit {r.returncode})"
    bad_input = case.codes != (0,)
    after = snapshot(case_dir)
    partial = [k for k in after if k.endswith(".partial") and k not in before]
    if partial:
        return "defect", f"left {partial}"
    changed = [k for k in before if before[k] != after.get(k) and not (r.returncode == 0 and k in case.changes)]
    if changed:
        return "defect", f"changed or removed the user's {changed}"
    new = [k for k in after if k not in before]
    empty_dirs = [k for k in new if k.endswith("/") and not any(o.startswith(k) and o != k for o in after)]
    if r.returncode != 0 and new and not case.leaves:
        return "defect", f"failed but left {new[:3]}"
    on_disk = sorted(str(p.relative_to(mounts.full)) for p in mounts.full.rglob("*") if p.name != "filler") if case.needs == "mount" else []  # fmt: skip
    if r.returncode != 0 and on_disk and not case.leaves:
        return "defect", f"failed but left {on_disk[:3]} on the full disk"
    if empty_dirs and r.returncode == 0 and case.check is None:
        return "defect", f"left empty folder(s) {empty_dirs}"
    if bad_input and r.returncode == 0 and 0 not in case.codes:
        return "defect", "exit 0 on bad input"
    if not bad_input and r.returncode != 0:
        return "defect", f"good input refused (exit {r.returncode}): {lines[-1] if lines else ''}"
    if r.returncode == 0 and case.check is not None:
        problem = case.check(case_dir, r)
        if problem:
            return "defect", problem
    notes = []
    if r.returncode != 0:
        if r.returncode not in case.codes:
            notes.append(f"exit {r.returncode}, expected {'/'.join(map(str, case.codes))}")
        last = lines[-1] if lines else ""
        for needle in case.needle.split(" & ") if case.needle else ():
            if not any(expand(alt, fx, mounts) in r.stderr for alt in needle.split("|")):
                notes.append(f"message does not name {needle!r}")
        if len(last) > 400:
            notes.append(f"last line is {len(last)} characters")
        if not last.startswith("levit"):
            notes.append("last line is not levit's")
        if "[Errno" in last:  # Python's OSError text: the system's words, not what to do
            notes.append("a raw OS error")
    own = [ln for ln in lines if not USAGE_LINE.match(ln)]
    dups = sorted({ln for ln in own if own.count(ln) > 1})
    if dups:
        notes.append(f"printed twice: {dups[0][:80]!r}")
    noise = [ln for ln in own if NOISE.search(ln) and not ln.startswith(OWN_WARNINGS)]
    if noise:
        notes.append(f"noise: {noise[0][:100]!r}")
    return ("weak", "; ".join(notes)) if notes else ("ok", "")


def write_log(root: Path, case: Case, head: str, stderr: str) -> None:
    """What the user saw, in ``logs/`` beside the case folders (not in them: they are checked)."""
    log = root / "logs" / f"{case.id}.txt"
    log.parent.mkdir(exist_ok=True)
    log.write_text(f"$ levit {case.cmd}\n{head}\n--- stderr\n{stderr}")


def run_case(case: Case, root: Path, fx: Path, mounts: Mounts, jobs: int) -> Result:
    """Run one case in its own folder and judge it."""
    if case.needs == "mount" and not mounts.ok:
        return Result(case, None, 0.0, "skipped", "cannot mount a tmpfs here")
    if case.needs and case.needs != "mount":
        import importlib.util

        if importlib.util.find_spec(case.needs) is None:
            return Result(case, None, 0.0, "skipped", f"{case.needs} not installed")
    case_dir = root / "cases" / case.id
    case_dir.mkdir(parents=True)
    if case.setup:
        case.setup(case_dir)
    if case.needs == "mount":
        mounts.refill()
    before = snapshot(case_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1:
        env["OMP_NUM_THREADS"] = "1"  # two cases at once on a small machine: one core each
    argv = [sys.executable, "-m", "levit", *shlex.split(expand(case.cmd, fx, mounts))]
    t = time.perf_counter()
    try:
        r = subprocess.run(argv, cwd=case_dir, env=env, capture_output=True, text=True, timeout=case.timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        write_log(root, case, "killed at the time limit", err)
        lines = clean_lines(err)
        return Result(case, None, time.perf_counter() - t, "defect", f"hang: no exit in {case.timeout:.0f} s", shorten(lines[-1], root, fx, mounts) if lines else "")  # fmt: skip
    seconds = time.perf_counter() - t
    write_log(root, case, f"exit {r.returncode}\n--- stdout\n{r.stdout}", r.stderr)
    verdict, why = judge(case, r, case_dir, before, fx, mounts)
    lines = clean_lines(r.stderr)
    first = next((ln for ln in lines if ln.startswith(("levit", "skipped", "warning"))), lines[-1] if lines else "")
    return Result(case, r.returncode, seconds, verdict, why, shorten(first, root, fx, mounts))


def shorten(line: str, root: Path, fx: Path, mounts: Mounts) -> str:
    """A stderr line with this run's temporary folders written as the table's commands write them."""
    for path, name in ((fx, "$FX"), (mounts.full, "$FULL"), (mounts.ro, "$RO"), (root / "cases", "$CASES")):
        line = line.replace(str(path), name)
    return line


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def expected(case: Case) -> str:
    """What a good CLI does, in a few words."""
    if case.codes == (0,):
        return "exit 0, output"
    return "exit " + "/".join(map(str, case.codes)) + (f", names `{case.needle}`" if case.needle else "")


def write_table(results: list[Result], path: Path, seconds: float) -> str:
    """The markdown table and the summary line; returns the summary."""
    counts = {v: sum(r.verdict == v for r in results) for v in ("ok", "weak", "defect", "skipped")}
    skipped = f", {counts['skipped']} skipped" if counts["skipped"] else ""
    summary = (
        f"{counts['ok']} ok, {counts['weak']} weak, {counts['defect']} defect{skipped}"
        f" ({len(results)} cases, {seconds / 60:.1f} min)"
    )
    by_command: dict[str, dict[str, int]] = {}
    for r in results:  # the command is the id's first word (predict-out-csv: predict)
        counts_of = by_command.setdefault(
            r.case.id.split("-")[0], dict.fromkeys(("ok", "weak", "defect", "skipped"), 0)
        )
        counts_of[r.verdict] += 1
    head = ["| command | cases | ok | weak | defect | skipped |", "|---|---|---|---|---|---|"]
    head += [
        f"| {c} | {sum(n.values())} | {n['ok']} | {n['weak']} | {n['defect']} | {n['skipped']} |"
        for c, n in by_command.items()
    ]
    rows = ["| case | command (`levit ...`) | expected | exit | s | verdict | stderr (levit's first line) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        verdict = r.verdict + (f": {r.why}" if r.why else "")
        code = "-" if r.code is None else str(r.code)
        rows.append(
            f"| {r.case.id} | `{cell(r.case.cmd)}` | {cell(expected(r.case))} | {code} | {r.seconds:.1f} | "
            f"{cell(verdict)} | {cell(r.first_line[:160])} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"**{summary}**\n\n" + "\n".join(head) + "\n\n" + "\n".join(rows) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's flags."""
    p = argparse.ArgumentParser(
        description="Run bad and unusual input through every levit command (python -m levit, one subprocess "
        "each) and write a markdown table of verdicts: ok, weak (vague message, noise), defect (traceback, "
        "hang, exit 0 on bad input, a half-written or lost file).",
        epilog="example: python benchmarks/bad_inputs.py --out bad_inputs.md --jobs 2 (docs/errors.md shows its table)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("bad_inputs.md"), help="markdown table to write (default: %(default)s)"
    )
    p.add_argument("--only", default="", help="run only the cases whose id contains this text (e.g. predict-out)")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="list the case ids and commands, run nothing")
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (printed): its logs/ has each case's output"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the fixtures, run the cases, write the table; exit 1 when a case is a defect."""
    args = parse_args(argv)
    holder, port = busy_port()
    cases = [c for c in all_cases(port) if args.only in c.id]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    if args.list:
        for c in cases:
            print(f"{c.id:45s} levit {c.cmd}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="levit-bad-inputs-"))
    fx = root / "fx"
    FIXTURES[:] = [fx]
    mounts = Mounts(root)
    t0 = time.perf_counter()
    try:
        print(f"fixtures in {fx} ...", flush=True)
        make_fixtures(fx)
        fx_before = snapshot(fx)
        results: list[Result] = []
        mount_cases = [c for c in cases if c.needs == "mount"]  # they share one full disk: one at a time
        others = [c for c in cases if c.needs != "mount"]
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = [pool.submit(run_case, c, root, fx, mounts, args.jobs) for c in others]
            futures.append(pool.submit(lambda: [run_case(c, root, fx, mounts, args.jobs) for c in mount_cases]))
            for f in concurrent.futures.as_completed(futures):
                got = f.result()
                for r in got if isinstance(got, list) else [got]:
                    results.append(r)
                    print(f"[{len(results):3d}/{len(cases)}] {r.verdict:7s} {r.seconds:5.1f}s {r.case.id}  {r.why}", flush=True)  # fmt: skip
        changed = [k for k in fx_before if snapshot(fx).get(k) != fx_before[k]]
        if changed:  # a command wrote into the user's input
            results.append(Result(Case("inputs-untouched", "(all cases)", (0,)), None, 0.0, "defect", f"changed {changed[:5]}"))  # fmt: skip
        order = {c.id: i for i, c in enumerate(cases)}
        results.sort(key=lambda r: order.get(r.case.id, len(order)))
        summary = write_table(results, args.out, time.perf_counter() - t0)
        print(f"{summary}; table in {args.out}")
        return 1 if any(r.verdict == "defect" for r in results) else 0
    finally:
        holder.close()
        mounts.close()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
