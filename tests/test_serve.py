"""``levit serve``: every endpoint, every class of bad input, batching, draining on SIGTERM, and the
same application on Ray Serve. The server runs as ``python -m levit serve`` on a free loopback port
with a tiny randomised model; answers are checked against ``levit predict``'s pipeline on the same files.

The model carries a preprocessing of its own (:data:`PREPROCESS`: no crop margin, its own mean and
std), as a fine-tuned checkpoint does, so every comparison with ``levit predict`` also checks that the
server (and each Ray replica) preprocesses as the model says, not as ImageNet's defaults would."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("fastapi", reason="levit serve needs the serve extra: pip install 'levit[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client")

from helpers import fake_lanes, randomize_weights, sample_images  # noqa: E402

import levit  # noqa: E402
from levit.cli import main  # noqa: E402
from levit.runtime.predict import predict_paths  # noqa: E402

HOST = "127.0.0.1"
# the model's own preprocessing, far from the authors' (crop 0.875, ImageNet mean/std)
PREPROCESS = {"crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
MAX_WAIT_MS = 60  # long enough that concurrent test requests share batches on a busy machine


# ---- fixtures: a model file, photo-like images, a running server ---------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = randomize_weights(levit.create_model("levit_tiny", img_size=32), seed=1)
    model.pretrained_cfg.update(PREPROCESS)
    levit.save(model, d / "tiny.safetensors")
    out = {"model": d / "tiny.safetensors"}
    imgs = (sample_images(6, 72, seed=5).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, (name, fmt) in enumerate([("a.jpg", "JPEG"), ("b.png", "PNG"), ("c.webp", "WEBP"), ("e.jpg", "JPEG")]):
        Image.fromarray(imgs[i]).save(d / name, format=fmt)
        out[name] = d / name
    grey16 = (imgs[4].mean(-1) * 257).astype(np.uint16)  # 16-bit greyscale PNG
    Image.fromarray(grey16).save(d / "d16.png")
    out["d16.png"] = d / "d16.png"
    for name, side in (("bomb.png", 30000), ("big.png", 3000)):
        out[name] = d / name
        out[name].write_bytes(_blank_png(side))
    return out


def _blank_png(side: int) -> bytes:
    """A black 1-bit PNG of side x side pixels, written row by row (30000^2 = 900 Mpx in ~500 KB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(1)
    rows = bytes((1 + (side + 7) // 8) * 1000)  # 1000 rows of: filter byte 0, packed black pixels
    idat = b"".join(z.compress(rows[: len(rows) // 1000 * min(1000, side - i)]) for i in range(0, side, 1000))
    idat += z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def expected(files) -> dict[str, list[dict]]:
    """levit predict's answers (the same decoding and preprocessing, one image at a time)."""
    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    names = ["a.jpg", "b.png", "c.webp", "d16.png", "e.jpg"]
    res = predict_paths(model, [files[n] for n in names], topk=3, batch_size=1, progress=False)
    return {n: r["top"] for n, r in zip(names, res, strict=True)}


class Server:
    """``python -m levit serve ...`` in a subprocess on a free loopback port; stderr kept in a file."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "levit", "serve", "--host", HOST, "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), env=env)
        self.url = self._wait_ready()

    def _wait_ready(self, timeout: float = 90.0) -> str:
        end = time.monotonic() + timeout
        url = None
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.log.read_text()}"
            if url is None and (m := re.search(r"http://127\.0\.0\.1:\d+", self.log.read_text())):
                url = m.group(0)
            if url is not None:
                try:
                    if HTTP.get(url + "/ready", timeout=2).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s: {self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("log"),
        *("--checkpoint", str(files["model"]), "--backend", "eager", "--threads", "1"),
        *("--max-batch-size", "8", "--max-wait-ms", str(MAX_WAIT_MS), "--topk", "3"),
        *("--max-body-mb", "1", "--max-megapixels", "2", "--read-timeout", "3"),
        *("--max-header-kb", "8", "--header-timeout", "2", "--grpc-port", "0"),
        # the tests send up to 20 requests at once; the default bound (one batch of 8 a lane) is tested
        # on services of their own
        *("--max-queue", "64"),
    )
    yield s
    assert s.stop() == 0


# one client for the plain-HTTP calls of this file: each httpx.get/post builds a client of its own,
# whose TLS context loads the CA bundle first; no keep-alive, so that no connection outlives the
# server it was opened to
HTTP = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))


def post(url: str, data: bytes, ctype: str | None = "image/jpeg", **kw) -> httpx.Response:
    headers = {"content-type": ctype} if ctype else {}
    return HTTP.post(url + "/v1/classify", content=data, headers=headers, timeout=30, **kw)


def assert_same(top: list[dict], want: list[dict]) -> None:
    assert [t["class"] for t in top] == [w["class"] for w in want]
    assert [t["label"] for t in top] == [w["label"] for w in want]
    np.testing.assert_allclose([t["prob"] for t in top], [w["prob"] for w in want], atol=2e-5)


def metric(url: str, name: str, labels: dict | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = HTTP.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and (labels is None or all(s.labels.get(k) == v for k, v in labels.items())):
                return s.value
    return 0.0


# ---- endpoints -------------------------------------------------------------------------------------
def test_health_ready_docs(server):
    assert HTTP.get(server.url + "/health").json() == {"status": "alive"}
    r = HTTP.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert "swagger" in HTTP.get(server.url + "/docs").text.lower()
    spec = HTTP.get(server.url + "/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    predictions = spec["paths"]["/predictions/{name}/{version}"]
    assert {"post", "put"} <= set(predictions) and "*/*" in predictions["put"]["requestBody"]["content"]


def test_the_openapi_page_gives_each_operation_its_own_id(files):
    """FastAPI warns of a duplicate operation id (and OpenAPI clients generated from the page clash)
    when one route takes two methods: TorchServe's POST and PUT are routes of their own."""
    import warnings

    from levit.runtime.serve import LeViTService, ServeConfig

    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    app = LeViTService(model, ServeConfig(backend="eager", quiet=True), load_now=False).build_app().app
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = app.openapi()
    assert not [w for w in caught if "Duplicate Operation ID" in str(w.message)]
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) and len(spec["paths"]["/predictions/{name}"]) == 2


@pytest.mark.parametrize("name", ["a.jpg", "b.png", "c.webp", "d16.png"])
def test_classify_raw_bytes_matches_predict(server, files, expected, name):
    ctype = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[name.rsplit(".", 1)[1]]
    r = post(server.url, files[name].read_bytes(), ctype)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "levit_tiny" and body["latency_ms"] > 0
    assert_same(body["top"], expected[name])


def test_classify_multipart_and_topk(server, files, expected):
    r = HTTP.post(
        server.url + "/v1/classify?topk=2", files={"file": ("a.jpg", files["a.jpg"].read_bytes(), "image/jpeg")}
    )
    assert r.status_code == 200, r.text
    assert_same(r.json()["top"], expected["a.jpg"][:2])
    r = post(server.url, files["a.jpg"].read_bytes(), None)  # no content type: the bytes are sniffed
    assert_same(r.json()["top"], expected["a.jpg"])


def test_a_form_field_named_data_carries_the_image_as_torchserve_clients_send_it(server, files, expected):
    """TorchServe's clients (perf_analyzer --service-kind=torchserve, `curl -F 'data=<img.jpg'`) send
    the image as a form part named data, with no filename: its bytes, binary as they are, are the
    image. Beside a text field, and as a field named body; two files are refused."""
    jpg, png = files["a.jpg"].read_bytes(), files["b.png"].read_bytes()
    for form in ({"data": (None, jpg)}, {"note": (None, "hello"), "body": (None, jpg)}):
        r = HTTP.post(server.url + "/v1/classify", files=form, timeout=30)
        assert r.status_code == 200, r.text
        assert_same(r.json()["top"], expected["a.jpg"])
    r = HTTP.post(server.url + "/v1/classify", files={"data": (None, png)}, timeout=30)
    assert_same(r.json()["top"], expected["b.png"])
    two = {"a": ("a.jpg", jpg, "image/jpeg"), "b": ("b.png", png, "image/png")}
    assert "2 files" in _error_line(HTTP.post(server.url + "/v1/classify", files=two, timeout=30), 400)
    bad = HTTP.post(
        server.url + "/v1/classify", content=b"no parts", headers={"content-type": "multipart/form-data"}, timeout=30
    )
    assert "boundary" in _error_line(bad, 400)


def test_torchserve_clients_get_torchserves_answers(server, files, expected):
    """TorchServe's inference API: /ping, and /predictions/{model}[/{version}] taking the image as
    `curl -T` PUTs it, as `curl --data-binary` POSTs it (labelled a urlencoded form, which /v1/classify
    refuses) or as a form field named data, answering {label: prob} most probable first,
    the same top-k as /v1/classify and levit predict; an unknown model or version is a JSON 404, and the
    metrics count the route under one label whatever the model."""
    from levit.runtime.serve_torchserve import torchserve_body

    def assert_torchserve(r: httpx.Response, want: list[dict]) -> None:
        assert r.status_code == 200, r.text
        body = r.json()
        assert list(body) == [w["label"] for w in want]  # the order is the ranking
        np.testing.assert_allclose(list(body.values()), [w["prob"] for w in want], atol=2e-5)

    assert HTTP.get(server.url + "/ping").json() == {"status": "Healthy"}
    counted = metric(server.url, "levit_requests_total", {"route": "/predictions/{name}", "status": "200"})
    timed = metric(server.url, "levit_request_latency_seconds_count")
    jpg, png = files["a.jpg"].read_bytes(), files["b.png"].read_bytes()
    assert_torchserve(HTTP.put(server.url + "/predictions/levit_tiny", content=jpg, timeout=30), expected["a.jpg"])
    # `curl --data-binary @a.jpg` labels the bytes a urlencoded form: TorchServe reads them as the image
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = HTTP.post(server.url + "/predictions/levit_tiny", content=jpg, headers=form, timeout=30)
    assert_torchserve(r, expected["a.jpg"])
    assert HTTP.post(server.url + "/v1/classify", content=jpg, headers=form, timeout=30).status_code == 415
    r = HTTP.post(server.url + "/predictions/levit_tiny", files={"data": (None, png)}, timeout=30)
    assert_torchserve(r, expected["b.png"])
    serving = HTTP.post(server.url + "/v2/repository/index", timeout=10).json()[0]["version"]
    r = HTTP.post(f"{server.url}/predictions/levit_tiny/{serving}?topk=1", content=png, timeout=30)
    assert_torchserve(r, expected["b.png"][:1])
    assert r.headers["x-levit-model-version"] == serving
    assert "version '99'" in _error_line(HTTP.post(server.url + "/predictions/levit_tiny/99", content=png), 404)
    assert "'levit_tiny'" in _error_line(HTTP.post(server.url + "/predictions/nope", content=png), 404)
    after = metric(server.url, "levit_requests_total", {"route": "/predictions/{name}", "status": "200"})
    assert after - counted == 4
    assert metric(server.url, "levit_request_latency_seconds_count") - timed == 4  # timed as /v1/classify is
    # a repeated label keeps both rows
    rows = [{"class": 4, "label": "crane", "prob": 0.5}, {"class": 9, "label": "crane", "prob": 0.25}]
    assert torchserve_body(rows) == {"crane": 0.5, "crane (9)": 0.25}


def _same_top(a: list[dict], b: list[dict]) -> bool:
    """The same classes in the same order, with the same probabilities (as :func:`assert_same`)."""
    return [t["class"] for t in a] == [t["class"] for t in b] and np.allclose(
        [t["prob"] for t in a], [t["prob"] for t in b], atol=2e-5, rtol=0
    )


def test_answers_use_the_models_own_preprocessing_as_predict_does(server, files):
    """The model's pretrained_cfg (crop 1.0, its own mean and std) reaches the server as it reaches
    levit predict: the top-5 over HTTP equal predict_paths' on every image. The same model preprocessed
    the authors' way (ImageNet mean/std, crop 0.875), or with only their crop, answers differently on
    at least one of these images, so a server falling back to either default fails here."""
    from levit.models.network import default_preprocess

    names = ["a.jpg", "b.png", "c.webp", "d16.png", "e.jpg"]
    paths = [files[n] for n in names]
    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    assert {k: model.pretrained_cfg[k] for k in PREPROCESS} == PREPROCESS  # the file carries it
    want = predict_paths(model, paths, topk=5, batch_size=1, progress=False)
    for name, row in zip(names, want, strict=True):
        r = post(server.url, files[name].read_bytes(), None, params={"topk": 5})
        assert r.status_code == 200, r.text
        assert len(r.json()["top"]) == 5
        assert_same(r.json()["top"], row["top"])
    authors = default_preprocess()
    for other in (authors, {**PREPROCESS, "crop_pct": authors["crop_pct"]}):
        model.pretrained_cfg = {**model.pretrained_cfg, **other}
        rows = predict_paths(model, paths, topk=5, batch_size=1, progress=False)
        assert not all(_same_top(r["top"], w["top"]) for r, w in zip(rows, want, strict=True)), other


def test_the_config_keeps_the_models_preprocessing_unless_crop_pct_is_given(files):
    """``ServeConfig.crop_pct`` None (the default, and ``levit serve`` without ``--crop-pct``) keeps the
    model's; a value overrides the crop only, as ``levit predict --crop-pct`` does."""
    from levit.data.preprocess import Preprocess
    from levit.runtime.serve import LeViTService, ServeConfig

    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    config = ServeConfig()
    assert config.crop_pct is None
    assert LeViTService(model, config).preprocess == Preprocess.from_model(model, max_pixels=config.max_pixels)
    pre = LeViTService(model, ServeConfig(crop_pct=0.5)).preprocess
    assert (pre.crop_pct, pre.mean, pre.std) == (0.5, PREPROCESS["mean"], PREPROCESS["std"])
    assert LeViTService(model, ServeConfig(decoder="tensor")).preprocess.decoder == "tensor"  # as --decoder


def test_metrics_count_statuses_latency_and_queue(server, files):
    before = metric(server.url, "levit_requests_total", {"route": "/v1/classify", "status": "200"})
    lat_before = metric(server.url, "levit_request_latency_seconds_count")
    bad_before = metric(server.url, "levit_requests_total", {"route": "/v1/classify", "status": "415"})
    assert post(server.url, files["a.jpg"].read_bytes()).status_code == 200
    assert post(server.url, b"{}", "application/json").status_code == 415
    assert metric(server.url, "levit_requests_total", {"route": "/v1/classify", "status": "200"}) == before + 1
    assert metric(server.url, "levit_requests_total", {"route": "/v1/classify", "status": "415"}) == bad_before + 1
    assert metric(server.url, "levit_request_latency_seconds_count") == lat_before + 1
    assert metric(server.url, "levit_queue_depth") == 0 and metric(server.url, "levit_in_flight") == 0
    assert metric(server.url, "levit_ready") == 1


# ---- batching ----------------------------------------------------------------------------------
async def _concurrent(url: str, bodies: list[tuple[bytes, str]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        return await asyncio.gather(
            *(c.post(url + "/v1/classify", content=b, headers={"content-type": t}) for b, t in bodies)
        )


def test_the_default_queue_bound_is_one_full_batch_per_lane():
    """Unless --max-queue is given, a request is taken while fewer than the lanes' full batches and a
    quarter batch are: an overload's accepted requests find about those ahead of them (docs/serving.md,
    Faults at full size)."""
    from levit.runtime.serve import LeViTService, ServeConfig

    model = levit.create_model("levit_tiny", img_size=64)
    assert LeViTService(model, ServeConfig(lanes=2, max_batch_size=3, quiet=True)).max_queue == 6 + 1
    assert LeViTService(model, ServeConfig(lanes=2, max_batch_size=32, quiet=True)).max_queue == 64 + 8
    assert LeViTService(model, ServeConfig(lanes=2, max_batch_size=3, max_queue=5, quiet=True)).max_queue == 5


def test_a_ray_replica_takes_two_full_batches_per_lane_by_default():
    """Under --ray each replica's bound is twice the single process's, room for a lost replica's share
    (levit.runtime.serve_ray.replica_config); --max-queue is kept as given."""
    from levit.runtime.serve import ServeConfig
    from levit.runtime.serve_ray import replica_config

    assert replica_config(ServeConfig(max_batch_size=8), 3).queue_bound(3) == 48
    assert replica_config(ServeConfig(max_batch_size=8, max_queue=5), 3).queue_bound(3) == 5
    assert ServeConfig(max_batch_size=8).queue_bound(3) == 24 + 2  # the single process


def test_concurrent_requests_are_batched_and_bad_ones_harm_none(server, files, expected):
    """16 good and 4 bad requests at once: the batch-size histogram shows batches of more than one,
    every good answer equals the one-at-a-time answer, every bad one gets its 4xx."""
    n0 = metric(server.url, "levit_batch_size_count")
    s0 = metric(server.url, "levit_batch_size_sum")
    cpu0, wall0 = (
        metric(server.url, "levit_batch_cpu_seconds_total"),
        metric(server.url, "levit_batch_latency_seconds_sum"),
    )
    good = ["a.jpg", "b.png", "c.webp", "d16.png"] * 4
    jpg = files["e.jpg"].read_bytes()
    bad = [
        (b"not an image", "image/jpeg"),
        (jpg[: len(jpg) // 2], "image/jpeg"),
        (b"", "image/png"),
        (b"x", "text/plain"),
    ]
    bodies = [(files[n].read_bytes(), "application/octet-stream") for n in good] + bad
    order = np.random.default_rng(0).permutation(len(bodies))
    responses = asyncio.run(_concurrent(server.url, [bodies[i] for i in order]))
    by_index = dict(zip(order.tolist(), responses, strict=True))
    for i, name in enumerate(good):
        assert by_index[i].status_code == 200, by_index[i].text
        assert_same(by_index[i].json()["top"], expected[name])
    assert [by_index[len(good) + j].status_code for j in range(4)] == [400, 400, 400, 415]
    batches = metric(server.url, "levit_batch_size_count") - n0
    assert metric(server.url, "levit_batch_size_sum") - s0 == len(good)  # each good image in exactly one batch
    assert batches < len(good), f"{len(good)} concurrent requests ran as {batches} batches: nothing was batched"
    # the passes' CPU time is counted, and is within their wall time (a thread computes at most that long)
    cpu, wall = (
        metric(server.url, "levit_batch_cpu_seconds_total") - cpu0,
        metric(server.url, "levit_batch_latency_seconds_sum") - wall0,
    )
    assert 0 < cpu <= wall, (cpu, wall)


def test_lane_layout_fills_the_cores():
    from levit.runtime.pipeline import lane_layout

    assert lane_layout(None, None, 4) == (4, 1)  # the default: a one-thread lane per core
    assert lane_layout(None, None, 32) == (8, 4)  # at most 8 copies of the model, sharing the cores
    assert lane_layout(None, 2, 4) == (2, 2) and lane_layout(2, None, 4) == (2, 2)
    assert lane_layout(None, 8, 2) == (1, 8) and lane_layout(3, 1, 2) == (3, 1)  # as asked


def test_a_lane_stacks_every_batch_into_the_memory_of_its_first():
    """levit.runtime.serve_app.Lane: each batch is its images stacked in order, in memory allocated
    once per lane (a fresh batch tensor per batch faults in every page again after an allocator trim,
    which protobuf's runtime makes under gRPC load); a larger batch or another image shape gets new
    memory, then keeps it."""
    from levit.runtime.serve_app import Lane

    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 8, 8, generator=g) for _ in range(5)]
    lane = Lane(lambda x: x)
    first = lane.stack(images[:2])
    assert torch.equal(first, torch.stack(images[:2]))
    full = lane.stack(images)  # larger than the first: new memory, held from now on
    assert torch.equal(full, torch.stack(images)) and full.data_ptr() != first.data_ptr()
    for batch in (images[3:][::-1], images[1:4], images):
        got = lane.stack(batch)
        assert torch.equal(got, torch.stack(batch)) and got.data_ptr() == full.data_ptr()
    other = lane.stack([torch.ones(3, 4, 4), torch.zeros(3, 4, 4)])  # another size: its own memory
    assert torch.equal(other, torch.stack([torch.ones(3, 4, 4), torch.zeros(3, 4, 4)]))
    assert other.data_ptr() != full.data_ptr()
    fresh = Lane(lambda x: x)
    with torch.inference_mode():  # memory made in inference mode: torch refuses to write it outside
        inside = fresh.stack(images)
    assert inside.is_inference() and torch.equal(fresh.stack(images), inside)


def test_a_lane_normalizes_uint8_pixels_as_levit_predict_does_image_by_image(files):
    """The server's decoding threads hand uint8 pixels (Preprocess.pixels) to the lane, which stacks
    them and normalizes the batch into its own float memory: bit for bit the float tensors that
    levit predict's Preprocess makes image by image, with the model's own mean and std (not
    ImageNet's: a lane that normalized with other statistics would fail), batch after batch in the
    same memory."""
    from levit.data.preprocess import Preprocess
    from levit.runtime.serve_app import Lane

    pre = Preprocess(img_size=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))  # a model's own statistics
    photos = [files[n].read_bytes() for n in ("a.jpg", "b.png", "c.webp")]
    lane = Lane(lambda x: x, pre.normalize)
    first = lane.stack([pre.pixels(b) for b in photos])
    assert first.dtype == torch.float32
    assert torch.equal(first, torch.stack([pre(b) for b in photos]))  # levit predict's tensors, exactly
    again = lane.stack([pre.pixels(b) for b in photos[::-1]])
    assert torch.equal(again, torch.stack([pre(b) for b in photos[::-1]])) and again.data_ptr() == first.data_ptr()


def test_lanes_compute_batches_at_once_each_on_its_own_backend(files, monkeypatch):
    """Two lanes: two copies of the backend (one thread each), two batches in flight at once, and
    every request answered by the batch it was in."""
    from levit.runtime.serve import LeViTService, ServeConfig

    made, lock = [], threading.Lock()
    state = {"active": 0, "peak": 0}

    def fake_deploy(model, **kw):
        made.append(kw["threads"])
        lane = len(made)

        def run(x):
            with lock:
                state["active"] += 1
                state["peak"] = max(state["peak"], state["active"])
            time.sleep(0.15)
            with lock:
                state["active"] -= 1
            logits = torch.zeros(x.shape[0], 10)
            logits[:, lane] = 5.0  # the answer says which lane computed it
            return logits

        return run

    fake_lanes(monkeypatch, fake_deploy)
    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    threads = torch.get_num_threads()
    try:
        svc = LeViTService(model, ServeConfig(lanes=2, max_batch_size=2, max_wait_ms=1, quiet=True), load_now=True)
        jpg = files["a.jpg"].read_bytes()

        async def eight():
            return await asyncio.gather(*(svc.classify(jpg, 1) for _ in range(8)))

        state["peak"] = 0  # the warm-up ran the lanes one after the other
        answers = asyncio.run(eight())
    finally:
        torch.set_num_threads(threads)
    assert made == [1, 1] and (svc.lanes, svc.lane_threads) == (2, 1)
    assert state["peak"] == 2, "the two lanes never computed at the same time"
    assert {a[0]["class"] for a in answers} == {1, 2}  # both lanes answered requests
    assert len(svc.batcher.free) == 2 and svc.batcher.queued == 0  # every lane given back, nothing left


def test_requests_arriving_while_every_lane_is_busy_fill_one_batch(files, monkeypatch):
    """A batch closes only for a free lane: 6 requests arriving 15 ms apart during a 0.4 s batch wait
    for the lane together and go as one batch (closing on the wait alone would queue them as 6
    batches of one)."""
    from levit.runtime.serve import LeViTService, ServeConfig

    slow = {"on": False}  # the warm-up runs fast

    def fake_deploy(model, **kw):
        def run(x):
            time.sleep(0.4 if slow["on"] else 0.001)
            return torch.zeros(x.shape[0], 10)

        return run

    fake_lanes(monkeypatch, fake_deploy)
    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    svc = LeViTService(model, ServeConfig(lanes=1, max_batch_size=8, max_wait_ms=1, quiet=True), load_now=True)
    slow["on"] = True
    sizes = []
    monkeypatch.setattr(svc.metrics, "batch_size", type("Sizes", (), {"observe": lambda self, n: sizes.append(n)})())
    jpg = files["a.jpg"].read_bytes()

    async def go():
        first = asyncio.create_task(svc.classify(jpg, 1))
        await asyncio.sleep(0.05)  # the first batch is computing
        rest = []
        for _ in range(6):
            rest.append(asyncio.create_task(svc.classify(jpg, 1)))
            await asyncio.sleep(0.015)
        await asyncio.gather(first, *rest)

    asyncio.run(go())
    assert sizes[0] == 1 and sum(sizes) == 7 and len(sizes) <= 2, sizes  # [1, 6] unless the machine stalls


def _service_with_fake_lanes(files, monkeypatch, config, seconds):
    """A service whose lanes sleep ``seconds`` a batch once it is loaded (its three warm-up batches a
    lane go at once), its batch sizes recorded in ``svc.sizes``."""
    from levit.runtime.serve import LeViTService

    pace = [0.0]

    def fake_deploy(model, **kw):
        def run(x):
            time.sleep(pace[0])
            return torch.zeros(x.shape[0], 10)

        return run

    fake_lanes(monkeypatch, fake_deploy)
    svc = LeViTService(levit.create_model("levit_tiny", checkpoint=files["model"]), config)
    load = svc.load

    def load_then_pace(*args, **kwargs):
        out = load(*args, **kwargs)
        pace[0] = seconds
        return out

    svc.load = load_then_pace
    svc.sizes = []
    monkeypatch.setattr(svc.metrics, "batch_size", type("Sizes", (), {"observe": lambda _, n: svc.sizes.append(n)})())
    return svc


def test_a_burst_goes_as_one_batch_per_free_lane_and_a_lone_request_does_not_wait(files, monkeypatch):
    """A free lane takes its batch once no request is being decoded to join it, or once the batch has
    its part of those here and on their way (levit.runtime.batcher.batch_delay): 8 requests arriving at
    once, decoded 2 at a time, go as one batch on one free lane and as two of 4 on two, not as the
    first one or two decoded then the rest; a lone request goes at once, not after --max-wait-ms."""
    from levit.runtime.serve import ServeConfig
    from levit.runtime.serve_app import Lane

    jpg = files["a.jpg"].read_bytes()
    threads = torch.get_num_threads()
    try:
        for lanes, want in ((1, [8]), (2, [4, 4])):
            config = ServeConfig(lanes=lanes, max_batch_size=8, max_wait_ms=1, decode_workers=2, quiet=True)
            svc = _service_with_fake_lanes(files, monkeypatch, config, 0.01)
            svc.load()  # the warm-up, fast
            slow = lambda x: (time.sleep(0.4), torch.zeros(x.shape[0], 10))[1]  # noqa: E731 (past the burst)
            svc.batcher.free = [Lane(slow) for _ in range(lanes)]
            decode = svc.preprocess.pixels

            def slow_decode(data, decode=decode):  # 40 ms an image: 8 take 160 ms on 2 decoding threads
                time.sleep(0.04)
                return decode(data)

            monkeypatch.setattr(svc.preprocess, "pixels", slow_decode)
            svc.batcher.per_decode_s = 0.08  # twice the sleep: the batch's wait has room on a busy machine
            svc.batcher.per_image_s = 0.1  # the slow lanes' (0.4 s a batch of 4), not the warm-up's fake ones

            async def burst(svc=svc):
                await asyncio.gather(*(svc.classify(jpg, 1) for _ in range(8)))

            asyncio.run(burst())
            assert svc.sizes == want, lanes
    finally:
        torch.set_num_threads(threads)

    lone = _service_with_fake_lanes(files, monkeypatch, ServeConfig(lanes=1, max_wait_ms=2000, quiet=True), 0.01)
    lone.load()
    t0 = time.perf_counter()
    asyncio.run(lone.classify(jpg, 1))
    assert time.perf_counter() - t0 < 1.0  # the batch did not wait its 2 s


def test_large_images_decode_apart_and_do_not_hold_up_the_others(files, monkeypatch):
    """Images over LARGE_IMAGE_PIXELS (by their header) decode on half the decoding threads and are
    not counted among the decodes a batch waits for: two of them at 0.6 s each (enough to hold both
    threads were they shared) leave the other requests a thread of their own, and those are answered
    in a fraction of one large decode."""
    from levit.runtime.serve import ServeConfig
    from levit.runtime.serve_app import LARGE_IMAGE_PIXELS, header_pixels

    buf = io.BytesIO()
    Image.new("RGB", (2100, 2000), (90, 120, 150)).save(buf, "PNG")  # 4.2 megapixels in a few KB
    large, jpg = buf.getvalue(), files["a.jpg"].read_bytes()
    assert header_pixels(large) > LARGE_IMAGE_PIXELS > header_pixels(jpg) and header_pixels(b"junk") == 0
    svc = _service_with_fake_lanes(
        files, monkeypatch, ServeConfig(lanes=1, max_wait_ms=1, decode_workers=2, quiet=True), 0.01
    )
    svc.load()
    decode = svc.preprocess.pixels

    def slow_decode(data, decode=decode):  # a large image costs 0.6 s; it is decoded as the small one
        time.sleep(0.6 if data is large else 0.02)
        return decode(jpg)

    monkeypatch.setattr(svc.preprocess, "pixels", slow_decode)

    async def go() -> float:
        big = [asyncio.ensure_future(svc.classify(large, 1)) for _ in range(2)]
        await asyncio.sleep(0.05)  # the large ones hold their thread by now
        t0 = time.perf_counter()
        await asyncio.gather(*(svc.classify(jpg, 1) for _ in range(4)))
        waited = time.perf_counter() - t0
        await asyncio.gather(*big)
        return waited

    waited = asyncio.run(go())
    assert waited < 0.4, waited  # behind the large ones on shared threads: 0.55 s and more


# ---- back-pressure and deadlines ------------------------------------------------------------------
async def _in_process(svc, requests: list[dict]) -> list[httpx.Response]:
    """Requests at once to the service's app, in-process (httpx's ASGI transport)."""
    transport = httpx.ASGITransport(app=svc.build_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://levit", timeout=30) as c:
        return await asyncio.gather(*(c.post("/v1/classify", **r) for r in requests))


def test_a_full_queue_answers_429_with_retry_after_and_holds_no_more(files, monkeypatch):
    """--max-queue 2 and a slow model: of 8 requests at once, 2 are taken and answered, the other 6
    get 429 with a Retry-After of whole seconds at once, and the batcher never held more than 2."""
    from levit.runtime.serve import ServeConfig

    config = ServeConfig(lanes=1, max_batch_size=1, max_wait_ms=1, max_queue=2, quiet=True)
    svc = _service_with_fake_lanes(files, monkeypatch, config, 0.3)
    svc.load()
    peak = []
    run = svc.batcher.run

    async def watched(lane, items):
        peak.append(svc.batcher.admitted_now)  # a queued request is an admitted one: counted once
        return await run(lane, items)

    svc.batcher.run = watched
    jpg = files["a.jpg"].read_bytes()
    t0 = time.perf_counter()
    responses = asyncio.run(_in_process(svc, [{"content": jpg}] * 8))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 2 + [429] * 6, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and "--max-queue 2" in r.json()["error"]
    assert max(peak) <= 2 and svc.batcher.admitted_now == 0 and sum(svc.sizes) == 2
    assert time.perf_counter() - t0 < 5


def test_a_request_past_its_deadline_gets_504_and_is_never_computed(files, monkeypatch):
    """X-Request-Timeout-Ms (or ?timeout_ms=): a request queued behind a slow batch gets 504 when its
    deadline passes, without waiting for the lane, and its image never reaches a batch."""
    from levit.runtime.serve import ServeConfig

    svc = _service_with_fake_lanes(files, monkeypatch, ServeConfig(lanes=1, max_wait_ms=1, quiet=True), 0.6)
    svc.load()
    svc.sizes.clear()
    jpg = files["a.jpg"].read_bytes()

    async def go():
        transport = httpx.ASGITransport(app=svc.build_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://levit", timeout=30) as c:
            first = asyncio.ensure_future(c.post("/v1/classify", content=jpg))
            await asyncio.sleep(0.1)  # the first computes for 0.6 s
            t0 = time.perf_counter()
            late = await c.post("/v1/classify", content=jpg, headers={"x-request-timeout-ms": "150"})
            waited = time.perf_counter() - t0
            also = await c.post("/v1/classify?timeout_ms=100", content=jpg)
            bad = await c.post("/v1/classify?timeout_ms=soon", content=jpg)
            return (await first), late, waited, also, bad

    first, late, waited, also, bad = asyncio.run(go())
    assert first.status_code == 200
    assert "deadline of 150 ms" in _error_line(late, 504) and waited < 0.5
    assert also.status_code == 504
    assert "timeout_ms" in _error_line(bad, 400)
    assert svc.sizes == [1]  # only the first image was computed
    assert svc.batcher.queued == 0 and svc.batcher.admitted_now == 0


def test_a_client_gone_before_its_answer_is_never_computed(files, monkeypatch):
    """A client that disconnects while its image waits for a lane leaves the queue: its image never
    reaches a batch (the ASGI app is driven by hand: the body, then the disconnect)."""
    from levit.runtime.serve import ServeConfig

    svc = _service_with_fake_lanes(files, monkeypatch, ServeConfig(lanes=1, max_wait_ms=1, quiet=True), 0.5)
    svc.load()
    svc.sizes.clear()
    app = svc.build_app()
    jpg = files["a.jpg"].read_bytes()

    async def leaving_client() -> list[int]:
        messages = [{"type": "http.request", "body": jpg, "more_body": False}]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/classify",
            "raw_path": b"/v1/classify",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"image/jpeg")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        statuses = []

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.1)  # queued behind the first batch by now
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        first = asyncio.ensure_future(svc.classify(jpg, 1))
        await asyncio.sleep(0.05)
        await app(scope, receive, send)
        await first
        return statuses

    assert asyncio.run(leaving_client()) == [499]
    assert svc.sizes == [1] and svc.batcher.queued == 0 and svc.in_flight == 0


def test_a_serving_process_freezes_its_heap_once_the_model_is_loaded(files, monkeypatch):
    """A process that only serves (run_server, a Ray replica) moves what start-up made out of the
    garbage collector's reach (gc.freeze), once the model is loaded: full collections then stop
    pausing the event loop for a quarter of a second. A LeViTService used as a library leaves the
    caller's collector alone."""
    import gc

    from levit.runtime.serve import ServeConfig

    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(svc.ready))
    for own in (False, True):
        svc = _service_with_fake_lanes(files, monkeypatch, ServeConfig(lanes=1, quiet=True), 0.0)
        svc.own_process = own
        svc._load_logged()
        assert svc.ready
    assert frozen == [True]  # once, by the serving process, after the model was loaded


# ---- bad input -----------------------------------------------------------------------------------
def _error_line(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_not_an_image_truncated_and_empty_are_400(server, files):
    jpg = files["e.jpg"].read_bytes()
    assert "not an image" in _error_line(post(server.url, b"GIF89a? no, plain text"), 400)
    assert "truncated" in _error_line(post(server.url, jpg[: len(jpg) // 3]), 400)
    assert "empty" in _error_line(post(server.url, b""), 400)
    assert "topk" in _error_line(post(server.url + "", jpg, params={"topk": "zero"}), 400)
    r = HTTP.post(server.url + "/v1/classify", files={"text": (None, "no file here")})
    assert "without a file" in _error_line(r, 400)


def test_unsupported_media_type_is_415(server, files):
    msg = _error_line(post(server.url, files["a.jpg"].read_bytes(), "application/json"), 415)
    assert "image/jpeg" in msg and "multipart/form-data" in msg


def test_body_over_the_limit_is_413(server):
    big = os.urandom(1_500_000)  # --max-body-mb 1
    assert "--max-body-mb" in _error_line(post(server.url, big), 413)

    def chunked():  # no content-length: refused while streaming
        for _ in range(4):
            yield big[:400_000]

    assert "--max-body-mb" in _error_line(post(server.url, chunked()), 413)


def test_decompression_bomb_is_refused_before_decoding(server, files, expected):
    """Both PNGs fit under --max-body-mb; the header says how many pixels they would decode to: a
    30000x30000 (Pillow's own bomb guard) and a 3000x3000 (over --max-megapixels 2) are refused."""
    for name, words in (("bomb.png", "too large"), ("big.png", "over the limit of 2,000,000")):
        data = files[name].read_bytes()
        assert len(data) < 1_000_000
        assert words in _error_line(post(server.url, data, "image/png"), 400)
    assert_same(post(server.url, files["a.jpg"].read_bytes()).json()["top"], expected["a.jpg"])


def _raw_request(url: str, body_sent: bytes, declared: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\nContent-Length: {declared}\r\n\r\n"
    )
    s.sendall(head.encode() + body_sent)
    return s


def test_slow_client_gets_408_and_disconnects_leave_nothing_stuck(server, files, expected):
    jpg = files["a.jpg"].read_bytes()
    slow = _raw_request(server.url, jpg[:100], len(jpg))  # then silence: --read-timeout 3
    gone = [_raw_request(server.url, jpg[:200], len(jpg)) for _ in range(3)]
    for s in gone:  # clients that vanish mid-upload
        s.close()
    t0 = time.monotonic()
    reply = slow.recv(4096).decode()
    slow.close()
    assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 10
    assert_same(post(server.url, jpg).json()["top"], expected["a.jpg"])
    end = time.monotonic() + 5
    while metric(server.url, "levit_in_flight") != 0 and time.monotonic() < end:
        time.sleep(0.1)
    assert metric(server.url, "levit_in_flight") == 0
    assert metric(server.url, "levit_requests_total", {"route": "/v1/classify", "status": "499"}) == 3


def _raw_reply(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_request_head_over_the_limit_gets_431_and_its_connection_closes(server, files, expected):
    """--max-header-kb 8: a 20 KB header block gets 431 with a JSON error and the connection closes; a
    head just under the limit is served."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        reply = _raw_reply(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert b"--max-header-kb" in reply and b'{"error"' in reply
    r = HTTP.post(
        server.url + "/v1/classify",
        content=files["a.jpg"].read_bytes(),
        headers={"content-type": "image/jpeg", "x-fill": "b" * 7000},
        timeout=30,
    )
    assert_same(r.json()["top"], expected["a.jpg"])


def test_slow_request_heads_and_silent_connections_are_closed(server):
    """--header-timeout 2: a client trickling its headers, and one that connects and sends nothing, are
    answered 408 and disconnected within the timeout, not held open."""
    host, port = server.url.removeprefix("http://").split(":")
    trickle = socket.create_connection((host, int(port)), timeout=10)
    silent = socket.create_connection((host, int(port)), timeout=10)
    t0 = time.monotonic()
    trickle.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # a header line now and then, never the blank line that ends the head
        time.sleep(0.5)
        trickle.sendall(b"X-Slow: 1\r\n")
    replies = [_raw_reply(s) for s in (trickle, silent)]
    took = time.monotonic() - t0
    trickle.close()
    silent.close()
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 408") and b"--header-timeout" in reply, reply[:200]
    assert took < 6
    assert HTTP.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_the_request_head_limits_hold_with_either_http_parser(parser):
    """The server runs uvicorn's httptools protocol where httptools is installed and its h11 one
    otherwise; both get the head limits: 431 for a head over the limit (also when it arrives in
    pieces), 408 for a head not in within the header timeout (a silent connection, and the second
    request of a kept-alive one), a JSON 400 for bytes that are not HTTP, a head under the limit served."""
    import uvicorn

    from levit.runtime.serve_process import _protocol_class, listen

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    cls = _protocol_class(8192, 1.0, parser)
    assert f"uvicorn.protocols.http.{parser}_impl" in {b.__module__ for b in cls.__mro__}
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=cls, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        connect = lambda: socket.create_connection(("127.0.0.1", port), timeout=10)  # noqa: E731
        silent, kept = connect(), connect()
        t0 = time.monotonic()
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"ok"):
            first += kept.recv(1024)
        assert first.startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the next head, never finished
        with connect() as big:
            big.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):  # 12 KB in three pieces, none over the limit alone; then nothing more,
                big.sendall(b"X-Big: " + b"a" * 4000 + b"\r\n")  # so that the server's close is no reset
                time.sleep(0.05)
            assert _raw_reply(big).startswith(b"HTTP/1.1 431")
        with connect() as under:
            under.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"b" * 7000 + b"\r\nConnection: close\r\n\r\n")
            assert _raw_reply(under).startswith(b"HTTP/1.1 200")
        with connect() as junk:
            junk.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            reply = _raw_reply(junk)
            assert reply.startswith(b"HTTP/1.1 400") and b'{"error": ' in reply, reply
        for s in (silent, kept):
            reply = _raw_reply(s)
            assert reply.startswith(b"HTTP/1.1 408") and b"--header-timeout" in reply, reply
            s.close()
        assert time.monotonic() - t0 < 3
    finally:
        server.should_exit = True
        thread.join(10)


def test_access_log_has_one_line_per_request_and_no_traceback(server, files):
    marker = f"topk=2&probe={time.monotonic_ns()}"
    post(server.url + "", files["a.jpg"].read_bytes(), params=dict(p.split("=") for p in marker.split("&")))
    post(server.url, b"junk", params={"probe": "bad"})
    time.sleep(0.2)
    log = server.log.read_text()
    assert len(re.findall(rf'"POST /v1/classify\?{re.escape(marker)}" 200 [\d.]+ms', log)) == 1
    assert re.search(r'"POST /v1/classify\?probe=bad" 400', log)
    assert "Traceback" not in log


def test_access_log_off_with_quiet_in_process(files, caplog):
    """The application in-process (httpx's ASGI transport): one access record per request, none with quiet."""
    from levit.runtime.serve import LeViTService, ServeConfig

    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    jpg = files["a.jpg"].read_bytes()

    async def two_requests(quiet: bool) -> list[int]:
        service = LeViTService(model, ServeConfig(backend="eager", quiet=quiet, max_wait_ms=1), load_now=True)
        transport = httpx.ASGITransport(app=service.build_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return [(await c.post("/v1/classify", content=b)).status_code for b in (jpg, b"junk")]

    for quiet in (False, True):
        caplog.clear()
        with caplog.at_level("INFO", logger="levit.serve.access"):
            assert asyncio.run(two_requests(quiet)) == [200, 400]
        lines = [r.getMessage() for r in caplog.records if r.name == "levit.serve.access"]
        assert len(lines) == (0 if quiet else 2), lines


def test_while_the_model_loads_requests_get_503_with_retry_after(files):
    """Before the model is ready, a classify request (v1, v2 and TorchServe's), its gRPC twin's call,
    /ready and /ping get 503 with Retry-After: 1, so that clients poll instead of retrying at once;
    /health answers 200."""
    from levit.runtime.serve import LeViTService, ServeConfig
    from levit.runtime.serve_http import ClientError

    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    service = LeViTService(model, ServeConfig(backend="eager", quiet=True), load_now=False)
    jpg = files["a.jpg"].read_bytes()

    async def go() -> list:
        transport = httpx.ASGITransport(app=service.build_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return [
                await c.post("/v1/classify", content=jpg, headers={"content-type": "image/jpeg"}),
                await c.post("/v2/models/levit_tiny/infer", json={"inputs": []}),
                await c.put("/predictions/levit_tiny", content=jpg),
                await c.get("/ready"),
                await c.get("/ping"),
                await c.get("/health"),
            ]

    *refused, health = asyncio.run(go())
    for r in refused:
        assert r.status_code == 503 and r.headers["retry-after"] == "1", (r.request.url, r.headers)
        assert "loading" in r.json()["error"]
    assert health.status_code == 200
    with pytest.raises(ClientError) as e:
        asyncio.run(service.infer_images([jpg], 1))
    assert e.value.status == 503 and e.value.retry_after == 1


# ---- the Open Inference Protocol (KServe v2) ----------------------------------------------------------
def test_v2_health_server_and_model_metadata(server):
    assert HTTP.get(server.url + "/v2/health/live").json() == {"live": True}
    assert HTTP.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert HTTP.get(server.url + "/v2").json()["name"] == "levit"
    meta = HTTP.get(server.url + "/v2/models/levit_tiny").json()
    assert meta["name"] == "levit_tiny" and meta["inputs"][0]["datatype"] == "BYTES"
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"class": "INT64", "label": "BYTES", "prob": "FP32"}
    assert HTTP.get(server.url + "/v2/models/levit_tiny/versions/1/ready").json() == {
        "name": "levit_tiny",
        "ready": True,
    }


def test_v2_model_config_is_what_perf_analyzer_reads(server, files, expected):
    """Triton's model configuration extension, read by tritonclient over HTTP and gRPC as Triton's
    perf_analyzer reads it (benchmarks/perf_analyzer.py drives the server with it): a batching model
    whose one input is an encoded image per batch item, sent as shape [N, 1]; ``max_batch_size`` is the
    most images the server takes in one request."""
    http = pytest.importorskip("tritonclient.http", reason="the KServe v2 round trip needs tritonclient[http]")
    grpc = pytest.importorskip("tritonclient.grpc", reason="the KServe v2 gRPC round trip needs tritonclient")
    port = re.search(r"KServe v2 gRPC on 127\.0\.0\.1:(\d+)", server.log.read_text()).group(1)
    hc = http.InferenceServerClient(url=server.url.removeprefix("http://"))
    gc_ = grpc.InferenceServerClient(url=f"{HOST}:{port}")
    try:
        config = hc.get_model_config("levit_tiny")
        assert gc_.get_model_config("levit_tiny", as_json=True)["config"] == {
            "name": "levit_tiny",
            "platform": "levit",
            "backend": "levit",
            "max_batch_size": config["max_batch_size"],
            "input": [{"name": "image", "data_type": "TYPE_STRING", "dims": ["1"]}],
            "output": [{"name": n, "data_type": t, "dims": ["-1"]} for n, t in CONFIG_OUTPUTS],
            "dynamic_batching": {"preferred_batch_size": [8], "max_queue_delay_microseconds": str(MAX_WAIT_MS * 1000)},
        }
        assert config["input"] == [{"name": "image", "data_type": "TYPE_STRING", "dims": [1]}]
        assert hc.get_model_metadata("levit_tiny")["inputs"][0]["shape"] == [-1, 1]
        # a batch of [N, 1], as perf_analyzer sends it, answered as levit predict answers
        tensor = http.InferInput("image", [2, 1], "BYTES")
        tensor.set_data_from_numpy(
            np.array([[files["a.jpg"].read_bytes()], [files["b.png"].read_bytes()]], dtype=object)
        )
        got = hc.infer("levit_tiny", [tensor], parameters={"topk": 3}).as_numpy("class")
        assert got.tolist() == [[t["class"] for t in expected[n]] for n in ("a.jpg", "b.png")]
        # max_batch_size images in one request are taken, one more is refused before any is decoded
        n = config["max_batch_size"]
        v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n + 1], "data": ["eA=="] * (n + 1)}]}
        r = HTTP.post(server.url + "/v2/models/levit_tiny/infer", json=v2, timeout=30)
        assert f"{n + 1} images in one request: at most {n}" in _error_line(r, 400)
        with pytest.raises(Exception, match="unknown model"):
            gc_.get_model_config("resnet")
    finally:
        hc.close()
        gc_.close()


CONFIG_OUTPUTS = [("class", "TYPE_INT64"), ("label", "TYPE_STRING"), ("prob", "TYPE_FP32")]


def test_v2_infer_with_tritonclient_equals_predict(server, files, expected):
    """tritonclient's HTTP client (the binary tensor extension both ways, and JSON outputs): a batch of
    images in one request, each answer equal to levit predict's on the same checkpoint."""
    http = pytest.importorskip("tritonclient.http", reason="the KServe v2 round trip needs tritonclient[http]")
    names = ["a.jpg", "b.png", "c.webp", "d16.png"]
    images = np.array([files[n].read_bytes() for n in names], dtype=object)
    client = http.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("levit_tiny")
        tensor = http.InferInput("image", [len(names)], "BYTES")
        tensor.set_data_from_numpy(images, binary_data=True)
        for binary in (True, False):
            outputs = [http.InferRequestedOutput(n, binary_data=binary) for n in ("class", "label", "prob")]
            result = client.infer("levit_tiny", [tensor], outputs=outputs, parameters={"topk": 3})
            classes, labels, probs = (result.as_numpy(n) for n in ("class", "label", "prob"))
            assert classes.shape == labels.shape == probs.shape == (len(names), 3)
            for i, name in enumerate(names):
                top = [
                    {"class": int(c), "label": lab.decode() if isinstance(lab, bytes) else str(lab), "prob": float(p)}
                    for c, lab, p in zip(classes[i], labels[i], probs[i], strict=True)
                ]
                assert_same(top, expected[name])
        result = client.infer("levit_tiny", [tensor])  # no outputs named: all of them, binary
        assert result.as_numpy("class")[0].tolist() == [t["class"] for t in expected["a.jpg"]]
    finally:
        client.close()


def test_v2_infer_in_json_and_its_errors(server, files, expected):
    import base64

    url = server.url + "/v2/models/levit_tiny/infer"
    jpg = files["a.jpg"].read_bytes()
    request = {
        "id": "r1",
        "parameters": {"topk": 2},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpg).decode()]}],
    }
    body = HTTP.post(url, json=request, timeout=30).json()
    assert body["id"] == "r1" and body["model_name"] == "levit_tiny"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["class"]["shape"] == [1, 2] and out["class"]["data"] == [t["class"] for t in expected["a.jpg"][:2]]
    assert out["label"]["data"] == [t["label"] for t in expected["a.jpg"][:2]]
    bad = {**request, "inputs": [{**request["inputs"][0], "data": [base64.b64encode(b"junk").decode()]}]}
    assert "not an image" in _error_line(HTTP.post(url, json=bad, timeout=30), 400)
    assert "BYTES" in _error_line(HTTP.post(url, json={"inputs": [{"datatype": "FP32", "shape": [1]}]}), 400)
    assert "KServe v2" in _error_line(HTTP.post(url, content=b"{not json"), 400)
    assert "unknown model 'resnet'" in _error_line(HTTP.post(server.url + "/v2/models/resnet/infer", json=request), 404)
    assert "version" in _error_line(HTTP.get(server.url + "/v2/models/levit_tiny/versions/7"), 404)


def test_v2_grpc_with_tritonclient_equals_predict(server, files, expected):
    """KServe v2 over gRPC (--grpc-port), with tritonclient's gRPC client: health, metadata, and a batch
    of images whose answers equal levit predict's; another model's name or another version is
    NOT_FOUND, the version serving named is answered, a bad image INVALID_ARGUMENT with the HTTP
    route's message."""
    grpc = pytest.importorskip("tritonclient.grpc", reason="the KServe v2 gRPC round trip needs tritonclient")
    from tritonclient.utils import InferenceServerException

    port = re.search(r"KServe v2 gRPC on 127\.0\.0\.1:(\d+)", server.log.read_text()).group(1)
    client = grpc.InferenceServerClient(url=f"{HOST}:{port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("levit_tiny")
        meta = client.get_model_metadata("levit_tiny")
        assert [o.name for o in meta.outputs] == ["class", "label", "prob"]
        names = ["a.jpg", "b.png", "c.webp", "d16.png"]
        tensor = grpc.InferInput("image", [len(names)], "BYTES")
        tensor.set_data_from_numpy(np.array([files[n].read_bytes() for n in names], dtype=object))
        result = client.infer("levit_tiny", [tensor], parameters={"topk": 3})
        classes, labels, probs = (result.as_numpy(n) for n in ("class", "label", "prob"))
        for i, name in enumerate(names):
            top = [
                {"class": int(c), "label": lab.decode(), "prob": float(p)}
                for c, lab, p in zip(classes[i], labels[i], probs[i], strict=True)
            ]
            assert_same(top, expected[name])
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("resnet", [tensor])
        with pytest.raises(InferenceServerException, match="unknown version '99'") as e:
            client.infer("levit_tiny", [tensor], model_version="99")
        assert "NOT_FOUND" in str(e.value.status())
        serving = client.get_model_metadata("levit_tiny").versions[0]
        assert client.infer("levit_tiny", [tensor], model_version=serving).get_response().model_version == serving
        junk = grpc.InferInput("image", [1], "BYTES")
        junk.set_data_from_numpy(np.array([b"junk"], dtype=object))
        with pytest.raises(InferenceServerException, match="not an image") as e:
            client.infer("levit_tiny", [junk])
        assert "INVALID_ARGUMENT" in str(e.value.status())
    finally:
        client.close()


def test_v2_grpc_streaming_answers_each_request_on_the_stream(server, files, expected):
    """Triton's streaming RPC (ModelStreamInfer) with tritonclient's stream API: every request sent on
    one stream is answered on it, by id, as levit predict answers; a bad image or an unknown model is
    an answer carrying the HTTP route's message, and the stream goes on serving; a client that cancels
    its stream with requests in flight leaves the server answering."""
    grpc_client = pytest.importorskip("tritonclient.grpc", reason="the KServe v2 gRPC round trip needs tritonclient")
    import queue

    port = re.search(r"KServe v2 gRPC on 127\.0\.0\.1:(\d+)", server.log.read_text()).group(1)
    client = grpc_client.InferenceServerClient(url=f"{HOST}:{port}")
    answers: queue.Queue = queue.Queue()

    def send(model: str, data: bytes, rid: str) -> None:
        tensor = grpc_client.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        client.async_stream_infer(model, [tensor], request_id=rid, parameters={"topk": 3})

    names = ["a.jpg", "b.png", "c.webp", "d16.png"]
    logged = len(server.log.read_text())
    try:
        serving = client.get_model_metadata("levit_tiny").versions[0]
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        # each image 4 times: a batch's answers are ready together and written one after the other
        for k in range(4):
            for name in names:
                send("levit_tiny", files[name].read_bytes(), f"{name}#{k}")
            if k == 1:  # two refusals halfway, on the same stream
                send("levit_tiny", b"junk", "junk")
                send("resnet", files["a.jpg"].read_bytes(), "resnet")
        got, errors = {}, []
        for _ in range(4 * len(names) + 2):
            result, error = answers.get(timeout=60)
            if error is not None:
                errors.append(str(error))
                continue
            response = result.get_response()
            classes, labels, probs = (result.as_numpy(n)[0] for n in ("class", "label", "prob"))
            got[response.id] = [
                {"class": int(c), "label": lab.decode(), "prob": float(p)}
                for c, lab, p in zip(classes, labels, probs, strict=True)
            ]
            assert response.model_version == serving
        client.stop_stream()
        assert sorted(got) == sorted(f"{name}#{k}" for name in names for k in range(4))
        for rid, top in got.items():
            assert_same(top, expected[rid.split("#")[0]])
        assert len(errors) == 2 and any("not an image" in e for e in errors), errors
        assert any("unknown model 'resnet'" in e for e in errors), errors
        # a stream cancelled with its requests in flight: the server goes on answering
        client.start_stream(callback=lambda result, error: None)
        for i in range(4):
            send("levit_tiny", files["a.jpg"].read_bytes(), f"gone-{i}")
        client.stop_stream(cancel_requests=True)
        tensor = grpc_client.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([files["b.png"].read_bytes()], dtype=object))
        assert client.infer("levit_tiny", [tensor]).as_numpy("class")[0][0] == expected["b.png"][0]["class"]
    finally:
        client.close()
    assert "Traceback" not in server.log.read_text()[logged:]


def _b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def test_unknown_routes_and_methods_answer_json_errors(server):
    assert "Not Found" in _error_line(HTTP.get(server.url + "/nowhere"), 404)
    r = HTTP.get(server.url + "/v2/models/levit_tiny/infer")
    assert "Method Not Allowed" in _error_line(r, 405) and r.headers["allow"] == "POST"
    assert _error_line(HTTP.get(server.url + "/v1/classify"), 405)


# ---- the command line ------------------------------------------------------------------------------
def test_cli_usage_errors_are_one_line(capsys, files):
    assert main(["serve", "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--max-queue", "0"]) == 2
    assert "--max-queue must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--ray", "--grpc-port", "0"]) == 2
    assert "--grpc-port serves from one process: not with --ray" in capsys.readouterr().err
    assert main(["serve", "--crop-pct", "1.5"]) == 2
    assert "--crop-pct" in capsys.readouterr().err
    assert main(["serve", "--precision", "int8"]) == 2
    assert "--precision int8 needs --calibration" in capsys.readouterr().err
    assert main(["serve", "--model", "levit_128s", "--model", "levit_192"]) == 2
    assert "one model name at most" in capsys.readouterr().err
    assert main(["serve", "--model", f"a={files['model']}", "--model", f"a={files['model']}"]) == 2
    assert "each NAME once" in capsys.readouterr().err
    assert main(["serve", "--model", "=x"]) == 2
    assert "expected NAME=CHECKPOINT" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(files["model"]), "--host", HOST, "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on {HOST}:{port}" in err[0]
    with socket.socket() as taken:  # the gRPC port too, before the model loads, naming its flag
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = ["serve", "--checkpoint", str(files["model"]), "--host", HOST, "--port", "0", "--grpc-port", str(port)]
        assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on {HOST}:{port} (--grpc-port): Address already in use" in err[0], err
    if importlib.util.find_spec("ray.serve") is not None:  # and before a new local Ray cluster starts
        with socket.socket() as taken:
            taken.bind((HOST, 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            assert (
                main(["serve", "--checkpoint", str(files["model"]), "--host", HOST, "--port", str(port), "--ray"]) == 1
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cannot listen on {HOST}:{port} (--host/--port)" in err[0], err


def test_a_ray_clusters_proxy_that_cannot_bind_the_port_is_one_line(monkeypatch):
    """On a cluster levit joins (--ray ADDRESS) Ray Serve's proxy binds the port on a node of its own:
    its failure (a Ray task error around the proxy's RuntimeError, as Ray Serve raises it) is one
    line naming the port and the flag."""
    ray = pytest.importorskip("ray.serve", reason="levit serve --ray needs Ray Serve: pip install 'levit[serve]'")
    from ray.exceptions import RayTaskError

    from levit.errors import LeViTError
    from levit.runtime.serve import ServeConfig
    from levit.runtime.serve_ray import run_deployment

    def proxy_fails(**kwargs):
        raise RayTaskError("ProxyActor.ready", "", RuntimeError(f"Failed to bind to address '{HOST}:9'."))

    monkeypatch.setattr(ray, "start", proxy_fails)
    config = ServeConfig(host=HOST, port=9)
    with pytest.raises(LeViTError, match=rf"^Ray Serve cannot listen on {HOST}:9 \(--host/--port\): Failed to bind"):
        run_deployment(torch.nn.Identity(), config)


def test_a_second_grpc_server_cannot_take_the_port_of_the_first():
    """The gRPC port is one server's alone, as the HTTP port is: with gRPC's default (SO_REUSEPORT) a
    second `levit serve --grpc-port` on the same port would start, and the kernel would split the
    clients between the old server and the new one."""
    pytest.importorskip("grpc", reason="--grpc-port needs the serve extra: pip install 'levit[serve]'")
    from levit.runtime.serve_grpc import start_grpc

    service = SimpleNamespace(config=SimpleNamespace(max_body_mb=1.0))

    async def two_servers() -> None:
        first, port = await start_grpc(service, HOST, 0)
        try:
            with pytest.raises(RuntimeError, match=f"cannot listen on {HOST}:{port}"):
                await start_grpc(service, HOST, port)
        finally:
            await first.stop(None)

    asyncio.run(two_servers())


def _grpc_service(infer_images) -> SimpleNamespace:
    """What start_grpc and its servicer read of a LeViTService, with ``infer_images`` as its model
    and a queue bound of 3."""
    return SimpleNamespace(config=SimpleNamespace(max_body_mb=1.0, topk=5), max_queue=3, infer_images=infer_images)


def _infer_request(data: bytes, rid: str = ""):
    """A ModelInferRequest of one encoded image for levit_tiny."""
    from levit.runtime.serve_grpc import messages

    r = messages()["ModelInferRequest"](model_name="levit_tiny", id=rid)
    r.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(data)
    return r


def test_a_stream_is_read_no_further_than_the_queue_bound_and_its_client_leaving_cancels_its_requests():
    """A client that sends on its ModelStreamInfer stream faster than it is answered gets no more than
    ``max_queue`` requests read (past that gRPC's flow control holds it back, so its requests cannot
    pile up in the server's memory); when it cancels the stream, its requests still waiting are
    cancelled, so nothing more is computed for it."""
    grpc = pytest.importorskip("grpc", reason="--grpc-port needs the serve extra: pip install 'levit[serve]'")
    from levit.runtime.serve_grpc import SERVICE, messages, start_grpc

    m, started, cancelled = messages(), [], []

    async def infer_images(images, topk, deadline, *, model, label):  # a model that never answers
        started.append(images)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(images)
            raise

    service, request = _grpc_service(infer_images), _infer_request(b"image")

    async def flood() -> None:
        server, port = await start_grpc(service, HOST, 0)
        try:
            async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
                call = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer", m["ModelInferRequest"].SerializeToString)()
                for _ in range(10):  # small messages: gRPC's buffers take them all without reading
                    await call.write(request)
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if len(started) >= 3:
                        break
                await asyncio.sleep(0.2)  # time for a fourth one to be read, were the bound broken
                assert len(started) == 3
                call.cancel()
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if len(cancelled) == 3:
                        break
                assert len(cancelled) == 3
        finally:
            await server.stop(None)

    asyncio.run(flood())


def test_a_fault_in_one_streamed_request_is_its_answer_alone(caplog):
    """A request whose computation fails (not a refusal: a fault) is answered on its stream with a
    message that keeps the fault's details in the server's log, and the stream's other requests are
    answered as usual."""
    grpc = pytest.importorskip("grpc", reason="--grpc-port needs the serve extra: pip install 'levit[serve]'")
    from levit.runtime.serve_grpc import SERVICE, messages, start_grpc

    m = messages()

    async def infer_images(images, topk, deadline, *, model, label):
        if images == [b"boom"]:
            raise RuntimeError("secret detail")
        return [[{"class": 7, "label": "seven", "prob": 0.5}]], "1"

    service = _grpc_service(infer_images)

    async def stream() -> list:
        server, port = await start_grpc(service, HOST, 0)
        try:
            async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
                call = channel.stream_stream(
                    f"/{SERVICE}/ModelStreamInfer",
                    m["ModelInferRequest"].SerializeToString,
                    m["ModelStreamInferResponse"].FromString,
                )(iter([_infer_request(b"a", "a"), _infer_request(b"boom", "boom"), _infer_request(b"b", "b")]))
                return [answer async for answer in call]
        finally:
            await server.stop(None)

    answers = {a.infer_response.id: a for a in asyncio.run(stream())}
    assert sorted(answers) == ["a", "b", "boom"]
    assert answers["boom"].error_message == "internal error (the server's log has the details)"
    assert "secret detail" in caplog.text
    for rid in ("a", "b"):
        assert not answers[rid].error_message and answers[rid].infer_response.model_version == "1"


def test_cli_names_the_missing_extra(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["levit serve: error: levit serve needs fastapi: pip install 'levit[serve]'"]


def test_demo_model_is_trained_once_then_read_from_the_cache(files, monkeypatch, tmp_path):
    """With no model named, the digits demo model comes from the user's cache when it is there."""
    import shutil

    import levit.train.run
    from levit.train import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = demo.digits_model_path()
    assert path.is_relative_to(tmp_path / "levit" / "serve")
    path.parent.mkdir(parents=True)
    shutil.copy(files["model"], path)
    monkeypatch.setattr(levit.train.run, "train", lambda *a, **k: pytest.fail("trained although cached"))
    model = demo.digits_model(on_note=lambda line: pytest.fail(f"announced a training: {line}"))
    want = levit.create_model("levit_tiny", checkpoint=files["model"]).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_demo_model_is_trained_when_missing_and_keeps_its_validation_crop(files, monkeypatch, tmp_path):
    """A missing demo model is trained by the recipe (here a stand-in returns a model), saved with the
    crop the recipe validates at (which the run sets on its model), and read back; the caller's torch thread count is left as it was."""
    import levit.train.run
    from levit.train import demo
    from levit.train.recipe import resolve_config

    trained, threads = [], torch.get_num_threads()

    def fake_train(cfg):
        trained.append(cfg.epochs)
        torch.set_num_threads(1)  # as the recipe does
        model = randomize_weights(levit.create_model("levit_tiny", img_size=32), seed=2)
        model.pretrained_cfg["crop_pct"] = cfg.eval_crop_pct  # as a run sets it (tests/test_train.py)
        return type("Result", (), {"model": model})()

    monkeypatch.setattr(levit.train.run, "train", fake_train)
    notes = []
    model = demo.digits_model(tmp_path / "demo.safetensors", on_note=notes.append)
    assert trained == [demo.DIGITS_EPOCHS] and len(notes) == 1 and (tmp_path / "demo.safetensors").is_file()
    assert torch.get_num_threads() == threads
    recipe = resolve_config(config="digits", output=str(tmp_path / "run"))
    assert recipe.eval_crop_pct != levit.create_model("levit_tiny").pretrained_cfg["crop_pct"]  # the check can bite
    assert model.pretrained_cfg["crop_pct"] == recipe.eval_crop_pct


# ---- versions: hot reload -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def versions(files) -> dict[int, Path]:
    """Checkpoints of versions 2 and 3 of the test model: other weights, so an answer names its version."""
    out = {1: files["model"]}
    for v in (2, 3):
        model = randomize_weights(levit.create_model("levit_tiny", img_size=32), seed=10 + v)
        model.pretrained_cfg.update(PREPROCESS)
        out[v] = files["model"].with_name(f"tiny-v{v}.safetensors")
        levit.save(model, out[v])
    return out


def test_reload_under_load_answers_every_request_from_a_version_loaded_when_it_arrived(files, versions, monkeypatch):
    """Versions 2 then 3 loaded through POST /v2/repository/models/{name}/load while requests keep
    arriving on slow lanes: no request fails, each answer names the version that computed it, that
    version was serving when the request arrived (or later: never earlier than the one the client saw),
    and the answer is that version's own; requests taken before a swap finish on the old version,
    whose batcher is then closed."""
    import levit.runtime.deploy as deploy_mod
    from levit.runtime.serve import LeViTService, ServeConfig

    real, delay = deploy_mod.deploy, {"s": 0.0}

    def slow_deploy(model, **kw):
        run = real(model, **kw)
        return lambda x: (time.sleep(delay["s"]), run(x))[1]

    fake_lanes(monkeypatch, slow_deploy)
    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    config = ServeConfig(backend="eager", lanes=1, threads=1, max_batch_size=4, max_queue=64, topk=3, quiet=True)
    svc = LeViTService(model, config.replace(checkpoint=str(files["model"])), load_now=True)
    first = svc.serving
    delay["s"] = 0.1
    want = {}
    for v, path in versions.items():
        m = levit.create_model("levit_tiny", checkpoint=path)
        want[str(v)] = predict_paths(m, [files["a.jpg"]], topk=3, batch_size=1, progress=False)[0]["top"]
    assert want["1"] != want["2"] != want["3"]
    jpg = files["a.jpg"].read_bytes()
    log = []  # (version serving when sent, response, version serving when answered)

    async def go():
        transport = httpx.ASGITransport(app=svc.build_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://levit", timeout=60) as c:
            loaded = asyncio.Event()

            async def client(start_s):
                # requests one after another until both versions are loaded, and one more after them:
                # requests keep arriving however long a model takes to load on a busy machine
                await asyncio.sleep(start_s)
                while True:
                    last = loaded.is_set()
                    seen = svc.serving.version
                    r = await c.post("/v1/classify", content=jpg, headers={"content-type": "image/jpeg"})
                    log.append((seen, r, svc.serving.version))
                    if last:
                        return
                    await asyncio.sleep(0.02)

            async def loads():
                out = []
                try:
                    for v in (2, 3):
                        await asyncio.sleep(0.3)
                        body = {"parameters": {"checkpoint": str(versions[v])}}
                        out.append(await c.post("/v2/repository/models/levit_tiny/load", json=body))
                finally:
                    loaded.set()
                return out

            clients = [client(i * 0.04) for i in range(8)]
            done = await asyncio.gather(loads(), *clients)
            await asyncio.sleep(0.3)  # the retired versions' batchers close once idle
            index = await c.post("/v2/repository/index")
            return done[0], index

    loaded, index = asyncio.run(go())
    assert [r.status_code for r in loaded] == [200, 200], [r.text for r in loaded]
    assert [r.json()["version"] for r in loaded] == ["2", "3"]
    answered = set()
    for seen, r, after in log:
        assert r.status_code == 200, r.text
        v = int(r.json()["version"])
        assert seen <= v <= after, (seen, v, after)
        assert_same(r.json()["top"], want[str(v)])
        answered.add(v)
    assert {1, 3} <= answered, answered  # 1 before the loads, 3 after them (and 2 between, but not always)
    assert any(int(r.json()["version"]) < after for _, r, after in log), "no request finished across a swap"
    assert index.json() == [{"name": "levit_tiny", "version": "3", "state": "READY"}]
    assert first.batcher is None  # version 1 retired: its lanes let go


def test_a_checkpoint_that_fails_to_load_leaves_the_old_version_serving(files, tmp_path):
    """A missing file and a file that is not a checkpoint: each load answers 400 saying why (and the log
    says it too), version 1 keeps answering, the repository index shows the failed version and its
    reason, and the metrics count the failures; with model control off, a load is 403."""
    from levit.runtime.serve import LeViTService, ServeConfig

    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    svc = LeViTService(model, ServeConfig(backend="eager", lanes=1, threads=1, topk=3, quiet=True), load_now=True)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    jpg = files["a.jpg"].read_bytes()

    async def go():
        transport = httpx.ASGITransport(app=svc.build_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://levit", timeout=60) as c:
            load = "/v2/repository/models/levit_tiny/load"
            out = {"none": await c.post(load)}  # no checkpoint: this model was not read from a file
            for name, path in (("missing", tmp_path / "nope.safetensors"), ("junk", junk)):
                out[name] = await c.post(load, json={"parameters": {"checkpoint": str(path)}})
            out["unknown"] = await c.post("/v2/repository/models/other/load")
            out["classify"] = await c.post("/v1/classify", content=jpg, headers={"content-type": "image/jpeg"})
            out["index"] = await c.post("/v2/repository/index")
            out["metrics"] = await c.get("/metrics")
            return out

    out = asyncio.run(go())
    assert "not read from a file" in _error_line(out["none"], 400)
    assert "no such checkpoint file" in _error_line(out["missing"], 400)
    err = _error_line(out["junk"], 400)
    assert str(junk) in err and "version 1 keeps serving" in err
    assert out["unknown"].status_code == 404
    assert out["classify"].status_code == 200 and out["classify"].json()["version"] == "1"
    rows = out["index"].json()
    assert rows[0] == {"name": "levit_tiny", "version": "1", "state": "READY"}
    assert rows[1]["version"] == "2" and rows[1]["state"] == "UNAVAILABLE" and str(junk) in rows[1]["reason"]
    assert 'levit_model_loads_total{model="levit_tiny",result="failed"} 3.0' in out["metrics"].text
    assert 'levit_images_total{model="levit_tiny",version="1"} 1.0' in out["metrics"].text
    off = LeViTService(model, ServeConfig(backend="eager", lanes=1, quiet=True, model_control=False))
    r = asyncio.run(_in_process_post(off, "/v2/repository/models/levit_tiny/load"))
    assert "--no-model-control" in _error_line(r, 403)


async def _in_process_post(svc, path: str, **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=svc.build_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://levit", timeout=30) as c:
        return await c.post(path, **kw)


def test_sighup_loads_the_checkpoint_again_as_the_next_version(server, files, expected):
    """SIGHUP re-reads --checkpoint: version 2 serves the same answers, named in /v1/classify, v2
    inference, model metadata, the repository index and the metrics."""
    v0 = HTTP.post(server.url + "/v2/repository/index", timeout=10).json()[0]["version"]
    server.proc.send_signal(signal.SIGHUP)
    want = str(int(v0) + 1)
    end = time.monotonic() + 30
    while HTTP.post(server.url + "/v2/repository/index", timeout=10).json()[0]["version"] != want:
        assert time.monotonic() < end, server.log.read_text()
        time.sleep(0.1)
    r = post(server.url, files["a.jpg"].read_bytes())
    assert r.json()["version"] == want
    assert_same(r.json()["top"], expected["a.jpg"])
    assert HTTP.get(server.url + "/v2/models/levit_tiny", timeout=10).json()["versions"] == [want]
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(files["b.png"])]}]}
    out = HTTP.post(f"{server.url}/v2/models/levit_tiny/versions/{want}/infer", json=v2, timeout=30).json()
    assert out["model_version"] == want
    assert metric(server.url, "levit_model_version", {"model": "levit_tiny"}) == float(want)
    assert f"version {want} serving" in server.log.read_text()


def test_several_models_each_with_its_own_lanes_versions_and_routes(files, versions):
    """Two models behind one service: the first is the default, ?model= and the v2 paths address each,
    each answers with its own weights, an unknown name is 404 naming the served ones, a new version of
    one leaves the other as it was, and the index and metrics list both."""
    from levit.runtime.serve import LeViTService, ServeConfig
    from levit.runtime.serve_models import read_named

    models = {"digits": read_named("digits", str(versions[1])), "other": read_named("other", str(versions[2]))}
    config = ServeConfig(backend="eager", lanes=1, threads=1, topk=3, quiet=True)
    svc = LeViTService(models, config.replace(checkpoints=(("other", str(versions[2])),)), load_now=True)
    want = {}
    for name, v in (("digits", 1), ("other", 2), ("other3", 3)):
        m = levit.create_model("levit_tiny", checkpoint=versions[v])
        want[name] = predict_paths(m, [files["a.jpg"]], topk=3, batch_size=1, progress=False)[0]["top"]
    jpg = files["a.jpg"].read_bytes()
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(files["a.jpg"])]}]}

    async def go():
        transport = httpx.ASGITransport(app=svc.build_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://levit", timeout=60) as c:
            img = {"content": jpg, "headers": {"content-type": "image/jpeg"}}
            out = {
                "default": await c.post("/v1/classify", **img),
                "other": await c.post("/v1/classify?model=other", **img),
            }
            out["unknown"] = await c.post("/v1/classify?model=nope", **img)
            out["v2"] = await c.post("/v2/models/other/infer", json=v2)
            out["v2 unknown"] = await c.get("/v2/models/nope")
            out["load"] = await c.post(
                "/v2/repository/models/other/load", json={"parameters": {"checkpoint": str(versions[3])}}
            )
            out["after"] = await c.post("/v1/classify?model=other", **img)
            out["default after"] = await c.post("/v1/classify", **img)
            out["index"] = await c.post("/v2/repository/index")
            out["metrics"] = await c.get("/metrics")
            return out

    out = asyncio.run(go())
    assert out["default"].json()["model"] == "digits"
    assert_same(out["default"].json()["top"], want["digits"])
    assert out["other"].json()["model"] == "other"
    assert_same(out["other"].json()["top"], want["other"])
    assert "'digits', 'other'" in _error_line(out["unknown"], 404)
    body = out["v2"].json()
    assert body["model_name"] == "other" and body["outputs"][0]["data"] == [t["class"] for t in want["other"]]
    assert out["v2 unknown"].status_code == 404
    assert out["load"].json()["version"] == "2"
    assert out["after"].json()["version"] == "2"
    assert_same(out["after"].json()["top"], want["other3"])
    assert out["default after"].json()["version"] == "1"
    assert_same(out["default after"].json()["top"], want["digits"])
    assert [(r["name"], r["version"]) for r in out["index"].json()] == [("digits", "1"), ("other", "2")]
    assert 'levit_model_version{model="other"} 2.0' in out["metrics"].text
    assert 'levit_model_version{model="digits"} 1.0' in out["metrics"].text


def test_a_busy_model_does_not_keep_another_from_the_cores(files, monkeypatch):
    """Two models on one lane's worth of cores: 12 requests queued for one, then one for the other,
    which is answered after at most the batch computing and its own, not after the 12; the two models'
    batches take turns for the cores, never computing at once."""
    from levit.runtime.serve import LeViTService, ServeConfig

    slow, lock, state = {"s": 0.0}, threading.Lock(), {"active": 0, "peak": 0}

    def fake_deploy(model, **kw):
        def run(x):
            with lock:
                state["active"] += 1
                state["peak"] = max(state["peak"], state["active"])
            time.sleep(slow["s"])
            with lock:
                state["active"] -= 1
            return torch.zeros(x.shape[0], 10)

        return run

    fake_lanes(monkeypatch, fake_deploy)
    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    config = ServeConfig(lanes=1, threads=1, max_batch_size=1, max_wait_ms=1, quiet=True)
    svc = LeViTService({"busy": model, "other": model}, config, load_now=True)
    slow["s"] = 0.1
    jpg = files["a.jpg"].read_bytes()

    async def go():
        busy = [asyncio.ensure_future(svc.classify_many([jpg], 1, svc.entries["busy"].serving)) for _ in range(12)]
        await asyncio.sleep(0.15)  # the busy model's batches are computing, one after the other
        t0 = time.perf_counter()
        await svc.classify_many([jpg], 1, svc.entries["other"].serving)
        waited = time.perf_counter() - t0
        await asyncio.gather(*busy)
        return waited

    state["peak"] = 0
    assert asyncio.run(go()) < 0.6  # at most two batches of 0.1 s (with room on a busy machine), not 12
    assert state["peak"] == 1  # one lane's worth of cores: the two models never computed at once


def test_cli_serves_several_models_named_on_the_command_line(files, versions, tmp_path, expected):
    """levit serve --model NAME=CHECKPOINT (twice): both served, the first the default; SIGHUP reads
    each file again as its next version."""
    s = Server(
        tmp_path,
        *("--model", f"first={versions[1]}", "--model", f"second={versions[2]}"),
        *("--backend", "eager", "--threads", "1", "--lanes", "1", "--topk", "3"),
    )
    try:
        assert HTTP.get(s.url + "/ready").json()["models"] == {"first": "1", "second": "1"}
        jpg = files["a.jpg"].read_bytes()
        first, second = (
            post(s.url, jpg).json(),
            HTTP.post(
                s.url + "/v1/classify?model=second", content=jpg, headers={"content-type": "image/jpeg"}, timeout=30
            ).json(),
        )
        assert first["model"] == "first" and second["model"] == "second"
        assert_same(first["top"], expected["a.jpg"])
        assert [t["class"] for t in first["top"]] != [t["class"] for t in second["top"]]
        s.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 30
        while HTTP.get(s.url + "/ready").json()["models"] != {"first": "2", "second": "2"}:
            assert time.monotonic() < end, s.log.read_text()
            time.sleep(0.1)
    finally:
        assert s.stop() == 0


# ---- Ray Serve ---------------------------------------------------------------------------------------


def test_replica_expositions_merge_with_a_replica_label():
    """Two replicas' /metrics in one exposition: each family once, each sample labelled with its replica."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from levit.runtime.serve_ray_metrics import merge_expositions

    texts = {}
    for replica, n in (("h:1", 3), ("h:2", 5)):
        r = CollectorRegistry()
        Counter("levit_requests", "requests", ["route"], registry=r).labels("/v1/classify").inc(n)
        texts[replica] = generate_latest(r).decode()
    fams = list(text_string_to_metric_families(merge_expositions(texts).decode()))
    assert [f.name for f in fams if not f.name.endswith("_created")] == ["levit_requests"]
    totals = {s.labels["replica"]: s.value for f in fams for s in f.samples if s.name == "levit_requests_total"}
    assert totals == {"h:1": 3.0, "h:2": 5.0}


def test_sighup_under_ray_deploys_the_checkpoint_again_as_the_next_version(files, versions, monkeypatch, tmp_path):
    """levit serve --ray on SIGHUP: the checkpoint read again and deployed as the next version (Ray
    Serve replaces the replicas); a file that no longer loads keeps the version serving (no Ray here:
    the deployment call is recorded)."""
    import levit.runtime.serve_ray as serve_ray
    from levit.runtime.serve import ServeConfig

    deployed = []
    monkeypatch.setattr(serve_ray, "run_deployment", lambda model, config, **kw: deployed.append((model, kw)))
    model = levit.create_model("levit_tiny", checkpoint=files["model"])
    path = tmp_path / "model.safetensors"
    path.write_bytes(versions[2].read_bytes())
    config = ServeConfig(checkpoint=str(path))
    new, version = serve_ray._roll_over(model, config, 1, replicas=2, replica_cpus=1.0)
    assert version == 2 and deployed[0][1] == {"version": 2, "replicas": 2, "replica_cpus": 1.0}
    want = levit.create_model("levit_tiny", checkpoint=versions[2]).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in new.state_dict().items())
    path.write_bytes(b"broken")
    assert serve_ray._roll_over(new, config, 2, replicas=2, replica_cpus=1.0) == (new, 2) and len(deployed) == 1


def test_a_stop_signal_while_deploying_under_ray_ends_at_once_when_the_cluster_stopped_too(monkeypatch):
    """SIGTERM to the whole process group while ``levit serve --ray`` is still deploying (its replicas
    loading): the local cluster's processes stopped with it, and Ray's deployment call would wait a
    minute for them, then abort with exit status 1. levit ends at once, exit status 0, as it does
    when the signal comes while serving (no Ray here: the cluster is a listening socket that closes)."""
    import ray

    import levit.runtime.serve_ray as serve_ray
    from levit.runtime.serve import ServeConfig

    gcs = socket.create_server(("127.0.0.1", 0))
    exited, closed_at = [], []

    class ExitedError(Exception):
        pass

    released = threading.Event()

    def fake_exit(code: int) -> None:
        exited.append((code, time.monotonic() - closed_at[0]))
        released.wait(10)  # as if the process ended here; then the watch sees run_ray finished

    def deploying(model, config, **kw) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the group's signal reaches levit ...
        gcs.close()  # ... and the cluster's processes
        closed_at.append(time.monotonic())
        end = time.monotonic() + 10  # Ray's call would wait 60 s
        while not exited and time.monotonic() < end:
            time.sleep(0.05)
        raise ExitedError

    monkeypatch.setattr(serve_ray, "init_ray", lambda *a, **kw: False)
    monkeypatch.setattr(
        ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address=f"127.0.0.1:{gcs.getsockname()[1]}")
    )
    monkeypatch.setattr(serve_ray, "run_deployment", deploying)
    monkeypatch.setattr(serve_ray.os, "_exit", fake_exit)
    monkeypatch.setattr(serve_ray.logging, "shutdown", lambda: None)
    with pytest.raises(ExitedError):
        serve_ray.run_ray(nn.Identity(), ServeConfig(quiet=True), replicas=2)
    released.set()
    assert len(exited) == 1 and exited[0][0] == 0 and exited[0][1] < 3, exited


# ---- SIGTERM (last: it stops the module's server) ---------------------------------------------------
def test_sigterm_drains_in_flight_requests_then_exits_0(server, files, expected):
    """A request uploading when SIGTERM arrives gets its answer; one arriving after gets 503 (or finds
    the port closed); the process exits 0."""
    jpg = files["a.jpg"].read_bytes()
    result = {}

    def slow_upload() -> None:
        def body():
            yield jpg[:100]
            time.sleep(1.2)  # under --read-timeout 3
            yield jpg[100:]

        result["r"] = post(server.url, body())

    t = threading.Thread(target=slow_upload)
    t.start()
    time.sleep(0.4)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        late = post(server.url, jpg).status_code
    except httpx.TransportError:
        late = "refused"
    t.join()
    assert late in (503, "refused")
    assert result["r"].status_code == 200
    assert_same(result["r"].json()["top"], expected["a.jpg"])
    assert server.proc.wait(timeout=30) == 0
    assert "SIGTERM: draining 1 in-flight request(s)" in server.log.read_text()
