"""Load ``levit serve`` on loopback and print throughput, latency percentiles, errors and batch sizes.

Starts the server (``python -m levit serve``) on 127.0.0.1, waits for ``/ready``, then sends
photo-like JPEGs (crops of the photos scikit-learn and scikit-image ship, ~480x360, quality 90) from
C concurrent clients (an asyncio aiohttp load generator, bounded by a request count and a duration per
run; aiohttp costs about a third of httpx's CPU per request, which matters when the generator
shares the server's cores). After the clean runs: a mixed run (10% bad requests: garbage bytes, truncated JPEGs, bodies
over ``--max-body-mb``) and a run where 10% of the clients drop the connection mid-upload. Every good
answer is checked against the answer the server gave that image alone (``wrong`` column); the
server's RSS is read before and after. The ceiling it is compared with is ``levit predict``'s own
pipeline on the same JPEGs, backend and threads, timed in this process in rounds between the server
runs (the server idle meanwhile).

``--compare-engines`` times the same application on uvicorn and on Ray Serve (one replica on a local
Ray) side by side: start-up (process start to ``/ready``), then both running and measured in
interleaved rounds: the ``GET /health`` round trip (the engine's own per-request cost), the 1-client
classify p50 and the 8-client throughput, and their memory. ``--engine ray`` runs the load runs
below on Ray Serve.

    python benchmarks/serve_load.py                      # LeViT-128S fp32, clients 1, 8, 64
    python benchmarks/serve_load.py --short              # a couple of minutes: fewer requests, tiny runs
    python benchmarks/serve_load.py --compare-engines --short  # uvicorn vs Ray Serve for one process
    python benchmarks/serve_load.py --backend openvino --threads 2 --max-batch-size 32 --max-wait-ms 10
    python benchmarks/serve_load.py --gc-cost            # what a full garbage collection costs a loaded server
    python benchmarks/serve_load.py --reload-every 10 --clients 64   # a new model version every 10 s under load

The load generator shares the machine with the server; each run prints the CPU milliseconds per
request of both (the server's with its child processes), so the cost of serving is visible apart
from the generator's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # loopback only
OFFLINE_IMAGES = 512  # the offline ceiling classifies the JPEGs over and over as this many files


# ---- inputs --------------------------------------------------------------------------------------
def photo_jpegs(n: int, size: tuple[int, int] = (480, 360), seed: int = 0) -> list[bytes]:
    """``n`` photo-like JPEGs: random crops (40-100% of the side) of real photos, resized to ``size``."""
    import skimage.data as skd
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [*load_sample_images().images]
    photos += [getattr(skd, k)() for k in ("astronaut", "coffee", "chelsea", "rocket")]
    photos = [Image.fromarray(np.asarray(p)).convert("RGB") for p in photos]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        s = rng.uniform(0.4, 1.0)
        w, h = int(im.width * s), int(im.height * s)
        x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
        crop = im.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bad_request(kind: str, jpeg: bytes, max_body_mb: float) -> tuple[bytes, str, int]:
    """(body, content type, the status it must get)."""
    if kind == "garbage":
        return os.urandom(len(jpeg)), "image/jpeg", 400
    if kind == "truncated":
        return jpeg[: len(jpeg) // 3], "image/jpeg", 400
    return os.urandom(int((max_body_mb + 0.5) * 2**20)), "image/jpeg", 413  # oversize


# ---- the ceiling: levit predict's pipeline, offline ------------------------------------------------
class Ceiling:
    """``levit predict``'s pipeline (decode, preprocess, batch, model) on the same JPEGs, backend and
    threads as the server: images/s at the server's max batch, and the single-image latency (batch 1,
    decode + model). Measured in rounds between the server runs (while the server idles), medians
    reported, so that the machine's load moves both sides alike."""

    def __init__(
        self, ckpt: Path, jpegs: list[bytes], backend: str, threads: int | None, batch: int, lanes: int | None = None
    ) -> None:
        import levit
        from levit.weights.format import read_metadata

        # fused once here, as `levit predict` does (predict_paths would fuse an unfused model on every call)
        self.model = levit.fuse(levit.create_model(read_metadata(ckpt)["variant"], checkpoint=ckpt))
        self.dir = tempfile.TemporaryDirectory(prefix="levit-serve-ceiling-")
        self.files = []  # enough files that start-up (worker processes, the first batch) does not dominate
        for i in range(max(len(jpegs), OFFLINE_IMAGES)):
            self.files.append(Path(self.dir.name) / f"{i:04d}.jpg")
            self.files[-1].write_bytes(jpegs[i % len(jpegs)])
        self.batch = batch
        # as `levit predict` builds its backend: by default one one-thread copy per core (lanes)
        from levit.runtime.deploy import deploy_lanes
        from levit.runtime.pipeline import lane_layout
        from levit.utils import available_cpus

        copies, per_copy = lane_layout(None, None, available_cpus()) if threads is None else (1, threads)
        self.runners = {
            bs: deploy_lanes(self.model, copies, threads=per_copy, backend=backend, batch_size=bs) for bs in (batch, 1)
        }
        self.backend = self.runners[batch][0].backend
        # one full batch on one of the server's lanes (levit.runtime.pipeline.lane_layout), for the p99 target
        import torch

        from levit.data.preprocess import Preprocess

        self.lane_threads = lane_layout(lanes, threads, available_cpus())[1]
        lane = levit.deploy(self.model, backend=backend, batch_size=batch, threads=self.lane_threads)
        pre = Preprocess.from_model(self.model)
        x = torch.stack([pre(b) for b in (jpegs * batch)[:batch]])
        times = []
        with torch.inference_mode():
            for _ in range(6):
                t0 = time.perf_counter()
                lane(x)
                times.append(time.perf_counter() - t0)
        self.full_batch_ms = statistics.median(times[1:]) * 1e3
        self.img_s: list[float] = []
        self.single_ms: list[float] = []
        self.measure()  # warm-up round, not kept
        self.img_s.clear()
        self.single_ms.clear()

    def _time(self, files: list[Path], bs: int) -> float:
        from levit.runtime.predict import predict_paths

        t0 = time.perf_counter()
        predict_paths(self.model, files, runner=self.runners[bs], batch_size=bs, progress=False)
        return time.perf_counter() - t0

    def measure(self) -> None:
        self.img_s.append(len(self.files) / self._time(self.files, self.batch))
        # the latency of one image alone: `levit predict` on one file (decode + model), median of 16
        self.single_ms.append(statistics.median(self._time([f], 1) for f in self.files[:16]) * 1e3)

    def result(self) -> dict:
        return {
            "img_s": statistics.median(self.img_s),
            "single_ms": statistics.median(self.single_ms),
            "backend": self.backend,
            "rounds": len(self.img_s),
            "full_batch_ms": self.full_batch_ms,
            "lane_threads": self.lane_threads,
        }


