"""Small helpers shared across levit: atomic file writes, one-line error text, torch's thread count.

Nothing here imports torch at import time, so the CLI can use it before the heavy imports.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "first_line", "fsync_dir", "num_threads", "save_figure"]


def first_line(e: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an exception's (or a string's) text, whole sentences kept up to
    ``limit`` characters: for one-line error messages that quote another library."""
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(line) > limit:
        cut = line[:limit]
        end = max(cut.rfind(". "), cut.rfind("; "), cut.rfind(": "))
        line = (cut[: end + 1] if end > limit // 2 else cut.rstrip()) + " ..."
    return line


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, fsync the file, give it the
    user's umask permissions and rename it onto ``path`` (then fsync the folder). On any error the
    temporary file is removed and ``path`` is untouched: a crash never leaves half a file under the
    real name.

    ``companions`` are suffixes of files written next to the temporary one that move with it (for
    OpenVINO's ``.xml`` + ``.bin`` pair: ``companions=(".bin",)``)::

        with atomic_path("model.onnx") as tmp:
            write_onnx(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    extra = [(tmp.with_suffix(s), path.with_suffix(s)) for s in companions]
    try:
        yield tmp
        mode = _umask_mode()
        for src in (tmp, *(s for s, _ in extra)):
            with open(src, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(src, mode)
        for src, dst in extra:  # companions first, so the main file never points at a missing one
            os.replace(src, dst)
        os.replace(tmp, path)
    finally:
        for f in (tmp, *(s for s, _ in extra)):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    fsync_dir(path.parent)


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs: object) -> Path:
    """Write a matplotlib figure atomically (:func:`atomic_path`) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        plt.close(fig)
    return path


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to ``threads``, then restore it
    (``None``, or the count already in force: nothing is changed, which costs nothing per call)."""
    import torch

    prev = torch.get_num_threads()
    if threads is None or threads == prev:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
