"""levit.paper.speed on a tiny model: well-formed rows, table, CSV/JSON, plot; the OOM-safe batch search."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from levit.errors import LeViTError
from levit.paper.speed import benchmark, find_max_batch, format_table, plot_rows, write_rows

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


def test_a_speed_run_resolves_the_papers_defaults_and_refuses_what_cannot_run():
    """What ``levit bench`` asks for, completed by the library: the paper's CPU protocol unless a flag
    says otherwise, and a one-line refusal (naming the flag) for what cannot run."""
    from levit.paper.speed import DEFAULT_MODELS, QUICK_MODELS, SpeedRun

    r = SpeedRun().resolved()
    assert r.models == DEFAULT_MODELS and (r.backend, r.precision, r.batch_sizes, r.threads) == (
        "eager",
        "fp32",
        (16,),
        1,
    )
    assert (r.warmup_s, r.windows, r.window_s) == (5.0, 5, 3.0) and r.resolved() == r
    q = SpeedRun(quick=True, warmup_s=0.0).resolved()
    assert q.models == QUICK_MODELS and (q.warmup_s, q.windows, q.window_s) == (0.0, 3, 1.0)  # a given 0 wins
    p = SpeedRun(models=("levit_tiny",), batch_sizes=(1, 2), img_size=64, threads=2).protocol()
    assert (p.backend, p.precision, p.device, p.img_size, p.threads, p.batch_size) == (
        "eager",
        "fp32",
        "cpu",
        64,
        2,
        None,
    )
    for bad, words in (
        ({"models": ()}, "--models: no model named"),
        ({"models": ("levit_tiny", "resnet_9000")}, "--models: unknown resnet_9000"),
        ({"backend": "openvino", "precision": "int8"}, "--precision int8 needs calibration"),
        ({"backend": "cudagraph"}, "--backend cudagraph needs a GPU"),
    ):
        with pytest.raises(LeViTError, match=words):
            SpeedRun(**bad).resolved()
    if torch.cuda.is_available():
        gpu = SpeedRun(device="cuda").resolved()
        assert (gpu.backend, gpu.precision, gpu.batch_sizes, gpu.threads) == ("auto", "fp16", None, None)
    else:
        with pytest.raises(LeViTError, match="--device cuda: no CUDA GPU"):
            SpeedRun(device="cuda").resolved()


def test_run_speed_table_times_every_model_at_every_batch_by_the_runs_protocol():
    from levit.paper.speed import SpeedRun, run_speed_table

    run = SpeedRun(models=("levit_tiny",), batch_sizes=(1, 2), img_size=64, warmup_s=0, windows=1, window_s=0)
    rows = run_speed_table(run)
    assert [(r["model"], r["batch"], r["img_size"], r["backend"], r["threads"]) for r in rows] == [
        ("levit_tiny", 1, 64, "eager", 1),
        ("levit_tiny", 2, 64, "eager", 1),
    ]


# ---- several batch sizes in one run, and the levit/timm summary per batch ------------------------
def test_parse_batch_sizes():
    from levit.paper.speed import parse_batch_sizes

    assert parse_batch_sizes("1,64,1024") == [1, 64, 1024]
    assert parse_batch_sizes("16") == [16]
    assert parse_batch_sizes(" 2, 4 ,2") == [2, 4]  # order kept, duplicates dropped
    for bad, words in (("", "comma-separated"), ("1,,2", "comma-separated"), ("0", ">= 1"), ("8,x", "'x'")):
        with pytest.raises(LeViTError, match=words):
            parse_batch_sizes(bad)


def test_speedup_summary_per_batch():
    from levit.paper.speed import speedup_summary

    def row(model, batch, img_s, backend, impl):
        return {"model": model, "batch": batch, "img_s": img_s, "backend": backend, "implementation": impl}

    rows = [
        row("levit_128s", 1, 2000.0, "cudagraph", "levit"),
        row("timm_levit_128s", 1, 1000.0, "eager", "timm"),
        row("levit_128s", 64, 30000.0, "inductor", "levit"),
        row("timm_levit_128s", 64, 10000.0, "eager", "timm"),
        row("levit_384", 64, 500.0, "inductor", "levit"),  # no timm twin at this batch: left out
    ]
    assert speedup_summary(rows) == (
        "levit (fused) / timm's LeViT, img/s: batch 1: levit_128s 2.00x (cudagraph vs eager); "
        "batch 64: levit_128s 3.00x (inductor vs eager)"
    )
    assert speedup_summary(rows[4:]) is None
    assert "batch 64: levit_128s 3.00x" in format_table([dict(r, **_EXTRA) for r in rows])


_EXTRA = {"device": "cpu", "torch": "x", "timm": "y", "threads": 1}


def test_bench_batch_list_in_process(capsys, tmp_path):
    """One CLI run, two batches, levit and timm's LeViT side by side: rows per batch and the summary."""
    from levit.cli import main

    argv = ["bench", "--models", "levit_128s,timm_levit_128s", "--img-size", "64", "-b", "1,2", "--warmup", "0"]
    assert main([*argv, "--windows", "1", "--window", "0", "--output", str(tmp_path / "r.json")]) == 0
    cap = capsys.readouterr()
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("levit_128s", 1),
        ("timm_levit_128s", 1),
        ("levit_128s", 2),
        ("timm_levit_128s", 2),
    ]
    assert all(r["backend"] == "eager" and r["precision"] == "fp32" for r in rows)
    assert "batch 1,2" in cap.err and "[4/4] timm_levit_128s" in cap.err
    assert "batch 1: levit_128s" in cap.out and "batch 2: levit_128s" in cap.out and "(eager vs eager)" in cap.out


@pytest.mark.parametrize("bad", ["0", "1,x", "4,,8"])
def test_bench_bad_batch_list_is_a_usage_error(capsys, bad):
    from levit.cli import main

    assert main(["bench", "--models", "levit_tiny", "-b", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size" in err[0] and "Traceback" not in err[0]


def test_bench_cudagraph_on_cpu_is_a_usage_error(capsys):
    from levit.cli import main

    assert main(["bench", "--models", "levit_tiny", "--backend", "cudagraph"]) == 2
    assert "--device cuda" in capsys.readouterr().err


# ---- the one timing helper (levit.paper.timing) and the thread helper (levit.utils.num_threads) ----------
def test_interleaved_rounds_alternate_order_and_time_every_candidate():
    from levit.paper.timing import interleaved

    calls: list[str] = []
    cands = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    secs = interleaved(cands, rounds=3, window=0.0, warmup_calls=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "b", "a", "a", "b", "c"]  # warm-up, then a window each
    assert {k: len(v) for k, v in secs.items()} == {"a": 3, "b": 3, "c": 3}


def test_timed_window_reports_seconds_per_call():
    import time

    from levit.paper.timing import timed_window

    per_call = timed_window(lambda: time.sleep(0.01), 0.05)
    assert 0.009 < per_call < 0.05  # about 10 ms a call, not the window's total


def test_num_threads_sets_and_restores():
    from levit.utils import num_threads

    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), num_threads(1):
        raise RuntimeError  # restored on errors too
    assert torch.get_num_threads() == before