# ---- the server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    startup_s: float
    log: Path

    def rss_mb(self) -> float:
        """Resident memory of the server and its child processes (Ray's workers), MB."""
        import psutil

        p = psutil.Process(self.proc.pid)
        procs = [p, *p.children(recursive=True)]
        total = 0
        for q in procs:
            with contextlib.suppress(psutil.Error):
                total += q.memory_info().rss
        return total / 2**20

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the server and its child processes so far."""
        import psutil

        p = psutil.Process(self.proc.pid)
        total = 0.0
        for q in [p, *p.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = q.cpu_times()
                total += t.user + t.system
        return total

    def stop(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(engine: str, ckpt: Path, args: argparse.Namespace, logdir: Path) -> Server:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "levit", "serve", "--checkpoint", str(ckpt), "--host", HOST, "--port", str(port)]
    cmd += ["--backend", args.backend, "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), "--max-body-mb", str(args.max_body_mb), "--quiet"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.lanes:
        cmd += ["--lanes", str(args.lanes)]
    if engine == "ray":
        cmd += ["--ray", "--replicas", "1", "--replica-cpus", str(os.cpu_count() or 1)]
    log = logdir / f"server-{engine}.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://{HOST}:{port}"
    deadline = t0 + 300
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {engine} server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return Server(proc, url, time.perf_counter() - t0, log)
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the {engine} server was not ready after 300 s:\n{log.read_text()[-3000:]}")


def batch_histogram(url: str) -> dict[float, float]:
    """The cumulative ``levit_batch_size`` buckets from ``/metrics``: {upper bound: count}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        float(s.labels["le"]): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "levit_batch_size_bucket"
    }


