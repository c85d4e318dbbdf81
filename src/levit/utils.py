"""Small helpers shared across levit: atomic file writes, one-line error text, torch's thread count.

Nothing here imports torch at import time, so the CLI can use it before the heavy imports.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # matplotlib is an optional extra (plot)
    from matplotlib.figure import Figure

__all__ = [
    "atomic_path",
    "available_cpus",
    "available_memory",
    "default_workers",
    "first_line",
    "fsync_dir",
    "num_threads",
    "open_regular",
    "os_error_line",
    "save_figure",
    "unwritable_reason",
]


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


def os_error_line(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for a failed file operation: the file (``path``, else the one the error names), the
    system's reason and its errno name, e.g. ``out.csv: no space left on device (ENOSPC)``. A full
    disk raised by a write or a flush names no file; the caller knows which one it was writing."""
    where = path if path is not None else (e.filename if e.filename is not None else None)
    reason = (e.strerror or str(e) or type(e).__name__).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    code = errno.errorcode.get(e.errno or 0)
    text = f"{reason} ({code})" if code else reason
    return f"{where}: {text}" if where is not None else text


def open_regular(path: str | os.PathLike, buffering: int = -1) -> BinaryIO | None:
    """``path`` opened for binary reading without ever blocking, or ``None`` where it is no regular
    file (a pipe, socket or device). A plain ``open`` of a pipe waits for a writer forever, so one
    named like a photo or a shard (or swapped in after a folder was listed) would stop a whole job
    there; it is opened non-blocking instead, which changes nothing for a regular file. ``open``'s
    ``OSError`` where the path cannot be opened (missing, no permission, a folder)."""
    f = open(path, "rb", buffering=buffering, opener=_open_nonblocking)  # noqa: SIM115 (returned open)
    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        return f
    f.close()
    return None


def _open_nonblocking(path: str, flags: int) -> int:
    """``open``'s opener: ``os.open`` with ``O_NONBLOCK`` where the system has it."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


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


def save_figure(fig: Figure, path: str | os.PathLike, **savefig_kwargs: object) -> Path:
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


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_workers(cap: int = 8) -> int:
    """Data-loading worker processes when none are asked for: the cores available, shared among the
    processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), at most ``cap``."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(cap, available_cpus() // local))


def process_memory(field: str = "VmRSS") -> int | None:
    """Bytes of this process's memory as ``/proc/self/status`` gives it: ``VmRSS`` (resident now) or
    ``VmHWM`` (the resident peak); None where it cannot be read (not Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def memory_limit() -> int | None:
    """Bytes of memory this process may hold at most: the machine's, lowered to its cgroup's limit
    when one is set (a container); None where neither can be read."""
    sizes = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with contextlib.suppress(OSError, ValueError):
        sizes.append(int(Path("/sys/fs/cgroup/memory.max").read_text()))  # "max" (no limit) is not a number
    return min(sizes) if sizes else None


def available_memory() -> int | None:
    """Bytes of memory this process can still take: ``MemAvailable`` of ``/proc/meminfo``, lowered
    to a cgroup's limit when one is set; None where neither can be read."""
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = max(0, int(limit) - used)
            have = room if have is None else min(have, room)
    except (OSError, ValueError):
        pass
    return have


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at ``path`` (None when it can), checked before a long job runs:
    the folder is missing or is a file, the path is a folder, or the folder refuses a new file (a
    probe file is created and removed, which also catches read-only and special file systems)."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        return f"{path} is a folder; give a file name"
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            return f"{p} is a file, not a folder"
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    probe = folder / f".{path.name}.{os.getpid()}.probe"
    try:
        with open(probe, "x"):
            pass
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror or type(e).__name__})"
    with contextlib.suppress(OSError):
        probe.unlink()
    return None
