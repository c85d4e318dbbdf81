"""levit.benchmark on a tiny model: well-formed rows, table, CSV/JSON, plot; the OOM-safe batch search."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from levit.benchmark import benchmark, find_max_batch, format_table, plot_rows, write_rows
from levit.errors import LeViTError

FIELDS = {
    "model", "family", "implementation", "backend", "precision", "device", "torch", "timm", "batch", "threads",
    "img_size", "img_s", "img_s_min", "img_s_max", "ms_batch", "params", "flops", "peak_mem_mb", "top1_paper",
}  # fmt: skip


@pytest.fixture(scope="module")
def rows():
    calls = []
    out = benchmark(
        ["levit_tiny", "levit_tiny"],
        batch_size=2,
        threads=1,
        img_size=64,
        warmup_s=0.0,
        windows=3,
        window_s=0.01,
        progress=lambda i, n, name, row: calls.append((i, n, name, row is None)),
    )
    assert calls == [
        (0, 2, "levit_tiny", True),
        (0, 2, "levit_tiny", False),
        (1, 2, "levit_tiny", True),
        (1, 2, "levit_tiny", False),
    ]
    return out


def test_rows_are_well_formed(rows):
    import levit

    r = rows[0]
    assert set(r) == FIELDS
    assert r["implementation"] == "levit" and r["backend"] == "eager" and r["precision"] == "fp32"
    assert r["batch"] == 2 and r["threads"] == 1 and r["img_size"] == 64
    assert r["img_s_min"] <= r["img_s"] <= r["img_s_max"] and r["img_s"] > 0
    assert r["ms_batch"] == pytest.approx(2000 / r["img_s"], rel=0.5)
    m = levit.create_model("levit_tiny", img_size=64)
    assert r["params"] == levit.count_params(m) and r["flops"] == levit.count_flops(m)
    assert r["torch"] == torch.__version__


def test_table_csv_json(rows, tmp_path):
    t = format_table(rows)
    assert "levit_tiny" in t and "img/s" in t and rows[0]["device"] in t
    back = json.loads(write_rows(rows, tmp_path / "r.json").read_text())
    assert back == rows
    with open(write_rows(rows, tmp_path / "r.csv")) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2 and set(got[0]) == FIELDS and float(got[0]["img_s"]) == pytest.approx(rows[0]["img_s"])
    with pytest.raises(LeViTError, match=r"\.csv or \.json"):
        write_rows(rows, tmp_path / "r.txt")


def test_plot(rows, tmp_path):
    pytest.importorskip("matplotlib")
    fake = [dict(r, model=f"levit_{i}", top1_paper=70.0 + i, img_s=r["img_s"] * (i + 1)) for i, r in enumerate(rows)]
    out = plot_rows(fake, tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LeViTError, match="top-1"):
        plot_rows(rows, tmp_path / "g.png")  # levit_tiny has no published accuracy


def test_timm_competitor_row():
    r = benchmark(["deit_tiny"], batch_size=1, threads=1, img_size=32, warmup_s=0, windows=1, window_s=0.0)[0]
    assert r["implementation"] == "timm" and r["family"] == "DeiT" and r["params"] > 5e6 and r["flops"] > 0


def test_unknown_model():
    with pytest.raises(LeViTError, match="unknown benchmark model"):
        benchmark(["resnet_9000"])


def test_find_max_batch_stops_at_oom():
    def try_batch(b):
        if b > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")

    assert find_max_batch(try_batch) == 16
    assert find_max_batch(lambda b: None, limit=64) == 64
    with pytest.raises(RuntimeError, match="boom"):  # other errors are not swallowed
        find_max_batch(lambda b: (_ for _ in ()).throw(RuntimeError("boom")))
