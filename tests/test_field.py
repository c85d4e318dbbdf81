"""levit bench --suite modern: the fast-form check, the accuracy data file, the Pareto front, the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from levit.paper.accuracy import FIELD_ACCURACY, MODERN_MODELS, MODERN_QUICK_MODELS, load_field_accuracy
from levit.paper.field import (
    TOLERANCE,
    add_front_distance,
    best_form,
    format_field_table,
    front_in_band,
    levit_ratios,
    pareto_front,
    plot_field,
    relative_error,
)
from levit.paper.speed import BENCH_MODELS, SpeedRun


# ---- every fast form is checked against its eager form before it is timed ---------------------------
@pytest.mark.parametrize(("name", "eager_form"), [("levit_tiny", "fused"), ("fastvit_t8", "reparameterized")])
def test_best_form_checks_every_runtime_against_eager(name, eager_form):
    form = best_form(name, batch=1, runtimes=("eager", "onnxruntime"), trial_s=0.0, img_size=64)
    assert form.eager_form == eager_form and form.reparam_rel_err <= TOLERANCE  # BN statistics randomised
    assert set(form.forms) == {"eager", "onnxruntime"} and form.backend in form.forms
    assert form.forms["eager"]["rel_err"] == 0.0
    assert form.forms["onnxruntime"]["error"] is None and form.forms["onnxruntime"]["rel_err"] <= TOLERANCE
    assert form.forms[form.backend]["img_s"] > 0 and form.img_size == 64
    form.run()  # the chosen form runs on its timed input


def test_a_form_with_other_logits_or_a_failed_conversion_is_not_timed(monkeypatch):
    import levit.runtime.backend_onnxruntime as ort_backend
    import levit.runtime.deploy as deploy
    import levit.runtime.export as export_mod

    real, real_session = deploy.build_runner, ort_backend.onnxruntime_session

    def cannot_convert(*a, **kw):
        raise RuntimeError("cannot convert\nsecond line")

    # OpenVINO fails from the ONNX export and from the module; ONNX Runtime gives other logits
    monkeypatch.setattr(export_mod, "openvino_core", lambda: SimpleNamespace(read_model=cannot_convert))
    monkeypatch.setattr(
        deploy, "build_runner", lambda m, b, *a, **kw: cannot_convert() if b == "openvino" else real(m, b, *a, **kw)
    )

    def other_logits(*a):
        run = real_session(*a)
        return lambda x: run(x) * 1.001

    monkeypatch.setattr(ort_backend, "onnxruntime_session", other_logits)
    form = best_form("levit_tiny", batch=1, trial_s=0.0, img_size=64)
    assert form.backend == "eager"
    assert form.forms["onnxruntime"]["img_s"] is None and "logits differ" in form.forms["onnxruntime"]["error"]
    assert form.forms["openvino"]["error"] == "RuntimeError: cannot convert"


def test_one_onnx_export_feeds_onnx_runtime_and_openvino(monkeypatch):
    """Both runtimes are built from one ONNX export and give the eager form's logits; where the
    suite's export fails, OpenVINO still gets its form, by its own conversion."""
    import levit.runtime.backend_onnxruntime as ort_backend
    import levit.runtime.deploy as deploy
    from levit.paper.field import _form_builder, eager_form, relative_error

    real_export, real_build, exports, conversions = ort_backend.onnx_bytes, deploy.build_runner, [], []
    monkeypatch.setattr(ort_backend, "onnx_bytes", lambda *a: exports.append(1) or real_export(*a))
    monkeypatch.setattr(
        deploy, "build_runner", lambda m, b, *a, **kw: conversions.append(b) or real_build(m, b, *a, **kw)
    )
    eager, _, (xc, want), x, *_ = eager_form("levit_tiny", 64, 1, 0)
    build = _form_builder(eager, x)
    for backend in ("onnxruntime", "openvino"):
        assert relative_error(build(backend)(xc), want) <= TOLERANCE
    assert len(exports) == 1 and conversions == []

    def no_export(*a):
        raise RuntimeError("no ONNX export")

    # without the export, OpenVINO's form comes from levit.deploy's own conversion of the module (its
    # logits are tests/test_deploy.py's): here only that route is checked, with eager's runner
    monkeypatch.setattr(ort_backend, "onnx_bytes", no_export)
    monkeypatch.setattr(deploy, "build_runner", lambda m, b, *a, **kw: conversions.append(b) or eager)
    build = _form_builder(eager, x)
    with pytest.raises(RuntimeError, match="no ONNX export"):
        build("onnxruntime")
    assert build("openvino") is eager and conversions == ["openvino"]