def histogram_text(before: dict[float, float], after: dict[float, float]) -> str:
    """Batches per size range between two readings: ``1:12 2:3 3-4:40 ...``."""
    bounds = sorted(after)
    parts, prev_bound, prev_count = [], 0.0, 0.0
    for b in bounds:
        cum = after[b] - before.get(b, 0.0)
        n = cum - prev_count
        if n > 0 and b != float("inf"):
            lo = int(prev_bound) + 1
            parts.append(f"{lo}:{int(n)}" if lo == int(b) else f"{lo}-{int(b)}:{int(n)}")
        prev_bound, prev_count = b, cum
    return " ".join(parts) or "-"


# ---- the load generator -------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # good requests answered 200
    errors: int = 0  # good requests that did not get 200
    wrong: int = 0  # good requests answered with another answer than the image alone got
    bad_sent: int = 0
    bad_ok: int = 0  # bad requests that got the 4xx they should
    dropped: int = 0  # clients that disconnected mid-upload
    missed: collections.Counter = field(default_factory=collections.Counter)  # (kind, what it got instead)
    batches: str = ""
    server_cpu_ms: float = float("nan")  # CPU ms per answered request: the server (and its children)
    client_cpu_ms: float = float("nan")  # ... and this load generator

    def row(self) -> list[str]:
        lat = sorted(self.latencies)

        def pct(p: float) -> str:
            return f"{lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3:.1f}" if lat else "-"

        rps = len(lat) / self.seconds if self.seconds else 0.0
        bad = f"{self.bad_ok}/{self.bad_sent}" if self.bad_sent else "-"
        return [
            self.name,
            str(self.clients),
            str(len(lat)),
            f"{rps:.1f}",
            pct(50),
            pct(95),
            pct(99),
            str(self.errors),
            str(self.wrong),
            bad,
            str(self.dropped) if self.dropped else "-",
            f"{self.server_cpu_ms:.1f}, {self.client_cpu_ms:.1f}",
            self.batches,
        ]


def same_answer(top: list[dict], ref: list[dict], tol: float = 1e-3) -> bool:
    """The reference's top class is in the answer with the same probability (batch-size float noise allowed)."""
    got = {t["class"]: t["prob"] for t in top}
    return ref[0]["class"] in got and abs(got[ref[0]["class"]] - ref[0]["prob"]) <= tol


