"""Load ``levit serve`` on loopback and print throughput, latency percentiles, errors and batch sizes.

Starts the server (``python -m levit serve``) on 127.0.0.1, waits for ``/ready``, then sends
photo-like JPEGs (crops of the photos scikit-learn and scikit-image ship, ~480x360, quality 90) from
C concurrent clients (an asyncio aiohttp load generator, bounded by a request count and a duration per
run; aiohttp costs about a third of httpx's CPU per request, which matters when the generator
shares the server's cores). After the clean runs: a mixed run (10% bad requests: garbage bytes, truncated JPEGs, bodies
over ``--max-body-mb``) and a run where 10% of the clients drop the connection mid-upload. Every good
answer is checked against the answer the server gave that image alone (``wrong`` column); the
server's RSS is read before and after. The ceiling it is compared with is ``levit predict``'s own
pipeline on the same JPEGs, backend and threads, timed in this process in rounds before, between and
after the server runs (the server idle meanwhile), with the full batch on one lane that the p99
target counts.

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
    python benchmarks/serve_load.py --overload 1000 --duration 60   # 1000 clients: 429s, p99, memory, recovery
    python benchmarks/serve_load.py --slowloris 200      # 200 trickled request heads; a 1 MB head
    python benchmarks/serve_load.py --huge-images 20     # 20 49-megapixel PNGs at once among 8 clients

The three fault modes (``--overload``, ``--slowloris``, ``--huge-images``) each start their own server
(random weights, the default backend) and print one result line and one ``target: ... met|MISSED``
line; with ``--short`` they take seconds (fewer clients, shorter phases, a 2 s header timeout), which
checks the script, not the server.

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
from typing import Any

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
        self.lane = levit.deploy(self.model, backend=backend, batch_size=batch, threads=self.lane_threads)
        pre = Preprocess.from_model(self.model)
        self.full_batch = torch.stack([pre(b) for b in (jpegs * batch)[:batch]])
        self.full_batch_s: list[float] = []
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

    def time_full_batch(self, n: int = 5) -> None:
        """Time one full batch on one lane ``n`` times (after one untimed), for the p99 target: in every
        round, as the offline rate is, and the median of all taken, so that the target's reference
        moves with the machine's speed as the server's runs do (docs/serving.md has the spread)."""
        import torch

        with torch.inference_mode():
            self.lane(self.full_batch)
            for _ in range(n):
                t0 = time.perf_counter()
                self.lane(self.full_batch)
                self.full_batch_s.append(time.perf_counter() - t0)

    def measure(self) -> None:
        self.time_full_batch()
        self.img_s.append(len(self.files) / self._time(self.files, self.batch))
        # the latency of one image alone: `levit predict` on one file (decode + model), median of 16
        self.single_ms.append(statistics.median(self._time([f], 1) for f in self.files[:16]) * 1e3)

    def result(self) -> dict:
        return {
            "img_s": statistics.median(self.img_s),
            "single_ms": statistics.median(self.single_ms),
            "backend": self.backend,
            "rounds": len(self.img_s),
            "full_batch_ms": statistics.median(self.full_batch_s) * 1e3,
            "full_batch_range_ms": (min(self.full_batch_s) * 1e3, max(self.full_batch_s) * 1e3),
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

    def ctx_switches(self) -> int:
        """Context switches (voluntary and not) of the threads of the server and of its child processes
        so far, read per thread from ``/proc`` (Linux; psutil's count is the main thread's alone).
        Threads that have ended are not counted: read it around a stretch of steady load, during which
        the server's worker threads (which end after seconds without work) all stay."""
        import psutil

        p = psutil.Process(self.proc.pid)
        total = 0
        for q in [p, *p.children(recursive=True)]:
            for status in Path(f"/proc/{q.pid}/task").glob("*/status"):
                with contextlib.suppress(OSError):
                    for line in status.read_text().splitlines():
                        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                            total += int(line.split()[1])
        return total

    def page_faults(self) -> int:
        """Page faults of the server process so far (minor and major, every thread's, Linux ``/proc``):
        memory the process touches for the first time, or again after the allocator gave it back."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[7]) + int(fields[9])  # minflt, majflt

    def thread_cpu_s(self) -> dict[int, tuple[str, float]]:
        """CPU seconds of each thread of the server process so far, by thread id, with its kind
        (Linux ``/proc``): ``loop`` (the main thread, which runs the event loop), ``grpc`` (the threads
        gRPC's C core starts, named ``event_engine`` and ``grpc_...``), ``other`` (decoding and model
        lanes, and the Python threads of grpc.aio). :func:`cpu_by_kind` takes the difference."""
        tick, out = os.sysconf("SC_CLK_TCK"), {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                stat = (task / "stat").read_text()
                comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
                kind = "loop" if task.name == str(self.proc.pid) else "other"
                kind = "grpc" if comm.startswith(("event_engine", "grpc_")) else kind
                out[int(task.name)] = (kind, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
        return out

    def stop(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds by kind of thread between two :meth:`Server.thread_cpu_s` reads: each thread alive
    at the second read, less what it had at the first (threads that ended between the reads, such as
    idle worker threads the pool retired, are left out rather than subtracted)."""
    out = {"loop": 0.0, "grpc": 0.0, "other": 0.0}
    for tid, (kind, cpu) in after.items():
        out[kind] += cpu - before.get(tid, (kind, 0.0))[1]
    return out