def test_relative_error():
    a = torch.tensor([[1.0, -4.0]])
    assert relative_error(a, a) == 0.0
    assert relative_error(a + 0.004, a) == pytest.approx(1e-3, rel=1e-4)
    assert relative_error(a[:, :1], a) == float("inf")


# ---- the accuracy data file ----------------------------------------------------------------------
def test_every_candidate_has_a_sourced_top1_at_its_resolution():
    import timm

    assert set(MODERN_QUICK_MODELS) <= set(MODERN_MODELS) and len(MODERN_MODELS) >= 40
    for name in MODERN_MODELS:
        acc, entry = FIELD_ACCURACY[name], BENCH_MODELS[name]
        assert acc.source and acc.source != "unknown", name
        assert acc.top1 is not None and 60 < acc.top1 < 90, name
        assert entry.img_size == acc.img_size and entry.top1 == pytest.approx(acc.top1), name
        assert acc.timm_model is None or timm.list_models(acc.timm_model) == [acc.timm_model], name
    for v in ("levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"):  # the paper's, timm's beside
        assert "Table 3" in FIELD_ACCURACY[v].source and FIELD_ACCURACY[v].timm_top1 is not None


def test_a_row_without_a_source_reads_unknown():
    text = "name,timm_model,family,img_size,top1,source,timm_top1,note\nx,x_arch,X,224,unknown,,,\n"
    row = load_field_accuracy(text)["x"]
    assert row.top1 is None and row.source == "unknown" and row.timm_model == "x_arch"


# ---- the front, on synthetic points ----------------------------------------------------------------
def _r(model, img_s, top1, family="Other", impl="timm+reparam"):
    return {"model": model, "img_s": img_s, "top1": top1, "family": family, "implementation": impl}


ROWS = [
    _r("levit_a", 100.0, 76.0, "LeViT (levit)", "levit"),
    _r("levit_b", 40.0, 81.0, "LeViT (levit)", "levit"),
    _r("fast_weak", 300.0, 70.0),
    _r("slow_strong", 10.0, 83.0),
    _r("dominated", 50.0, 75.0),  # levit_a is faster and more accurate
    _r("peer", 80.0, 77.0),  # nearest in accuracy above levit_a
    _r("timm_levit", 200.0, 85.0, "LeViT (timm levit_conv)"),  # a LeViT: never levit's peer
    _r("no_top1", 1000.0, None),
]


def test_pareto_front_and_the_distance_from_it():
    pts = [(r["img_s"], r["top1"]) for r in ROWS if r["top1"] is not None]
    assert [pts[i] for i in pareto_front(pts)] == [(300.0, 70.0), (200.0, 85.0)]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0]  # a tie: one point represents both
    rows = {r["model"]: r for r in add_front_distance(ROWS)}
    assert rows["fast_weak"]["on_front"] and rows["fast_weak"]["front_speed_ratio"] == 1.0
    assert rows["dominated"]["on_front"] is False
    assert rows["dominated"]["front_speed_ratio"] == pytest.approx(50 / 200)  # timm_levit: faster, more accurate
    assert rows["dominated"]["front_top1_gap"] == pytest.approx(85 - 75)
    assert rows["no_top1"]["on_front"] is None and rows["no_top1"]["front_speed_ratio"] is None
    assert [r["model"] for r in front_in_band(ROWS, (70, 84))] == ["fast_weak"]
    assert [r["model"] for r in front_in_band(ROWS, (60, 90))] == ["fast_weak", "timm_levit"]


