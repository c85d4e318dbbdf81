"""Drive ``levit serve`` with Triton's ``perf_analyzer`` (a client nobody here wrote) over KServe v2
HTTP and gRPC, against ``levit predict``'s own pipeline offline on the same JPEGs.

The server is started as a user starts it (``python -m levit serve`` with its defaults, the gRPC port
open); perf_analyzer reads the model's metadata and Triton configuration
(``GET /v2/models/{name}/config``, the ``ModelConfig`` RPC), then keeps ``--concurrency`` requests in
flight, each one JPEG (a ``BYTES`` tensor of shape ``[1, 1]``, sent with the binary tensor extension)
cycling through ``--images`` photo-like JPEGs (``benchmarks/serve_load.py``'s). Rounds alternate the
offline pipeline (the server idle), HTTP and gRPC (gRPC first every other round); medians are
reported, with the targets: HTTP >= 0.85x offline, gRPC >= HTTP, and each round's gRPC / HTTP with
an interval for their median (:func:`median_interval`: whether the run tells the two apart). With
``--torchserve`` each round also runs perf_analyzer as TorchServe's client
(``--service-kind=torchserve``: each JPEG a form field named ``data`` posted to
``/predictions/{name}``); with ``--streaming``, as a gRPC client of Triton's streaming RPC
(``perf_analyzer --streaming``: each client's requests on one ``ModelStreamInfer`` stream), its
rate over HTTP's printed by round as gRPC's is. Beside each protocol's rate: the model's mean batch, its batches by size
and its time per image (the server's ``/metrics``), the server's context switches and page faults
per request and its CPU per request by kind of thread (``/proc``), which show whether a protocol
costs in its own work or in what it takes from the model's lanes, and perf_analyzer's own context
switches per request (the load generator shares the cores). ``--json FILE`` keeps every round.

    python benchmarks/perf_analyzer.py --fetch ~/.cache/levit-perf-analyzer   # once: get perf_analyzer
    python benchmarks/perf_analyzer.py --perf-analyzer ~/.cache/levit-perf-analyzer/perf_analyzer
    python benchmarks/perf_analyzer.py --perf-analyzer PATH --short            # a minute: checks the script
    python benchmarks/perf_analyzer.py --perf-analyzer PATH --torchserve       # TorchServe's API as well
    python benchmarks/perf_analyzer.py --perf-analyzer PATH --streaming        # gRPC's streaming RPC as well
    python benchmarks/perf_analyzer.py --perf-analyzer PATH --server-env GRPC_POLL_STRATEGY=poll

Getting perf_analyzer without a Triton container: the current ``perf-analyzer`` wheel needs glibc 2.38;
the binary inside ``tritonclient[all]==2.39.0`` runs on glibc 2.36 (Debian 12) once ``libb64`` (Debian's
``libb64-0d``, installed with apt) and ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12`` wheel; no
GPU is used) are found. ``--fetch DIR`` downloads both wheels with pip and unpacks the binary and the
library into DIR; the script puts DIR on ``LD_LIBRARY_PATH`` when it runs the binary from there.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import serve_load
from intervals import median_interval
from serve_load import HOST, Ceiling, cpu_by_kind, free_port, photo_jpegs, start_server

TRITONCLIENT = "tritonclient[all]==2.39.0"  # the last wheel whose perf_analyzer runs on glibc 2.36


def fetch(dest: Path) -> Path:
    """Download the two wheels with pip and unpack ``perf_analyzer`` and ``libcudart.so.12`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        for req in (TRITONCLIENT, "nvidia-cuda-runtime-cu12"):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", req, "-d", d]
            subprocess.run(cmd, check=True)
        for wheel in Path(d).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    base = name.rsplit("/", 1)[-1]
                    if name.endswith("/bin/perf_analyzer") or base == "libcudart.so.12":
                        (dest / base).write_bytes(z.read(name))
    binary = dest / "perf_analyzer"
    binary.chmod(0o755)
    if not Path("/usr/lib/x86_64-linux-gnu/libb64.so.0d").exists():
        print("perf_analyzer also needs libb64: apt-get install libb64-0d", file=sys.stderr)
    print(f"perf_analyzer: {binary}")
    return binary


def input_data(jpegs: list[bytes], path: Path) -> Path:
    """perf_analyzer's ``--input-data`` file: one entry per JPEG. perf_analyzer sends a ``b64`` value,
    decoded, as the tensor's raw bytes, and a ``BYTES`` tensor's raw form is each element's 4-byte
    little-endian length then its bytes, so that is what is encoded."""
    rows = [{"image": {"b64": base64.b64encode(struct.pack("<I", len(j)) + j).decode(), "shape": [1]}} for j in jpegs]
    path.write_text(json.dumps({"data": rows}))
    return path


def torchserve_input_data(jpegs: list[bytes], folder: Path) -> Path:
    """perf_analyzer's ``--input-data`` file for ``--service-kind=torchserve``: the path of each JPEG,
    written into ``folder``, which it sends as a form's ``data`` field."""
    rows = []
    for i, j in enumerate(jpegs):
        (path := folder / f"photo{i:03d}.jpg").write_bytes(j)
        rows.append({"TORCHSERVE_INPUT": [str(path)]})
    (out := folder / "torchserve.json").write_text(json.dumps({"data": rows}))
    return out


def run_perf_analyzer(binary: Path, model: str, url: str, protocol: str, data: Path, args: argparse.Namespace) -> dict:
    """One perf_analyzer run at ``--concurrency``: its throughput and latency percentiles (ms).
    ``protocol``: ``http`` or ``grpc`` (KServe v2), or ``torchserve`` (TorchServe's API, over HTTP)."""
    env = dict(os.environ)
    if (binary.parent / "libcudart.so.12").exists():
        env["LD_LIBRARY_PATH"] = f"{binary.parent}:{env.get('LD_LIBRARY_PATH', '')}"
    kind = {
        "torchserve": ["--service-kind", "torchserve", "-i", "http"],
        "grpc-stream": ["-i", "grpc", "--streaming"],  # Triton's ModelStreamInfer: one stream per client
    }.get(protocol, ["-i", protocol])
    cmd = [str(binary), "-m", model, "-u", url, *kind, "--input-data", str(data)]
    cmd += ["--concurrency-range", str(args.concurrency), "--measurement-interval", str(args.window_ms)]
    cmd += ["--stability-percentage", "25", "--max-trials", "8"]
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.stdout + out.stderr
    found = {
        k: re.search(rf"{pat}: ([\d.]+)", text)
        for k, pat in (("req_s", "Throughput"), ("p50", "p50 latency"), ("p99", "p99 latency"))
    }
    if out.returncode != 0 or not all(found.values()):
        raise SystemExit(f"perf_analyzer ({protocol}) exited {out.returncode}:\n{text[-3000:]}")
    return {
        "req_s": float(found["req_s"].group(1)),
        "p50": float(found["p50"].group(1)) / 1e3,
        "p99": float(found["p99"].group(1)) / 1e3,
        # the client's CPU over the whole run, its stabilising trials included
        "client_cpu_s": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
        "client_switches": c1.ru_nvcsw + c1.ru_nivcsw - c0.ru_nvcsw - c0.ru_nivcsw,
    }


def model_counters(url: str) -> tuple[float, float, float, float, float, dict[float, float]]:
    """(images, batches, seconds, refused, CPU seconds, buckets) so far: what the server's model has
    computed, summed over its ``levit_batch_size``, ``levit_batch_latency_seconds`` and
    ``levit_batch_cpu_seconds`` series in ``/metrics``, the HTTP
    answers other than 200 (``levit_requests_total``; gRPC's refusals are not counted there), and the
    batches of at most each bucket's size (:func:`batch_shares` takes the difference)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    names = ("levit_batch_size_sum", "levit_batch_size_count", "levit_batch_latency_seconds_sum")
    want = dict.fromkeys((*names, "levit_batch_cpu_seconds_total"), 0.0)
    refused = 0.0
    below: dict[float, float] = {}  # batches of at most this many images (the histogram's buckets)
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in fam.samples:
            if sample.name in want:
                want[sample.name] += sample.value
            elif sample.name == "levit_batch_size_bucket":
                le = float(sample.labels["le"])
                below[le] = below.get(le, 0.0) + sample.value
            elif sample.name == "levit_requests_total" and sample.labels["status"] != "200":
                refused += sample.value
    images, batches, seconds, cpu = want.values()
    return images, batches, seconds, refused, cpu, below


def batch_shares(before: dict[float, float], after: dict[float, float], batches: float) -> dict[str, float]:
    """The share of the batches computed between two reads of the batch-size histogram that held
    1-8, 9-16, 17-32 and more images (``batches_le8``, ...): two protocols at the same mean batch can
    still batch differently, and a lane's time per image depends on its batch."""
    edges = [(0, 8, "le8"), (8, 16, "le16"), (16, 32, "le32"), (32, float("inf"), "gt32")]
    count = {le: after[le] - before.get(le, 0.0) for le in after}
    return {f"batches_{name}": (count[hi] - count.get(lo, 0.0)) / max(batches, 1) for lo, hi, name in edges}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--perf-analyzer", type=Path, help="the perf_analyzer binary (default: on PATH)")
    p.add_argument("--fetch", type=Path, metavar="DIR", help="download perf_analyzer into DIR and stop")
    p.add_argument(
        "--model", default="levit_128s", help="variant (random weights, the same file for server and offline)"
    )
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs, 480x360")
    p.add_argument("--rounds", type=int, default=3, help="offline, HTTP and gRPC in turn, this many times")
    p.add_argument("--window-ms", type=int, default=10000, help="perf_analyzer's measurement window")
    p.add_argument("--short", action="store_true", help="1 round, 3 s windows, 16 JPEGs: checks the script")
    p.add_argument(
        "--torchserve", action="store_true", help="each round also drives /predictions as TorchServe's client"
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the server alone, e.g. GRPC_POLL_STRATEGY=poll (repeatable)",
    )
    p.add_argument(
        "--streaming",
        action="store_true",
        help="also gRPC's streaming RPC (perf_analyzer --streaming: each client's requests on one stream)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every round's figures to FILE")
    args = p.parse_args(argv)
    bad = [kv for kv in args.server_env if "=" not in kv or kv.startswith("=")]
    if bad:
        p.error(f"--server-env takes KEY=VALUE, got {bad[0]!r}")
    args.server_env = dict(kv.split("=", 1) for kv in args.server_env)
    if args.short:
        args.rounds, args.window_ms, args.images = 1, 3000, 16
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch:
        fetch(args.fetch)
        return 0
    binary = args.perf_analyzer or (Path(p) if (p := shutil.which("perf_analyzer")) else None)
    if binary is None or not binary.exists():
        raise SystemExit("no perf_analyzer: give --perf-analyzer PATH, or get one with --fetch DIR")
    import levit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
    from helpers import randomize_weights

    sargs = serve_load.parse_args([])  # levit serve's defaults, as serve_load.py starts the server
    jpegs = photo_jpegs(args.images)
    with tempfile.TemporaryDirectory(prefix="levit-perf-analyzer-") as d:
        ckpt = Path(d) / f"{args.model}.safetensors"
        levit.save(randomize_weights(levit.create_model(args.model), seed=0), ckpt)
        data = {"http": input_data(jpegs, Path(d) / "input.json")}
        data["grpc"] = data["http"]
        if args.torchserve:
            data["torchserve"] = torchserve_input_data(jpegs, Path(d))
        offline = Ceiling(ckpt, jpegs, sargs.backend, sargs.threads, sargs.max_batch_size, sargs.lanes)
        grpc_port = free_port()
        extra = ("--grpc-port", str(grpc_port))
        srv = start_server("plain", ckpt, sargs, Path(d), extra=extra, env=args.server_env)
        urls = {"http": srv.url.removeprefix("http://"), "grpc": f"{HOST}:{grpc_port}"}
        if args.torchserve:
            urls["torchserve"] = urls["http"]
        if args.streaming:
            urls["grpc-stream"], data["grpc-stream"] = urls["grpc"], data["grpc"]
        runs: dict[str, list[dict]] = {proto: [] for proto in urls}
        try:
            for i in range(args.rounds):
                offline.measure()
                # the protocols' order reverses every other round, so that neither always runs on a
                # server warmed by the other or at the same point of the machine's drift
                for proto, url in list(urls.items())[:: -1 if i % 2 else 1]:
                    s0, x0, t0, m0 = srv.cpu_s(), srv.ctx_switches(), srv.thread_cpu_s(), model_counters(srv.url)
                    f0 = srv.page_faults()
                    r = run_perf_analyzer(binary, args.model, url, proto, data[proto], args)
                    # over the whole perf_analyzer run (its stabilising trials too); one image a request
                    m1 = model_counters(srv.url)
                    images, batches, seconds, refused, cpu = (b - a for a, b in zip(m0[:5], m1[:5], strict=True))
                    r |= batch_shares(m0[5], m1[5], batches)
                    r["refused"] = refused
                    r["server_cpu_s"] = srv.cpu_s() - s0
                    r["mean_batch"], r["model_ms"] = images / batches, 1e3 * seconds / images
                    r["model_cpu_ms"] = 1e3 * cpu / images
                    r["switches"] = (srv.ctx_switches() - x0) / images
                    r["client_switches"] /= images
                    r["faults"] = (srv.page_faults() - f0) / images
                    for kind, cpu in cpu_by_kind(t0, srv.thread_cpu_s()).items():  # CPU ms per request
                        r[f"{kind}_ms"] = 1e3 * cpu / images
                    runs[proto].append(r)
        finally:
            code = srv.stop()
        base = offline.result()
    print(
        f"perf_analyzer, {args.concurrency} concurrent requests, {args.model} (random weights), "
        f"{args.images} JPEGs 480x360, {args.rounds} round(s), {serve_load._machine()}; levit serve exit {code}"
        + "".join(f"; server {k}={v}" for k, v in args.server_env.items())
    )
    print(f"  offline (levit predict's pipeline, backend {base['backend']}): {base['img_s']:.1f} img/s")
    med = {}
    for proto, rs in runs.items():
        med[proto] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        m = med[proto]
        each = ", ".join(f"{r['req_s']:.1f}" for r in rs)
        print(
            f"  {proto:4s}: {m['req_s']:.1f} req/s = {m['req_s'] / base['img_s']:.2f}x offline, "
            f"p50 {m['p50']:.0f} ms, p99 {m['p99']:.0f} ms; CPU s server {m['server_cpu_s']:.1f}, "
            f"perf_analyzer {m['client_cpu_s']:.1f} (rounds: {each}); HTTP answers other than 200: "
            f"{sum(r['refused'] for r in rs):.0f}"
        )
        print(
            f"        model: batches of {m['mean_batch']:.1f} on average, {m['model_ms']:.2f} ms per image "
            f"({m['model_cpu_ms']:.2f} of them computing); "
            f"{m['switches']:.0f} context switches and {m['faults']:.0f} page faults per request (server), "
            f"{m['client_switches']:.0f} context switches per request (perf_analyzer)"
        )
        print(
            f"        batches of 1-8, 9-16, 17-32, more images: {100 * m['batches_le8']:.0f}%, "
            f"{100 * m['batches_le16']:.0f}%, {100 * m['batches_le32']:.0f}%, {100 * m['batches_gt32']:.0f}%"
        )
        total = m["loop_ms"] + m["grpc_ms"] + m["other_ms"]
        print(
            f"        server CPU ms per request: {total:.2f} = event loop {m['loop_ms']:.2f} + gRPC's C-core "
            f"threads {m['grpc_ms']:.2f} + decoding, model and other threads {m['other_ms']:.2f} (the model's "
            f"passes {m['model_cpu_ms']:.2f}, the rest {m['other_ms'] - m['model_cpu_ms']:.2f})"
        )
    # each round's gRPC rate over its own HTTP rate: the two ran minutes apart at most, so the
    # machine's drift between rounds cancels out of the ratio
    for proto, name in (("grpc", "gRPC"), ("grpc-stream", "gRPC streaming")):
        if proto not in runs:
            continue
        paired = [g["req_s"] / h["req_s"] for g, h in zip(runs[proto], runs["http"], strict=True)]
        low, high, coverage = median_interval(paired)
        verdict = f"{name} ahead" if low > 1 else f"{name} behind" if high < 1 else "parity within this run's spread"
        if coverage < 0.85:  # fewer than 4 rounds: their smallest and largest say little of the median
            verdict = "too few rounds to tell"
        print(
            f"{name} / HTTP by round: {', '.join(f'{r:.3f}' for r in paired)}; median "
            f"{statistics.median(paired):.3f}, {100 * coverage:.0f}% interval for the median {low:.3f}-{high:.3f} "
            f"({verdict})"
        )
    http_ok = med["http"]["req_s"] >= 0.85 * base["img_s"]
    grpc_ok = med["grpc"]["req_s"] >= med["http"]["req_s"]
    line = f"target: HTTP >= 0.85x offline: {'met' if http_ok else 'MISSED'}; gRPC >= HTTP: {'met' if grpc_ok else 'MISSED'}"
    if "grpc-stream" in med:
        stream_ok = med["grpc-stream"]["req_s"] >= med["http"]["req_s"]
        line += f"; gRPC streaming >= HTTP: {'met' if stream_ok else 'MISSED'}"
    print(line)
    if args.json:
        args.json.write_text(json.dumps({"offline": base, "rounds": runs}, indent=1))
    if "torchserve" in med:  # no target of its own: the same handler as /v1/classify behind a form parser
        print(f"TorchServe's API / KServe v2 HTTP: {med['torchserve']['req_s'] / med['http']['req_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