def start_server(
    engine: str,
    ckpt: Path,
    args: argparse.Namespace,
    logdir: Path,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Server:
    """``levit serve`` with the benchmark's flags and ``extra`` ones, once ``/ready`` answers 200;
    ``env``: variables set for the server alone."""
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
    if args.max_queue:
        cmd += ["--max-queue", str(args.max_queue)]
    cmd += extra
    log = logdir / f"server-{engine}.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, **(env or {})})
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
        ceiling.measure()  # after the runs too: the offline references bracket the server's runs
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


# ---- the fault targets at full size: overload, slow request heads, huge images ------------------------
class RssPeak:
    """The peak resident memory of a process and its children (VmRSS summed), sampled every 0.2 s on a
    thread, so that a phase's peak is its own (the kernel's VmHWM only ever grows, and counts one process)."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        import threading

        self.pid, self.every_s = pid, every_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def now_mb(self) -> float:
        import psutil

        total = 0
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(self.pid)
            for q in [p, *p.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += q.memory_info().rss
        return total / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def take(self) -> float:
        """The peak since the last call (or the start), MB; starts a new one."""
        peak, self.peak_mb = max(self.peak_mb, self.now_mb()), 0.0
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def vm_hwm_mb(pid: int) -> float:
    """The kernel's high-water mark of a process's resident memory (``VmHWM``), MB; nan if unreadable."""
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"VmHWM:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024
    return float("nan")


def raise_open_files() -> None:
    """Raise this process's soft limit of open files to the hard one: a thousand clients are a thousand
    sockets here, and the server started from here inherits the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Tally:
    """What the classify requests of one phase got."""

    latencies: list[float] = field(default_factory=list)  # answered 200: seconds from sending to the answer
    start: float = field(default_factory=time.perf_counter)  # the phase's start (time.perf_counter)
    sent: list[float] = field(default_factory=list)  # answered 200: seconds from ``start`` to sending
    shed: int = 0  # answered 429 (each retried after its Retry-After)
    timeouts: int = 0  # no answer within the client's timeout
    conn_errors: int = 0  # the connection refused, reset or closed without an answer
    other: collections.Counter = field(default_factory=collections.Counter)  # any other status: count
    seconds: float = 0.0
    client_cpu_s: float = 0.0  # this load generator's CPU seconds in the phase

    def pct_ms(self, p: float, sent: tuple[float, float] = (0.0, float("inf"))) -> float:
        """The ``p``-th percentile latency (ms) of the requests answered 200 that were sent within
        ``sent`` (seconds from the phase's start)."""
        lat = sorted(x for x, t in zip(self.latencies, self.sent) if sent[0] <= t < sent[1])
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3 if lat else float("nan")

    def count(self, sent: tuple[float, float]) -> int:
        """How many requests answered 200 were sent within ``sent`` (seconds from the phase's start)."""
        return sum(sent[0] <= t < sent[1] for t in self.sent)

    @property
    def errors(self) -> int:
        """Requests that got neither 200 nor 429."""
        return self.timeouts + self.conn_errors + sum(self.other.values())

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies) + self.shed + self.errors