def test_levit_ratio_to_the_nearest_model_at_least_as_accurate():
    got = {r["model"]: (peer and peer["model"], ratio) for r, peer, ratio in levit_ratios(ROWS)}
    assert got["levit_a"] == ("peer", pytest.approx(100 / 80))
    assert got["levit_b"] == ("slow_strong", pytest.approx(40 / 10))
    alone = [_r("levit_a", 100.0, 76.0, "LeViT (levit)", "levit"), _r("weak", 1.0, 70.0)]
    assert levit_ratios(alone)[0][1:] == (None, None)


def test_table_and_plot_of_synthetic_rows(tmp_path):
    extra = {"device": "cpu", "threads": 1, "batch": 16, "torch": "t", "timm": "m", "backend": "openvino"}
    rows = [dict(r, **extra) for r in ROWS]
    t = format_field_table(rows)
    assert "front, 70-84% top-1: fast_weak (70.0)" in t
    assert "levit_a (76.0): 1.25x the img/s of peer (77.0)" in t and "fast_weak *" in t
    pytest.importorskip("matplotlib")
    assert plot_field(rows, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ---- the run and the command line --------------------------------------------------------------------
def test_a_modern_run_resolves_its_own_defaults_and_refuses_what_it_cannot_compare():
    from levit.errors import LeViTError

    r = SpeedRun(suite="modern").resolved()
    assert r.models == MODERN_MODELS and (r.backend, r.precision, r.batch_sizes, r.threads) == (
        "auto",
        "fp32",
        (16,),
        1,
    )
    assert SpeedRun(suite="modern", quick=True).resolved().models == MODERN_QUICK_MODELS
    assert SpeedRun(suite="modern", backend="executorch").resolved().batch_sizes == (1,)  # the phone protocol
    for bad, words in (
        ({"precision": "bf16"}, "fp32 forms only"),
        ({"backend": "inductor"}, "--backend must be one of"),
        ({"batch_sizes": (1, 16)}, "one batch size per run"),
        ({"device": "cuda"}, "on the CPU"),
    ):
        with pytest.raises(LeViTError, match=words):
            SpeedRun(suite="modern", **bad).resolved()
    with pytest.raises(LeViTError, match="--suite: unknown"):
        SpeedRun(suite="nope").resolved()


def test_bench_suite_modern_quick_in_process(capsys, tmp_path):
    from levit.cli import main

    argv = ["bench", "--suite", "modern", "--quick", "--models", "levit_tiny,levit_128s", "--img-size", "64"]
    argv += ["-b", "1", "--backend", "eager", "--warmup", "0", "--windows", "2", "--window", "0"]
    assert main([*argv, "--output", str(tmp_path / "r.json")]) == 0
    cap = capsys.readouterr()
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["model"] for r in rows] == ["levit_tiny", "levit_128s"]
    assert all(r["backend"] == "eager" and r["img_size"] == 64 and r["eager_form"] == "fused" for r in rows)
    assert rows[1]["top1"] is None and "figure is at 224px" in rows[1]["top1_source"]  # not at 64px
    assert "[2/2] interleaved round ... done" in cap.err and "suite modern" in cap.err
    assert "levit_128s" in cap.out and "front, 70-84% top-1" in cap.out
    assert main([*argv[:3], "--precision", "bf16"]) == 2
    assert "fp32 forms only" in capsys.readouterr().err


def test_a_model_no_runtime_can_take_is_listed_with_its_error(monkeypatch):
    """The phone-class protocol (``--backend executorch``) lists the models that fail to export."""
    import levit.runtime.deploy as deploy
    from levit.paper.field import run_field

    def fail(module, backend, precision="fp32", **kw):
        raise RuntimeError(f"{backend} cannot lower this")

    monkeypatch.setattr(deploy, "build_runner", fail)
    run = SpeedRun(suite="modern", models=("levit_tiny",), backend="executorch", batch_sizes=(1,), img_size=64)
    rows = run_field(SpeedRun(**{**run.__dict__, "warmup_s": 0.0, "windows": 1, "window_s": 0.0}))
    assert rows[0]["img_s"] is None and rows[0]["on_front"] is None
    assert "executorch: RuntimeError: executorch cannot lower this" in rows[0]["error"]
    assert "did not run: levit_tiny" in format_field_table(rows)


