"""levit.runtime.ray_reaper: what a local Ray cluster's driver started ends when the driver is killed
(kill -9), and nothing else does. No Ray here: the "cluster" is two process trees the driver starts,
one of them three levels deep; a third child, started before, is not the cluster's. Where /proc is
missing (not Linux) the reaper does nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from levit.runtime import ray_reaper

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the reaper reads /proc (Linux)")

SRC = str(Path(__file__).resolve().parents[1] / "src")

DRIVER = r"""
import json, os, subprocess, sys, time
from levit.runtime import ray_reaper

other = subprocess.Popen(["sleep", "60"])  # the driver's own, started before the cluster
before = ray_reaper.children(os.getpid())
# the cluster: a process whose child starts a child, and a second process
deep = subprocess.Popen(["sh", "-c", "sh -c 'sleep 60 & wait' & wait"])
flat = subprocess.Popen(["sleep", "60"])
time.sleep(0.3)
roots = ray_reaper.children(os.getpid()) - before
assert ray_reaper.watch(roots)
time.sleep(1.5)  # the reaper's first look at the trees
tree = sorted(p for p, _ in ray_reaper.descendants(deep.pid, flat.pid) | roots)
print(json.dumps({"cluster": tree, "other": other.pid}), flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    return ray_reaper.process_start(pid) is not None


def test_a_killed_drivers_cluster_processes_end_and_its_other_children_stay():
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env)
    pids = json.loads(driver.stdout.readline())
    try:
        assert len(pids["cluster"]) >= 4 and all(_alive(p) for p in pids["cluster"])  # sh, sh, sleep, sleep
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        end = time.monotonic() + 10
        while any(_alive(p) for p in pids["cluster"]) and time.monotonic() < end:
            time.sleep(0.1)
        # within the reaper's half-second poll and its SIGTERM, not the minute Ray's agents take alone
        assert [p for p in pids["cluster"] if _alive(p)] == [], "the cluster outlived its driver"
        assert time.monotonic() < end - 5
        assert _alive(pids["other"])  # not the cluster's: left alone
    finally:
        for p in [*pids["cluster"], pids["other"]]:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_nothing_to_watch_starts_nothing():
    assert ray_reaper.watch(set()) is False
    assert ray_reaper.process_start(2**22 + 12345) is None  # no such process