async def _classify_client(
    c: Any, url: str, jpegs: list[bytes], i: int, step: int, stop: asyncio.Event, tally: Tally
) -> None:
    """One client sending its next JPEG as soon as the last is answered, until ``stop``; a 429 is shed
    load: the client waits the ``Retry-After`` it was given (0.1 s without one) and goes on."""
    import aiohttp

    while not stop.is_set():
        body = jpegs[i % len(jpegs)]
        i += step
        t = time.perf_counter()
        try:
            async with c.post(url + "/v1/classify", data=body, headers={"content-type": "image/jpeg"}) as r:
                await r.read()
                status, retry = r.status, r.headers.get("retry-after")
        except TimeoutError:  # before OSError: a TimeoutError is one
            tally.timeouts += 1
            continue
        except (aiohttp.ClientError, OSError):
            tally.conn_errors += 1
            continue
        if status == 200:
            tally.latencies.append(time.perf_counter() - t)
            tally.sent.append(t - tally.start)
        elif status == 429:
            tally.shed += 1
            wait = float(retry) if retry else 0.1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        else:
            tally.other[status] += 1


def _session(timeout_s: float = 60.0) -> Any:
    """An aiohttp session without a connection limit (``limit=0``): every client its own connection."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


async def _classify_phase(url: str, jpegs: list[bytes], clients: int, seconds: float, timeout_s: float = 60.0) -> Tally:
    """``clients`` clients (:func:`_classify_client`) for ``seconds``; each finishes the request it has
    in flight, which counts."""
    import psutil

    me, tally = psutil.Process(), Tally()
    c0, t0 = sum(me.cpu_times()[:2]), time.perf_counter()
    stop = asyncio.Event()
    async with _session(timeout_s) as c:
        tasks = [
            asyncio.ensure_future(_classify_client(c, url, jpegs, i, clients, stop, tally)) for i in range(clients)
        ]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    tally.seconds = time.perf_counter() - t0
    tally.client_cpu_s = sum(me.cpu_times()[:2]) - c0
    return tally


def overload(ckpt: Path, jpegs: list[bytes], args: argparse.Namespace, logdir: Path) -> None:
    """The overload target: ``--overload N`` clients (each sending its next request as soon as it has
    an answer) for ``--duration`` s, between a normal load before (64 clients, 20 s: the baseline p99
    and peak RSS) and after (64 clients, 10 s). The server must shed what it cannot take with 429s
    (not timeouts or dropped connections), keep the p99 of what it accepts within 2x the baseline's
    and its peak memory within +10% of the baseline's, and answer normally once the load drops."""
    n, normal = args.overload, 64
    base_s, over_s, after_s = (20.0, args.duration, 10.0) if not args.short else (3.0, 5.0, 2.0)
    if args.short:
        n, normal = min(n, 400), 16  # past the default queue (72 on 2 cores), so 429s are seen
    machine = _machine(" before the run")
    srv = start_server("plain", ckpt, args, logdir)
    rss = RssPeak(srv.proc.pid)
    try:
        asyncio.run(_classify_phase(srv.url, jpegs, 8, 1.0))  # warm-up, not kept
        rss.take()
        s0 = srv.cpu_s()
        base = asyncio.run(_classify_phase(srv.url, jpegs, normal, base_s))
        base_rss, s1 = rss.take(), srv.cpu_s()
        over = asyncio.run(_classify_phase(srv.url, jpegs, n, over_s))
        over_rss, s2 = rss.take(), srv.cpu_s()
        after = asyncio.run(_classify_phase(srv.url, jpegs, normal, after_s))
        hwm = vm_hwm_mb(srv.proc.pid)
    finally:
        rss.close()
        code = srv.stop()
    ratio = over.pct_ms(99) / base.pct_ms(99)
    # the N clients' first requests all leave at once: those accepted wait while the server reads and
    # refuses the rest (docs/serving.md: "Event loop"); printed apart from what follows the herd
    herd, later = (0.0, 0.5), (3.0, float("inf"))
    rss_pct = (over_rss / base_rss - 1) * 100
    print(f"\n$ python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    print(
        f"overload {n} clients, {over.seconds:.0f} s ({machine}; model {args.model}, backend {args.backend}, "
        f"--max-queue {args.max_queue or 'default'}): {over.rps:.1f} req/s accepted ({len(over.latencies)}), "
        f"{over.shed} 429s, {over.timeouts} timeouts, {over.conn_errors} connection errors, "
        f"{sum(over.other.values())} other errors {dict(over.other)}; accepted p50 {over.pct_ms(50):.0f} ms, "
        f"p99 {over.pct_ms(99):.0f} ms vs the baseline's ({normal} clients, {base.seconds:.0f} s, "
        f"{base.rps:.1f} req/s) {base.pct_ms(99):.0f} ms = {ratio:.2f}x (the {over.count(herd)} accepted of "
        f"the first {n} sent at once: {over.pct_ms(0, herd):.0f}-{over.pct_ms(100, herd):.0f} ms; the "
        f"{over.count(later)} sent after {later[0]:g} s: p99 {over.pct_ms(99, later):.0f} ms); peak RSS {over_rss:.0f} MB vs the "
        f"baseline's {base_rss:.0f} MB ({rss_pct:+.1f}%; VmHWM {hwm:.0f} MB); after the load drops ({normal} clients, "
        f"{after.seconds:.0f} s): {len(after.latencies)} answered, {after.shed} 429s, {after.errors} errors, "
        f"p99 {after.pct_ms(99):.0f} ms; CPU s: server {s1 - s0:.1f} baseline, {s2 - s1:.1f} overload; load "
        f"generator {base.client_cpu_s:.1f} baseline, {over.client_cpu_s:.1f} overload "
        f"({over.client_cpu_s / max(1, over.requests) * 1e3:.2f} ms per request, 429s included); exit {code}"
    )
    missed = [
        what
        for what, ok in (
            (f"{over.timeouts + over.conn_errors} timeouts/connection errors", over.timeouts + over.conn_errors == 0),
            (f"{sum(over.other.values())} other errors", not over.other),
            (f"p99 {ratio:.2f}x", ratio <= 2.0),
            (f"peak RSS {rss_pct:+.1f}%", rss_pct <= 10.0),
            (f"{after.errors + after.shed} errors after", after.errors + after.shed == 0),
        )
        if not ok
    ]
    print(
        "target: 429s, not timeouts (0 timeouts, connection or other errors), accepted p99 <= 2x the baseline's, "
        f"peak RSS <= baseline +10%, 0 errors once the load drops: {'met' if not missed else 'MISSED'}"
        + (f" ({', '.join(missed)})" if missed else "")
    )