@pytest.mark.parametrize(("over_budget", "timed_together"), [(False, [["a", "b", "c"]]), (True, [["a"], ["b"], ["c"]])])
def test_a_group_whose_forms_hold_too_much_memory_is_timed_as_it_stands(monkeypatch, over_budget, timed_together):
    """Past field.MEMORY_SHARE of the machine's memory, the forms built so far are timed and released
    before the next model's form joins them; under it, the group is timed in the same rounds."""
    import levit.paper.field as field

    names = {"levit_128s": "a", "levit_128": "b", "levit_192": "c"}  # nearest in top-1: one group of 8
    budget = field.memory_budget()
    assert budget is not None and 0 < field.memory_budget(0.1) < budget  # Linux: /proc and sysconf
    monkeypatch.setattr(field, "memory_budget", lambda: 2**30)
    monkeypatch.setattr(field, "process_memory", lambda: 2**30 + (1 if over_budget else -1))
    groups, interleaved = [], field.interleaved
    monkeypatch.setattr(
        field, "interleaved", lambda cands, **kw: groups.append(list(cands)) or interleaved(cands, **kw)
    )
    run = SpeedRun(suite="modern", models=tuple(names), backend="eager", batch_sizes=(1,), img_size=32)
    rows = field.run_field(SpeedRun(**{**run.__dict__, "warmup_s": 0.0, "windows": 1, "window_s": 0.0}))
    assert [[names[k] for k in g] for g in groups] == timed_together
    assert [r["model"] for r in rows] == list(names) and all(r["img_s"] > 0 for r in rows)


