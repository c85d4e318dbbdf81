"""The reaper of a local Ray cluster: a small process that outlives the levit process which started the
cluster (``levit predict --ray``, ``levit serve --ray`` without an address) and, once that process is
gone however it ended (``kill -9`` included), ends the cluster's processes: those the driver started
while ``ray.init`` ran, and everything they started.

Ray's own processes stop when their driver dies only in part: its GCS and raylet notice within
seconds, but the dashboard and runtime-environment agents, children of the raylet, are left to the
init process and live on for a minute or more. A normal exit (``ray.shutdown()``) leaves nothing for
the reaper to do.

Linux only (it reads ``/proc``): elsewhere :func:`watch` does nothing. The reaper imports nothing
but the standard library (it runs as ``python -c`` with this file's text, so that it needs no
import path), polls the driver every half second (reading one small file) and notes the cluster's
processes 1, 2, ..., 10 s after it starts and every 10 s after that; a process is identified by its
PID and its start time, so a PID reused by an unrelated process is never signalled. They get
SIGTERM, then SIGKILL 2 s later if still there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

__all__ = ["children", "descendants", "process_start", "reap", "watch"]

POLL_S = 0.5  # how often the driver is checked
GRACE_S = 2.0  # SIGTERM, then SIGKILL after this long


def process_start(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks) of ``pid`` from ``/proc``, or None if it is gone (a
    zombie too: it has ended, and only waits for its parent to collect its exit status)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if fields[0] in (b"Z", b"X") else (int(fields[1]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def descendants(*roots: int) -> set[tuple[int, int]]:
    """Every process below ``roots`` (children, their children, ...), as (PID, start time): one pass
    over ``/proc``."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc: nothing to watch
        return set()
    for name in names:
        if name.isdigit() and (s := process_start(int(name))) is not None:
            children.setdefault(s[0], []).append((int(name), s[1]))
    out: set[tuple[int, int]] = set()
    todo = list(roots)
    while todo:
        for pid, started in children.get(todo.pop(), ()):
            out.add((pid, started))
            todo.append(pid)
    return out


def _alive(procs: set[tuple[int, int]]) -> list[int]:
    return [pid for pid, started in procs if (s := process_start(pid)) is not None and s[1] == started]


def children(pid: int) -> set[tuple[int, int]]:
    """The processes whose parent is ``pid`` now, as (PID, start time)."""
    return {(p, started) for p, started in descendants(pid) if (s := process_start(p)) is not None and s[0] == pid}


def reap(driver: tuple[int, int], roots: set[tuple[int, int]]) -> int:
    """Wait until ``driver`` (PID, start time) is gone, then end ``roots`` and everything below them;
    returns how many processes were signalled."""
    seen = set(roots)
    t0, next_look = time.monotonic(), 0.0
    while (s := process_start(driver[0])) is not None and s[1] == driver[1]:
        since = time.monotonic() - t0
        if since >= next_look:
            seen |= descendants(*_alive(seen))
            next_look = since + (1.0 if since < 10 else 10.0)
        time.sleep(POLL_S)
    seen |= descendants(*_alive(seen))  # what the survivors started since the last look
    seen.discard((os.getpid(), (process_start(os.getpid()) or (0, 0))[1]))
    signalled = _alive(seen)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = _alive(seen)
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        if not alive:
            break
        deadline = time.monotonic() + GRACE_S
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.1)
    return len(signalled)


def watch(roots: set[tuple[int, int]]) -> bool:
    """Start the reaper of ``roots`` (PID, start time: the cluster's processes this process started)
    for when this process is gone: detached (the process started here forks it and exits, so it is
    no child of this one, and nothing here waits for it or warns about it at exit), in a session of
    its own so that a signal to this process's group does not end it first. False where there is no
    ``/proc`` or nothing to watch."""
    me = process_start(os.getpid())
    if not roots or me is None:
        return False
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    args = [f"{pid}:{started}" for pid, started in [(os.getpid(), me[1]), *sorted(roots)]]
    starter = subprocess.Popen(
        [sys.executable, "-c", source, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    try:
        return starter.wait(timeout=60) == 0
    except subprocess.TimeoutExpired:  # the starter forks and exits at once; never hold up Ray for it
        starter.kill()
        return False


if __name__ == "__main__":
    driver, *procs = (tuple(int(v) for v in a.split(":")) for a in sys.argv[1:])
    if os.fork() == 0:  # the reaper; its parent exits at once, so that the driver's wait ends
        reap(driver, set(procs))
    os._exit(0)
