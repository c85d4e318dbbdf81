"""``levit serve --ray`` as a user starts it: a local Ray Serve cluster of two replicas, answering as
``levit predict`` does, through Ray Serve's proxy, under a replica's loss and a stop signal.

A file of its own so that the test process running it is not the one running tests/test_serve.py:
Ray's processes then compute while that file's tests wait on timeouts. The model, images and
expected answers are tests/test_serve.py's fixtures."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="levit serve needs the serve extra: pip install 'levit[serve]'")

import test_serve
from test_serve import HOST, HTTP, MAX_WAIT_MS, _b64, _concurrent, _error_line, assert_same, httpx, post

# tests/test_serve.py's fixtures, module-scoped here too: the model file and images, predict's answers
files = test_serve.files
expected = test_serve.expected


def _free_port_below_the_ephemeral_range() -> int:
    """A free local port for a server that binds it later (Ray Serve's proxy): picked below the range
    the kernel hands out to other sockets meanwhile (Ray's own workers, the other test process), so
    that nothing takes it between this check and the bind."""
    import random

    low = (
        int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists()
        else 32768
    )
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def test_ray_serve_two_replicas_answer_like_levit_predict(files, expected, tmp_path):
    """``levit serve --ray --replicas 2`` as a user starts it (a local 2-replica Ray Serve, in a process
    group of its own): ``/ready`` answered at once while the replicas load; both replicas answer with
    the single-process server's answers; KServe v2 and ``/metrics`` through Ray Serve's proxy; a replica
    killed under load costs no client an error. Then the whole process group gets SIGTERM (systemd's
    stop, ``timeout``): levit ends within seconds, though Ray's own processes got the signal too, and
    its stderr held levit's lines and the replicas', none of Ray's start-up or deployment notices."""
    pytest.importorskip("ray.serve", reason="levit serve --ray needs Ray Serve: pip install 'levit[serve]'")
    port = _free_port_below_the_ephemeral_range()
    argv = ["serve", "-c", str(files["model"]), "--host", HOST, "--port", str(port), "--backend", "eager"]
    argv += ["--threads", "1", "--topk", "3", "--max-wait-ms", str(MAX_WAIT_MS), "--ray", "--replicas", "2"]
    log = (tmp_path / "serve-ray.log").open("w")  # a file, not a pipe: the replicas' access log is long
    proc = subprocess.Popen([sys.executable, "-m", "levit", *argv], stderr=log, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        polls, end = [], time.monotonic() + 120  # while the replicas load: /ready answered at once
        while not polls or polls[-1][0] != 200:
            assert time.monotonic() < end and proc.poll() is None, polls
            t0 = time.monotonic()
            try:
                status = HTTP.get(url + "/ready", timeout=5).status_code
            except httpx.TransportError:
                status = "refused"  # before Ray Serve's proxy listens
            polls.append((status, time.monotonic() - t0))
            time.sleep(0.2)
        assert 503 in [p for p, _ in polls], polls
        # refused before the proxy listens, 404 in the moment before it knows the application's route
        answered = [p for p in polls if p[0] != "refused"]
        # answered, not held until a replica is ready (seconds on a busy machine, not the loading time)
        assert all(p in (503, 404, 200) and dt < 10 for p, dt in answered), answered
        _two_replicas_answer(url, files, expected)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # levit and the local cluster's processes alike
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("levit serve --ray still running 40 s after SIGTERM to its process group")
        finally:
            log.close()
    err = (tmp_path / "serve-ray.log").read_text()
    assert proc.returncode == 0, (proc.returncode, err[-3000:])
    assert "stopping:" in err, err
    for noise in ("Token authentication", "Started a local Ray instance", "fork_posix", "Deploying new version"):
        assert noise not in err, err
    for noise in ("Connecting to existing Serve app", "Set ray log level", "Failed to connect to GCS"):
        assert noise not in err, err


def _two_replicas_answer(url: str, files: dict, expected: dict) -> None:
    """Both replicas answer as ``levit predict`` does (as the single-process server does: tests/test_serve.py),
    by /v1 and KServe v2; /metrics sums them; a replica SIGKILLed under 8 clients costs none of them an
    error."""
    names = ["a.jpg", "b.png", "c.webp", "d16.png"] * 4
    replicas, rounds = set(), 0
    for _ in range(5):
        rounds += 1
        responses = asyncio.run(_concurrent(url, [(files[n].read_bytes(), "image/png") for n in names]))
        for n, r in zip(names, responses, strict=True):
            assert r.status_code == 200, r.text
            assert_same(r.json()["top"], expected[n])
            replicas.add(r.headers["x-levit-replica"])
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, f"only {replicas} answered"
    assert post(url, b"junk").status_code == 400
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(files["b.png"])]}]}
    out = HTTP.post(f"{url}/v2/models/levit_tiny/infer", json=v2, timeout=30).json()["outputs"]
    assert out[0]["name"] == "class" and out[0]["data"] == [t["class"] for t in expected["b.png"]]
    r = HTTP.put(f"{url}/predictions/levit_tiny", content=files["b.png"].read_bytes(), timeout=30)
    assert list(r.json()) == [t["label"] for t in expected["b.png"]], r.text  # TorchServe's API
    # /metrics through the proxy: every replica's series in every scrape, none ever going down,
    # adding up to what was sent once each replica has posted its values (each second)
    sent, end = len(names) * rounds, time.monotonic() + 10
    while sum(_classify_counts(url).values()) != sent:
        assert time.monotonic() < end, (_classify_counts(url), sent)
        time.sleep(0.3)
    scrapes = [_classify_counts(url) for _ in range(4)]
    assert all(s == scrapes[0] and set(s) == replicas for s in scrapes), (scrapes, replicas)
    r = HTTP.post(f"{url}/v2/repository/models/levit_tiny/load", timeout=30)
    assert "SIGHUP" in _error_line(r, 501)  # one replica cannot load for all: levit serve rolls them over
    # a replica killed under load: the front retries its requests on the other, no client sees an error
    victim = int(sorted(replicas)[0].rsplit(":", 1)[1])
    jpg = files["a.jpg"].read_bytes()

    async def load_with_a_kill() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:

            async def client() -> list[httpx.Response]:
                out, end = [], time.monotonic() + 2  # the kill at 0.7 s: requests before, during, after
                while time.monotonic() < end:
                    out.append(await c.post(url + "/v1/classify", content=jpg, headers={"content-type": "image/jpeg"}))
                return out

            async def kill() -> None:
                await asyncio.sleep(0.7)
                os.kill(victim, signal.SIGKILL)

            rounds = await asyncio.gather(*(client() for _ in range(8)), kill())
            return [r for batch in rounds[:-1] for r in batch]

    answers = asyncio.run(load_with_a_kill())
    assert [r.status_code for r in answers if r.status_code != 200] == [], {r.text for r in answers}
    assert any(r.headers["x-levit-replica"] != sorted(replicas)[0] for r in answers)
    assert_same(answers[-1].json()["top"], expected["a.jpg"])


def _classify_counts(url: str) -> dict[str, float]:
    """Per replica, its ``POST /v1/classify`` answers of 200, from one scrape of ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(HTTP.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == "levit_requests_total" and s.labels["route"] == "/v1/classify" and s.labels["status"] == "200":
                out[s.labels["replica"]] = s.value
    return out


def test_a_lost_replicas_classify_requests_are_retried_and_a_model_load_is_not():
    """The front sends a request again on another replica only where that cannot do anything twice:
    reading and classifying (v1, v2, TorchServe's POST or PUT), never a repository load."""
    from levit.runtime.serve_ray_front import idempotent

    for method, path in (("GET", "/ready"), ("POST", "/v1/classify"), ("POST", "/v2/models/m/infer")):
        assert idempotent(method, path)
    assert idempotent("PUT", "/predictions/m") and idempotent("POST", "/predictions/m/2")
    assert not idempotent("POST", "/v2/repository/models/m/load")