def test_bench_protocol_all_in_process(capsys, tmp_path, monkeypatch):
    """`--protocol all`: each protocol's rows (threads, batch, backend), one table and one picture per
    protocol, one output file with a protocol column, each model built once for all protocols."""
    import levit.paper.field as field
    import levit.runtime.deploy as deploy
    from levit.cli import main

    # tiny settings: 64 px models with stand-in top-1 figures (the cited ones hold at 224 px only),
    # two runtimes race, and ExecuTorch's lowering (seconds a model, tested with the runtime) is
    # replaced by the eager runner: what is tested here is the run of every protocol
    real_build, built = deploy.build_runner, []
    monkeypatch.setattr(field, "RUNTIMES", ("eager", "onnxruntime"))
    monkeypatch.setattr(
        deploy, "build_runner", lambda m, b, *a, **kw: real_build(m, "eager" if b == "executorch" else b, *a, **kw)
    )
    real_prepare = field._prepare
    monkeypatch.setattr(field, "_prepare", lambda name, *a: built.append(name) or real_prepare(name, *a))
    top1 = {"levit_tiny": 71.0, "levit_128s": 76.6}
    monkeypatch.setattr(
        field, "_accuracy", lambda name, res: {"top1": top1[name], "top1_source": "stand-in", "timm_top1": None}
    )
    models = ["levit_tiny", "levit_128s"]
    argv = ["bench", "--suite", "modern", "--protocol", "all", "--models", ",".join(models), "--img-size", "64"]
    argv += ["--warmup", "0", "--windows", "1", "--window", "0"]
    assert main([*argv, "--output", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "f.png")]) == 0
    cap = capsys.readouterr()
    import csv

    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    got = [(r["protocol"], r["model"], r["threads"], r["batch"]) for r in rows]
    cores = str(field.all_cores())
    assert got == [
        ("paper", "levit_tiny", "1", "16"),
        ("paper", "levit_128s", "1", "16"),
        ("latency", "levit_tiny", cores, "1"),
        ("latency", "levit_128s", cores, "1"),
        ("executorch", "levit_tiny", "1", "1"),
        ("executorch", "levit_128s", "1", "1"),
    ]
    assert all(r["backend"] in ("eager", "onnxruntime") for r in rows[:4])
    assert {r["backend"] for r in rows[4:]} == {"executorch"} and all(r["img_s"] for r in rows)
    assert sorted(built) == sorted(models)  # built, BN randomised and checked once for the three protocols
    for p in ("paper", "latency", "executorch"):
        assert f"== protocol {p} ==" in cap.out and f"levit bench: protocol {p}:" in cap.err
        assert (tmp_path / f"f_{p}.png").read_bytes()[:4] == b"\x89PNG"
    assert cap.out.count("levit_128s (76.6): ") == 3  # LeViT's ratio line under each table
    assert "left]" in cap.err  # the estimate of the time left
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--protocol", "fast"], "argument --protocol: unknown protocol 'fast'; choose from paper, latency"),
        (
            ["--protocol", "all", "--threads", "2"],
            "--protocol sets the threads, the batch and the backend: drop --threads",
        ),
        (["--protocol", "all", "-b", "1"], "drop --batch-size"),
        (["--protocol", "all", "--backend", "eager"], "drop --backend"),
    ],
)
def test_bench_protocol_refusals_name_the_flag(capsys, extra, words):
    from levit.cli import main

    assert main(["bench", "--suite", "modern", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert main(["bench", "--protocol", "all"]) == 2
    assert "--protocol needs --suite modern" in capsys.readouterr().err


def test_protocol_all_from_the_command_line_takes_its_rounds_unless_given():
    from levit.cli import build_parser
    from levit.cli.bench import _speed_runs

    def rounds(*flags: str) -> list[tuple[int, float]]:
        args = build_parser().parse_args(["bench", "--suite", "modern", "--protocol", "all", *flags])
        return [(r.windows, r.window_s, r.warmup_s) for _, r in _speed_runs(args)]

    assert rounds() == [(4, 1.0, 0.25), (3, 1.0, 0.25), (3, 1.0, 0.25)]
    assert rounds("--windows", "2", "--window", "0.5", "--warmup", "1") == [(2, 0.5, 1.0)] * 3


def test_protocol_runs_cover_the_documented_models():
    from levit.paper.field import ALL_QUICK_MODELS, ALL_SUBSET_MODELS, protocol_runs

    full = dict(protocol_runs(SpeedRun(suite="modern"), "all"))
    assert list(full) == ["paper", "latency", "executorch"]
    assert full["paper"].models == MODERN_MODELS and full["paper"].batch_sizes == (16,)
    assert full["latency"].models == ALL_SUBSET_MODELS and full["latency"].batch_sizes == (1,)
    assert set(full["executorch"].models) == set(ALL_SUBSET_MODELS) - {"efficientvit_m5"}
    assert len(full["executorch"].models) >= 10
    assert (full["executorch"].backend, full["executorch"].threads) == ("executorch", 1)
    # shorter rounds where the three run together, unless the flags give them
    assert [(r.windows, r.window_s, r.warmup_s) for r in full.values()] == [
        (4, 1.0, 0.25),
        (3, 1.0, 0.25),
        (3, 1.0, 0.25),
    ]
    given = dict(protocol_runs(SpeedRun(suite="modern", windows=2, window_s=0.0), "all"))
    assert all((r.windows, r.window_s) == (2, 0.0) for r in given.values())
    quick = dict(protocol_runs(SpeedRun(suite="modern", quick=True), "all"))
    assert all(r.models == ALL_QUICK_MODELS for r in quick.values())
    ((name, one),) = protocol_runs(SpeedRun(suite="modern"), "latency")  # alone: the whole suite
    assert name == "latency" and one.models == MODERN_MODELS


def test_the_heap_freeze_of_a_run_leaves_a_callers_freeze_in_place(monkeypatch):
    """A run freezes the heap it starts with and thaws it after; a heap frozen before the run (a
    server's, this test session's: tests/conftest.py) stays frozen, as gc.unfreeze would thaw it too."""
    import gc

    from levit.paper.field import _heap_frozen

    calls = []
    for name in ("collect", "freeze", "unfreeze"):
        monkeypatch.setattr(gc, name, lambda name=name: calls.append(name))
    for frozen_before, thawed in ((0, True), (5, False)):
        calls.clear()
        monkeypatch.setattr(gc, "get_freeze_count", lambda n=frozen_before: n)
        with _heap_frozen():
            assert calls == ["collect", "freeze"]
        assert ("unfreeze" in calls) == thawed