async def _slow_head(url: str, stop: asyncio.Event, cap_s: float, out: list[tuple[float | None, str]]) -> None:
    """Connections that send a request head one header line a second and never finish it, one after
    the other until ``stop`` (the one open then is followed to its end): for each, (seconds from
    opening to the server closing it, or None if it was still open after ``cap_s``; what it got)."""
    host, port = url.removeprefix("http://").split(":")
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as e:
            out.append((None, f"connect: {type(e).__name__}"))
            await asyncio.sleep(1.0)
            continue
        writer.write(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n".encode())
        got, closed, answer, k = "nothing", None, b"", 0
        while time.perf_counter() - t0 < cap_s:
            try:
                data = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:  # a second without an answer: the next header line
                k += 1
                writer.write(f"X-Slow-{k}: {k}\r\n".encode())
                try:
                    await writer.drain()
                except OSError as e:
                    closed, got = time.perf_counter() - t0, type(e).__name__
                    break
                continue
            except OSError as e:
                closed, got = time.perf_counter() - t0, type(e).__name__
                break
            if not data:  # the server closed it
                closed = time.perf_counter() - t0
                got = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed, no answer"
                break
            answer += data
        out.append((closed, got))
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _large_head(url: str, size: int = 2**20) -> str:
    """The status line's code a request head of ``size`` bytes of headers gets (the head is sent while
    the answer is read, since the server may answer and close before it has all of it)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    line = b"X-Padding-%06d: " + b"a" * 1000 + b"\r\n"
    head = [f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode()]
    for i in range(size // len(line % 0) + 1):
        head.append(line % i)
    head.append(b"\r\n")

    async def send() -> None:
        with contextlib.suppress(OSError):
            writer.write(b"".join(head))
            await writer.drain()

    sending = asyncio.ensure_future(send())
    answer = b""
    try:
        while data := await asyncio.wait_for(reader.read(65536), 30):
            answer += data
    except (OSError, TimeoutError) as e:
        if not answer:
            return type(e).__name__
    finally:
        sending.cancel()
        writer.close()
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed, no answer"


def slowloris(ckpt: Path, jpegs: list[bytes], args: argparse.Namespace, logdir: Path) -> None:
    """The slow-client target: ``--slowloris N`` connections that trickle a request head (one header
    line a second, never finished; each reconnects once closed) for ``--duration`` s while 8 good
    clients run. Every such connection must be closed within ``--header-timeout`` + 1 s of opening;
    the good clients' p99 is compared with a baseline of 8 clients alone; and one request with 1 MB of
    headers must get 431."""
    n, good = args.slowloris, 8
    timeout = args.header_timeout or 10.0  # levit serve's default
    base_s, attack_s = (15.0, args.duration) if not args.short else (3.0, 3.0)
    if args.short:
        n = min(n, 20)
    machine = _machine(" before the run")
    srv = start_server("plain", ckpt, args, logdir, extra=("--header-timeout", f"{timeout:g}"))

    async def attack() -> Tally:
        import psutil

        me, tally, stop, done = psutil.Process(), Tally(), asyncio.Event(), asyncio.Event()
        c0, t0 = sum(me.cpu_times()[:2]), time.perf_counter()
        slow = [asyncio.ensure_future(_slow_head(srv.url, stop, timeout + 5.0, closes)) for _ in range(n)]
        async with _session() as c:
            # the good clients run until every slow connection has ended, so each of their requests met the attack
            tasks = [
                asyncio.ensure_future(_classify_client(c, srv.url, jpegs, i, good, done, tally)) for i in range(good)
            ]
            await asyncio.sleep(attack_s)
            stop.set()
            await asyncio.gather(*slow)
            done.set()
            await asyncio.gather(*tasks)
        tally.seconds = time.perf_counter() - t0
        tally.client_cpu_s = sum(me.cpu_times()[:2]) - c0
        return tally

    closes: list[tuple[float | None, str]] = []
    try:
        asyncio.run(_classify_phase(srv.url, jpegs, good, 1.0))  # warm-up, not kept
        base = asyncio.run(_classify_phase(srv.url, jpegs, good, base_s))
        under = asyncio.run(attack())
        large = asyncio.run(_large_head(srv.url))
        alive = asyncio.run(_classify_phase(srv.url, jpegs, 1, 0.5))  # the server still answers
    finally:
        code = srv.stop()
    closed = [t for t, _ in closes if t is not None]
    in_time = sum(t <= timeout + 1.0 for t in closed)
    got = collections.Counter(g for _, g in closes)
    ratio = under.pct_ms(99) / base.pct_ms(99)
    print(f"\n$ python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    print(
        f"slowloris {n} connections trickling a request head for {attack_s:.0f} s, --header-timeout {timeout:g} "
        f"({machine}; model {args.model}, backend {args.backend}): {len(closes)} opened, {len(closed)} closed by "
        f"the server, {in_time} within {timeout + 1:g} s, after {min(closed, default=float('nan')):.1f}-"
        f"{max(closed, default=float('nan')):.1f} s (max); they got {dict(got)}; {good} good clients: p99 "
        f"{under.pct_ms(99):.0f} ms ({under.rps:.1f} req/s, {under.errors} errors, {under.shed} 429s) vs "
        f"{base.pct_ms(99):.0f} ms without the attack ({base.rps:.1f} req/s) = {ratio:.2f}x; a 1 MB request head: "
        f"{large}; answering after: {len(alive.latencies)} ok, {alive.errors} errors; load generator CPU "
        f"{under.client_cpu_s:.1f} s; exit {code}"
    )
    missed = [
        w
        for w, ok in (
            (f"{len(closes) - in_time} of {len(closes)} not closed in time", in_time == len(closes)),
            (f"1 MB head got {large}", large == "431"),
        )
        if not ok
    ]
    print(
        f"target: every trickling connection closed within --header-timeout + 1 s = {timeout + 1:g} s, a 1 MB "
        f"request head answered 431: {'met' if not missed else 'MISSED'}"
        + (f" ({', '.join(missed)})" if missed else "")
    )


def huge_png(side: int = 7000) -> bytes:
    """A ``side`` x ``side`` RGB PNG that compresses about 1000:1 (every row the same colour gradient,
    Pillow's default compression): 49 megapixels, 147 MB decoded, ~160 KB sent."""
    from PIL import Image

    row = np.linspace(0, 255, side).astype(np.uint8)
    pixels = np.broadcast_to(np.stack([row, row[::-1], row], -1)[None], (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def huge_images(ckpt: Path, jpegs: list[bytes], args: argparse.Namespace, logdir: Path) -> None:
    """The huge-image target: ``--huge-images N`` 49-megapixel PNGs (7000 x 7000, ~160 KB each) sent at
    once while 8 good clients run: the good clients' p99 while they are served, against a baseline of
    the 8 alone (target: within 3x), and what the huge requests got (statuses, latencies)."""
    import aiohttp

    n, good = args.huge_images, 8
    base_s = 15.0 if not args.short else 3.0
    if args.short:
        n = min(n, 2)
    png = huge_png()
    machine = _machine(" before the run")
    srv = start_server("plain", ckpt, args, logdir)
    rss = RssPeak(srv.proc.pid)

    async def huge(c: Any, got: list[tuple[int | str, float]]) -> None:
        t = time.perf_counter()
        try:
            async with c.post(srv.url + "/v1/classify", data=png, headers={"content-type": "image/png"}) as r:
                await r.read()
                status: int | str = r.status
        except (aiohttp.ClientError, OSError) as e:  # a TimeoutError is an OSError
            status = type(e).__name__
        got.append((status, time.perf_counter() - t))

    async def with_huge(got: list[tuple[int | str, float]]) -> Tally:
        import psutil

        me, tally, done = psutil.Process(), Tally(), asyncio.Event()
        c0, t0 = sum(me.cpu_times()[:2]), time.perf_counter()
        async with _session(300.0) as c:
            # the good clients run from the moment the huge images are sent until the last is answered
            tasks = [
                asyncio.ensure_future(_classify_client(c, srv.url, jpegs, i, good, done, tally)) for i in range(good)
            ]
            await asyncio.gather(*(huge(c, got) for _ in range(n)))
            done.set()
            await asyncio.gather(*tasks)
        tally.seconds = time.perf_counter() - t0
        tally.client_cpu_s = sum(me.cpu_times()[:2]) - c0
        return tally

    got: list[tuple[int | str, float]] = []
    try:
        asyncio.run(_classify_phase(srv.url, jpegs, good, 1.0))  # warm-up, not kept
        rss.take()
        base = asyncio.run(_classify_phase(srv.url, jpegs, good, base_s))
        base_rss = rss.take()
        under = asyncio.run(with_huge(got))
        huge_rss = rss.take()
    finally:
        rss.close()
        code = srv.stop()
    ratio = under.pct_ms(99) / base.pct_ms(99)
    statuses = collections.Counter(s for s, _ in got)
    secs = sorted(t for _, t in got)
    print(f"\n$ python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    print(
        f"huge images: {n} PNGs of 7000x7000 ({len(png) / 1e3:.0f} KB each) at once with {good} good clients "
        f"({machine}; model {args.model}, backend {args.backend}): the huge got {dict(statuses)} in "
        f"{secs[0]:.1f}/{secs[len(secs) // 2]:.1f}/{secs[-1]:.1f} s (min/median/max); good clients p99 "
        f"{under.pct_ms(99):.0f} ms, p50 {under.pct_ms(50):.0f} ms ({len(under.latencies)} answered in "
        f"{under.seconds:.1f} s, {under.errors} errors) vs {base.pct_ms(99):.0f} ms, p50 {base.pct_ms(50):.0f} ms "
        f"without them ({base.rps:.1f} req/s) = {ratio:.2f}x; peak RSS {huge_rss:.0f} MB vs {base_rss:.0f} MB; "
        f"load generator CPU {under.client_cpu_s:.1f} s; exit {code}"
    )
    missed = [
        w for w, ok in ((f"p99 {ratio:.2f}x", ratio <= 3.0), (f"{under.errors} errors", not under.errors)) if not ok
    ]
    print(
        f"target: the good clients' p99 within 3x of theirs without the huge images (and no errors): "
        f"{'met' if not missed else 'MISSED'}" + (f" ({', '.join(missed)})" if missed else "")
    )


def _machine(when: str = "") -> str:
    """The CPU, its count, the 1-minute load average (``when``: a note after it) and torch's version."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, AttributeError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    return (
        f"machine: {cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}{when}; torch {torch.__version__}"
    )


def print_report(results: list[dict], ceiling: dict, args: argparse.Namespace) -> None:
    print(f"\n$ python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    print(
        f"{_machine()}; model {args.model} fp32, "
        f"backend {ceiling['backend']}, threads {args.threads or 'default'}; max batch {args.max_batch_size}, "
        f"max wait {args.max_wait_ms} ms; {len(args.jpegs)} JPEGs {args.image_size}"
    )
    print(
        f"offline, the pipeline of levit predict (same JPEGs/backend/threads, median of {ceiling['rounds']} rounds before, "
        f"between and after the runs): {ceiling['img_s']:.1f} img/s at batch {args.max_batch_size}; single image "
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
                f"{args.max_batch_size} on a lane of {ceiling['lane_threads']} thread(s), median of timings "
                f"{ceiling['full_batch_range_ms'][0]:.0f}-{ceiling['full_batch_range_ms'][1]:.0f} ms before, between "
                f"and after the runs) = {p99_target:.0f} ms; "
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
    p.add_argument(
        "--short",
        action="store_true",
        help="200 requests / 20 s per run, 32 JPEGs; the fault modes: a few seconds each, fewer clients",
    )
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
    p.add_argument(
        "--overload",
        type=int,
        nargs="?",
        const=1000,
        default=None,
        metavar="N",
        help="only the overload target: N clients (default 1000) for --duration s between 64 "
        "clients before (20 s, the baseline) and after (10 s): accepted req/s, 429s, timeouts and connection "
        "errors, accepted p99 vs the baseline's, peak RSS vs the baseline's, errors once the load drops",
    )
    p.add_argument(
        "--slowloris",
        type=int,
        nargs="?",
        const=200,
        default=None,
        metavar="N",
        help="only the slow-client target: N connections (default 200) trickling a request head (a header line a second) "
        "for --duration s while 8 clients classify: when the server closes them vs --header-timeout, the 8 "
        "clients' p99 vs without the attack; and a 1 MB request head (431)",
    )
    p.add_argument(
        "--huge-images",
        type=int,
        nargs="?",
        const=20,
        default=None,
        metavar="N",
        help="only the huge-image target: N (default 20) 7000x7000 PNGs at once while 8 clients classify: the 8 clients' "
        "p99 vs without them, what the huge requests got",
    )
    p.add_argument("--max-queue", type=int, default=None, help="levit serve --max-queue (default: the server's)")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=None,
        help="--slowloris: levit serve --header-timeout (default: the server's, 10 s; --short: 2 s)",
    )
    args = p.parse_args(argv)
    if args.short and args.header_timeout is None:
        args.header_timeout = 2.0
    if args.short:
        args.requests, args.duration, args.images, args.health_requests = 200, 20.0, 32, 100
        args.rounds, args.startup_rounds = 3, 1
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import levit
    from levit.runtime.serve_process import freeze_heap

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
    from helpers import randomize_weights

    w, h = (int(v) for v in args.image_size.lower().split("x"))
    args.jpegs = jpegs = photo_jpegs(args.images, (w, h))
    with tempfile.TemporaryDirectory(prefix="levit-serve-load-") as d:
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = Path(d) / f"{args.model}.safetensors"
            levit.save(randomize_weights(levit.create_model(args.model), seed=0), ckpt)
        if args.gc_cost:
            gc_cost(ckpt, args)
            return 0
        # A full collection of what this process imported (torch, levit) stops every client at once and
        # would be timed as the server's latency: it is put out of the collector's reach, as the server does.
        freeze_heap()
        if args.compare_engines:
            compare_engines(ckpt, jpegs, args, Path(d))
            return 0
        if args.reload_every:
            reload_under_load(ckpt, jpegs, args, Path(d))
            return 0
        faults = {"overload": overload, "slowloris": slowloris, "huge_images": huge_images}
        if any(getattr(args, k) for k in faults):
            raise_open_files()
            for k, mode in faults.items():
                if getattr(args, k):
                    mode(ckpt, jpegs, args, Path(d))
            return 0
        ceiling = Ceiling(ckpt, jpegs, args.backend, args.threads, args.max_batch_size, args.lanes)
        results = [bench_engine(e, ckpt, jpegs, args, Path(d), ceiling) for e in args.engine.split(",")]
    print_report(results, ceiling.result(), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