async def _drop_mid_upload(url: str, body: bytes) -> None:
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body[: len(body) // 2])
    await writer.drain()
    await asyncio.sleep(0.01)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def load(
    url: str,
    jpegs: list[bytes],
    clients: int,
    count: int,
    duration: float,
    *,
    reference: list[list[dict]] | None = None,
    bad_fraction: float = 0.0,
    drop_fraction: float = 0.0,
    max_body_mb: float = 20.0,
    name: str = "clean",
) -> tuple[Run, list[list[dict] | None]]:
    """``clients`` coroutines send requests until ``count`` are sent or ``duration`` s have passed."""
    import aiohttp

    run = Run(name, clients)
    answers: list[list[dict] | None] = [None] * len(jpegs)
    rng = random.Random(clients * 7919 + int(bad_fraction * 100) + int(drop_fraction * 1000))
    kinds = ("garbage", "truncated", "oversize")
    sent = 0
    t0 = time.perf_counter()
    end = t0 + duration
    transport_errors = (aiohttp.ClientError, asyncio.TimeoutError, OSError)

    async def client(c: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < count and time.perf_counter() < end:
            i = sent
            sent += 1
            img = i % len(jpegs)
            u = rng.random()
            if u < drop_fraction:
                run.dropped += 1
                await _drop_mid_upload(url, jpegs[img])
                continue
            if u < drop_fraction + bad_fraction:
                kind = kinds[i % 3]
                body, ctype, want = bad_request(kind, jpegs[img], max_body_mb)
                run.bad_sent += 1
                try:
                    async with c.post(url + "/v1/classify", data=body, headers={"content-type": ctype}) as r:
                        await r.read()
                        got: int | str = r.status
                except transport_errors as e:
                    got = type(e).__name__
                run.bad_ok += got == want
                if got != want:
                    run.missed[(kind, got)] += 1
                continue
            t = time.perf_counter()
            try:
                async with c.post(url + "/v1/classify", data=jpegs[img], headers={"content-type": "image/jpeg"}) as r:
                    status = r.status
                    payload = await r.json() if status == 200 else None
            except transport_errors:
                run.errors += 1
                continue
            if status != 200:
                run.errors += 1
                continue
            run.latencies.append(time.perf_counter() - t)
            top = payload["top"]
            answers[img] = top
            if reference is not None and reference[img] is not None and not same_answer(top, reference[img]):
                run.wrong += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    run.seconds = time.perf_counter() - t0
    return run, answers


def measured_load(srv: Server, *args, **kwargs) -> tuple[Run, list[list[dict] | None]]:
    """:func:`load`, with the CPU time per answered request of the server and of this generator."""
    import psutil

    me = psutil.Process()
    s0, c0 = srv.cpu_s(), sum(me.cpu_times()[:2])
    run, answers = asyncio.run(load(srv.url, *args, **kwargs))
    n = max(1, len(run.latencies) + run.bad_sent)
    run.server_cpu_ms = (srv.cpu_s() - s0) / n * 1e3
    run.client_cpu_ms = (sum(me.cpu_times()[:2]) - c0) / n * 1e3
    return run, answers


def health_overhead(url: str, n: int) -> float:
    """Median round trip of ``GET /health`` (the engine's own per-request cost, no model), ms."""
    import httpx

    with httpx.Client() as c:
        c.get(url + "/health")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            c.get(url + "/health")
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


# ---- the runs ----------------------------------------------------------------------------------------
def bench_engine(
    engine: str, ckpt: Path, jpegs: list[bytes], args: argparse.Namespace, logdir: Path, ceiling: Ceiling
) -> dict:
    srv = start_server(engine, ckpt, args, logdir)
    out: dict = {"engine": engine, "startup_s": srv.startup_s, "runs": []}
    try:
        out["health_ms"] = health_overhead(srv.url, args.health_requests)
        ref_run, reference = asyncio.run(load(srv.url, jpegs, 1, len(jpegs), args.duration, name="reference"))
        out["rss_start"] = srv.rss_mb()
        for c in args.clients:
            ceiling.measure()  # the server idles meanwhile
            h0 = batch_histogram(srv.url)
            run, _ = measured_load(srv, jpegs, c, args.requests, args.duration, reference=reference)
            run.batches = histogram_text(h0, batch_histogram(srv.url))
            out["runs"].append(run)
        out["rss_clean"] = srv.rss_mb()
        c = max(args.clients)
        if not args.no_mixed:
            for name, bad, drop in (("10% bad", 0.1, 0.0), ("10% drop", 0.0, 0.1)):
                h0 = batch_histogram(srv.url)
                run, _ = measured_load(
                    srv,
                    jpegs,
                    c,
                    args.requests,
                    args.duration,
                    reference=reference,
                    bad_fraction=bad,
                    drop_fraction=drop,
                    max_body_mb=args.max_body_mb,
                    name=name,
                )
                run.batches = histogram_text(h0, batch_histogram(srv.url))
                out["runs"].append(run)
            time.sleep(1.0)
            out["rss_after"] = srv.rss_mb()
        out["single_p50_ms"] = statistics.median(ref_run.latencies) * 1e3
    finally:
        out["exit_code"] = srv.stop()
    return out


def compare_engines(ckpt: Path, jpegs: list[bytes], args: argparse.Namespace, logdir: Path) -> None:
    """The same application on uvicorn and on Ray Serve (one replica, local Ray), side by side: start-up
    (alternating starts), then both kept running and measured in interleaved rounds (GET /health round
    trip, 1-client classify p50, 8-client req/s), medians over the rounds; and their memory."""
    engines = ("plain", "ray")
    startup: dict[str, list[float]] = {e: [] for e in engines}
    servers: dict[str, Server] = {}
    for r in range(args.startup_rounds):
        for e in engines:
            srv = start_server(e, ckpt, args, logdir)
            startup[e].append(srv.startup_s)
            if r + 1 < args.startup_rounds:
                srv.stop()
            else:
                servers[e] = srv
    stats: dict[str, dict[str, list[float]]] = {e: collections.defaultdict(list) for e in engines}
    try:
        for _ in range(args.rounds):
            for e, srv in servers.items():
                stats[e]["health_ms"].append(health_overhead(srv.url, 50))
                run, _ = asyncio.run(load(srv.url, jpegs, 1, 40, args.duration))
                stats[e]["p50_1_ms"].append(statistics.median(run.latencies) * 1e3)
                run, _ = asyncio.run(load(srv.url, jpegs, 8, 120, args.duration))
                stats[e]["rps_8"].append(len(run.latencies) / run.seconds)
        rss = {e: srv.rss_mb() for e, srv in servers.items()}
    finally:
        codes = {e: srv.stop() for e, srv in servers.items()}
    med = {e: {k: statistics.median(v) for k, v in stats[e].items()} for e in engines}
    print(f"\n$ python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    print(f"{_machine()}; model {args.model} fp32, backend {args.backend}; medians of {args.rounds} interleaved rounds")
    print(
        "| engine | start-up to /ready s | GET /health ms | 1 client classify p50 ms | 8 clients req/s | RSS MB | exit |"
    )
    print("|---|---|---|---|---|---|---|")
    for e in engines:
        m = med[e]
        print(
            f"| {e} | {statistics.median(startup[e]):.1f} | {m['health_ms']:.2f} | {m['p50_1_ms']:.1f} | "
            f"{m['rps_8']:.1f} | {rss[e]:.0f} | {codes[e]} |"
        )
    p, r = med["plain"], med["ray"]
    print(
        f"ray / plain: start-up {statistics.median(startup['ray']) / statistics.median(startup['plain']):.2f}x, "
        f"/health {r['health_ms'] / p['health_ms']:.1f}x (+{r['health_ms'] - p['health_ms']:.2f} ms), "
        f"1-client p50 {r['p50_1_ms'] / p['p50_1_ms']:.2f}x, 8-client req/s {r['rps_8'] / p['rps_8']:.2f}x, "
        f"RSS {rss['ray'] / rss['plain']:.1f}x"
    )


async def _reload_load(url: str, jpegs: list[bytes], clients: int, duration: float, every: float) -> dict:
    """``clients`` clients for ``duration`` s while the model's checkpoint is loaded again every ``every``
    s (``POST /v2/repository/models/{name}/load``, each load a new version): each answer's version is
    checked against the versions serving while its request was in flight."""
    import aiohttp

    out = {"ok": 0, "failed": 0, "outside": 0, "versions": collections.Counter(), "loads": [], "latencies": []}
    serving = [(0.0, 1)]  # (time the version took over, version), in order
    end = time.perf_counter() + duration
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as c:
        name = (await (await c.get(url + "/ready")).json())["model"]

        async def reloads() -> None:
            # a load starts every ``every`` s (start to start, as a deploy schedule would send them), so
            # the load's own time is not added to the period
            tick = time.perf_counter()
            while tick + 2 * every < end:
                tick += every
                await asyncio.sleep(max(0.0, tick - time.perf_counter()))
                t0 = time.perf_counter()
                async with c.post(f"{url}/v2/repository/models/{name}/load") as r:
                    body = await r.json()
                if r.status == 200:
                    serving.append((time.perf_counter(), int(body["version"])))
                out["loads"].append((r.status, time.perf_counter() - t0))

        async def client(i: int) -> None:
            while time.perf_counter() < end:
                sent = time.perf_counter()
                before = serving[-1][1]  # the version known to serve when the request was sent
                try:
                    async with c.post(url + "/v1/classify", data=jpegs[i % len(jpegs)]) as r:
                        body = await r.json() if r.status == 200 else None
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    body = None
                if body is None:
                    out["failed"] += 1
                    continue
                out["ok"] += 1
                out["latencies"].append(time.perf_counter() - sent)
                v = int(body["version"])
                out["versions"][v] += 1
                # loaded when it arrived: not older than the one known before sending, not newer than the last
                out["outside"] += not before <= v <= serving[-1][1] + 1
                i += clients

        await asyncio.gather(reloads(), *(client(i) for i in range(clients)))
    return out


def reload_under_load(ckpt: Path, jpegs: list[bytes], args: argparse.Namespace, logdir: Path) -> None:
    """The hot-reload target: a new version every ``--reload-every`` s under the largest ``--clients``."""
    srv = start_server("plain", ckpt, args, logdir)
    c = max(args.clients)
    try:
        res = asyncio.run(_reload_load(srv.url, jpegs, c, args.duration, args.reload_every))
    finally:
        code = srv.stop()
    lat = sorted(res["latencies"]) or [0.0]
    loads = res["loads"]
    print(f"\n$ python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    print(
        f"reload every {args.reload_every:g} s, {c} clients, {args.duration:g} s ({_machine()}; model {args.model}, "
        f"backend {args.backend}): {res['ok']} answered, {res['failed']} failed, "
        f"{res['outside']} from a version not serving while in flight; versions answered "
        f"{dict(sorted(res['versions'].items()))}; loads {[s for s, _ in loads]} in "
        f"{', '.join(f'{t:.1f}' for _, t in loads)} s; p50 {lat[len(lat) // 2] * 1e3:.0f} ms, "
        f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.0f} ms; exit {code}"
    )
    ok = res["failed"] == 0 and res["outside"] == 0 and all(s == 200 for s, _ in loads)
    print(
        f"target: 0 failed requests and every answer from a version serving when it arrived: {'met' if ok else 'MISSED'}"
    )


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, AttributeError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    return f"machine: {cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}"


def print_report(results: list[dict], ceiling: dict, args: argparse.Namespace) -> None:
    print(f"\n$ python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    print(
        f"{_machine()}; model {args.model} fp32, "
        f"backend {ceiling['backend']}, threads {args.threads or 'default'}; max batch {args.max_batch_size}, "
        f"max wait {args.max_wait_ms} ms; {len(args.jpegs)} JPEGs {args.image_size}"
    )
    print(
        f"offline, the pipeline of levit predict (same JPEGs/backend/threads, median of {ceiling['rounds']} rounds between "
        f"the runs): {ceiling['img_s']:.1f} img/s at batch {args.max_batch_size}; single image "
        f"{ceiling['single_ms']:.1f} ms (decode + model)\n"
    )
    head = ["run", "clients", "ok", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "wrong", "bad 4xx", "dropped"]
    head += ["CPU ms/req: server, client", "batches (size:count)"]
    for r in results:
        print(
            f"engine {r['engine']}: start-up {r['startup_s']:.1f} s, GET /health {r['health_ms']:.2f} ms, exit {r['exit_code']}"
        )
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for run in r["runs"]:
            print("| " + " | ".join(run.row()) + " |")
        for run in r["runs"]:
            for (kind, got), n in run.missed.items():
                print(f"{run.name}: {n} {kind} request(s) got {got}")
        rss = f"RSS MB: after warm-up {r['rss_start']:.0f}, after clean runs {r['rss_clean']:.0f}"
        if "rss_after" in r:
            rss += (
                f", after bad/dropped runs {r['rss_after']:.0f} ({(r['rss_after'] / r['rss_clean'] - 1) * 100:+.1f}%)"
            )
        print(rss)
        clean = {run.clients: run for run in r["runs"] if run.name == "clean"}
        if clean:
            top = clean[max(clean)]
            rps = len(top.latencies) / top.seconds
            lat = sorted(top.latencies)
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan")
            p99_target = args.max_wait_ms + 3 * ceiling["full_batch_ms"]
            floor = max(clean) / rps * 1e3 if rps else float("nan")
            print(
                f"targets: {max(clean)} clients {rps:.1f} req/s = {rps / ceiling['img_s'] * 100:.0f}% of levit predict "
                f"offline (target >= 80%); 1 client p50 {r['single_p50_ms']:.1f} ms vs 1.5 x {ceiling['single_ms']:.1f} "
                f"+ {args.max_wait_ms} = {1.5 * ceiling['single_ms'] + args.max_wait_ms:.1f} ms; {max(clean)} clients "
                f"p99 {p99:.0f} ms vs {args.max_wait_ms} + 3 x {ceiling['full_batch_ms']:.0f} ms (one full batch of "
                f"{args.max_batch_size} on a lane of {ceiling['lane_threads']} thread(s)) = {p99_target:.0f} ms; "
                f"Little's law floor for {max(clean)} clients at this rate: {floor:.0f} ms\n"
            )


def gc_cost(ckpt: Path, args: argparse.Namespace, rounds: int = 5) -> None:
    """What a full garbage collection costs in a serving process once its model is loaded: the objects
    the collector tracks (the libraries, the model, the app) and the time of one full collection
    (median of ``rounds``), before and after ``gc.freeze()`` (what ``levit serve`` does then). A full
    collection holds the GIL, so under load that time is a pause of the event loop and the lanes."""
    import gc

    import uvicorn  # noqa: F401  (a serving process has it loaded too)

    import levit
    from levit.runtime.serve import LeViTService, ServeConfig
    from levit.runtime.serve_process import freeze_heap
    from levit.weights.format import read_metadata

    model = levit.create_model(read_metadata(ckpt)["variant"], checkpoint=ckpt)
    config = ServeConfig(backend=args.backend, threads=args.threads, lanes=args.lanes, quiet=True)
    service = LeViTService(model, config, load_now=True)
    service.build_app()

    def collect_ms() -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    tracked, before = len(gc.get_objects()), collect_ms()
    freeze_heap()
    print(
        f"gc: {tracked:,} objects tracked once the model is loaded ({service.lanes} lane(s), backend "
        f"{args.backend}); a full collection {before:.0f} ms, "
        f"{collect_ms():.1f} ms after gc.freeze() ({gc.get_freeze_count():,} objects frozen)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="levit_128s", help="variant (random weights, the same file for server and ceiling)"
    )
    p.add_argument("--checkpoint", type=Path, help="a levit-format file instead of random weights")
    p.add_argument("--engine", default="plain", help="plain, ray, or plain,ray (one after the other)")
    p.add_argument(
        "--compare-engines", action="store_true", help="only the engine comparison: both running, interleaved rounds"
    )
    p.add_argument("--rounds", type=int, default=5, help="--compare-engines: interleaved rounds")
    p.add_argument("--startup-rounds", type=int, default=2, help="--compare-engines: starts of each engine")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="server: threads per lane; offline: the backend's")
    p.add_argument("--lanes", type=int, default=None, help="server model lanes (default: levit serve's)")
    p.add_argument("--max-batch-size", type=int, default=32, help="as levit serve's default")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-body-mb", type=float, default=2.0)
    p.add_argument("--clients", default="1,8,64", help="concurrency levels")
    p.add_argument("--requests", type=int, default=3000, help="requests per run (at most; p99 is then the 30 slowest)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per run (at most)")
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs")
    p.add_argument("--image-size", default="480x360")
    p.add_argument("--health-requests", type=int, default=300)
    p.add_argument("--no-mixed", action="store_true", help="skip the bad-request and disconnect runs")
    p.add_argument("--short", action="store_true", help="200 requests / 20 s per run, 32 JPEGs")
    p.add_argument(
        "--gc-cost",
        action="store_true",
        help="only the garbage collector's cost in a loaded server: objects tracked, one full collection's time",
    )
    p.add_argument(
        "--reload-every",
        type=float,
        default=None,
        metavar="S",
        help="only hot reload under load: the checkpoint loaded again every S s during --duration s of the "
        "largest --clients; failed requests and answers from a version not serving while in flight",
    )
    args = p.parse_args(argv)
    if args.short:
        args.requests, args.duration, args.images, args.health_requests = 200, 20.0, 32, 100
        args.rounds, args.startup_rounds = 3, 1
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import levit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
    from helpers import randomize_weights

    w, h = (int(v) for v in args.image_size.lower().split("x"))
    args.jpegs = jpegs = photo_jpegs(args.images, (w, h))
    with tempfile.TemporaryDirectory(prefix="levit-serve-load-") as d:
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = Path(d) / f"{args.model}.safetensors"
            levit.save(randomize_weights(levit.create_model(args.model), seed=0), ckpt)
        if args.compare_engines:
            compare_engines(ckpt, jpegs, args, Path(d))
            return 0
        if args.gc_cost:
            gc_cost(ckpt, args)
            return 0
        if args.reload_every:
            reload_under_load(ckpt, jpegs, args, Path(d))
            return 0
        ceiling = Ceiling(ckpt, jpegs, args.backend, args.threads, args.max_batch_size, args.lanes)
        results = [bench_engine(e, ckpt, jpegs, args, Path(d), ceiling) for e in args.engine.split(",")]
    print_report(results, ceiling.result(), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
