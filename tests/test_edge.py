"""levit.runtime.edge / levit.runtime.pte: ExecuTorch (XNNPACK) programs, fp32 and int8, proven in ExecuTorch's runtime.

Lowering costs seconds per graph node, so the model is a two-stage ``levit_tiny`` (every kind of
LeViT layer: stem, attention blocks, one shrink attention, MLPs, merged head; a third fewer nodes)
at a non-square 48x80 input, whose 3x5 grid has odd sides (the odd path of the stride-2 rewrite).
Two real lowerings only: fp32 with a dynamic batch of 1..3 in Python, int8 at the default fixed
batch of 1 through the CLI; the other tests reuse the fp32 program.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from helpers import photos, randomized_model

pytest.importorskip("executorch", reason="ExecuTorch is the 'edge' extra: pip install 'levit[edge]'")

import levit
from levit.cli import main
from levit.data.datasets import imagenet_class_names
from levit.data.transforms import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from levit.runtime import edge, pte
from levit.runtime.export import ExportError

HW = (48, 80)


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def model():
    return randomized_model("levit_tiny", seed=4, img_size=HW, embed_dim=(32, 48), num_heads=(2, 3), depth=(1, 1))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """One fp32 export, batch 1..3: the result, and the folder holding nothing else."""
    out = tmp_path_factory.mktemp("fp32")
    return edge.export_executorch(model, out / "tiny.pte", batch_size=3, dynamic_batch=True), out


def test_fp32_program_matches_float64_in_the_runtime(model, exported):
    res, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["tiny.json", "tiny.pte"]  # no temporary files left
    assert res.max_rel_error <= 1e-5 and res.max_rel_error <= res.limit, res
    assert res.size_bytes == res.path.stat().st_size and "vs a float64 run" in str(res)
    assert res.images == 4 and "batch 1..3" in str(res)  # checked at batch 1 and 3
    # the whole network, dynamic batch included, in one XNNPACK subgraph: no portable kernel between parts
    assert res.xnnpack_subgraphs == 1 and res.metadata["xnnpack"] == {"subgraphs": 1, "ops_outside": 0}
    # the written file on its own, through ExecuTorch's public runtime API, on images the check did not
    # use, at batches 2 and 1 (the batch is dynamic)
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(res.path).load_method("forward")
    x = photos(3, HW, seed=7)
    with torch.inference_mode():
        exact = copy.deepcopy(levit.fuse(model)).double()(x.double())
    got = torch.cat([method.execute([x[:2]])[0], method.execute([x[2:]])[0]])
    assert got.shape == (3, 1000) and rel_max_error(got, exact) <= 1e-5


def test_the_printed_line_says_when_xnnpack_runs_the_program_in_parts(exported):
    """One XNNPACK subgraph goes unsaid; more (an int8 program with a dynamic batch: slices between
    them) are named, as ExecuTorch's portable kernels between them cost time."""
    res, _ = exported
    assert "parts" not in str(res)
    assert "XNNPACK runs it in 7 parts; metadata in" in str(dataclasses.replace(res, xnnpack_subgraphs=7))


def test_sidecar_describes_what_an_app_needs(model, exported):
    res, _ = exported
    meta = json.loads(res.sidecar.read_text())
    assert meta == edge.read_sidecar(res.path) == res.metadata
    assert meta["variant"] == "levit_tiny" and meta["precision"] == "fp32" and meta["batch"] == {"min": 1, "max": 3}
    assert meta["program"] == "tiny.pte" and meta["input"]["shape"] == [3, 3, *HW]
    pre = meta["preprocessing"]
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD)
    assert pre["center_crop"] == list(HW) and pre["crop_pct"] == DEFAULT_CROP_PCT
    assert pre["resize_shorter_side"] == int(80 / DEFAULT_CROP_PCT)  # the longer side decides (eval_transform)
    assert meta["class_names"] == imagenet_class_names() and meta["output"]["shape"] == [3, 1000]
    assert meta["check"]["max_rel_error"] == res.max_rel_error and meta["versions"]["executorch"].startswith("1.")
    # edge.load reads the batch from the sidecar: 5 images run as 3 + 2
    x = photos(5, HW, seed=8)
    with torch.inference_mode():
        ref = levit.fuse(model)(x)
    assert rel_max_error(edge.load(res.path)(x), ref) <= 1e-5


def test_sidecar_carries_the_models_own_preprocessing(model, exported, tmp_path, monkeypatch):
    """A model whose weights expect another preprocessing (its ``pretrained_cfg``) gets a sidecar with
    that preprocessing, not the ImageNet defaults (the program itself is the one already lowered)."""
    res, _ = exported
    monkeypatch.setattr(edge, "lower", lambda *a, **k: pte.Lowered(res.path.read_bytes(), 1, 0))
    own = copy.deepcopy(model)
    own.pretrained_cfg.update(crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
    out = edge.export_executorch(own, tmp_path / "own.pte", batch_size=3, dynamic_batch=True)
    pre = edge.read_sidecar(out.path)["preprocessing"]
    assert pre["crop_pct"] == 1.0 and pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3
    assert pre["interpolation"] == "bilinear" and pre["crop_mode"] == "center"
    assert pre["resize_shorter_side"] == 80 and pre["center_crop"] == list(HW)  # max(48, 80) / 1.0


def _as_the_sidecar_says(img, pre: dict):
    """docs/edge.md's preprocessing, step by step from the sidecar (what an app does)."""
    import math

    import numpy as np
    from PIL import Image

    h, w = pre["center_crop"]
    short = pre["resize_shorter_side"]
    if img.width <= img.height:
        size = (short, math.floor(short * img.height / img.width))
    else:
        size = (math.floor(short * img.width / img.height), short)
    img = img.resize(size, Image.BICUBIC)
    left, top = round((img.width - w) / 2), round((img.height - h) / 2)
    img = img.crop((left, top, left + w, top + h))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) * pre["scale"]).permute(2, 0, 1)
    return (x - torch.tensor(pre["mean"]).view(3, 1, 1)) / torch.tensor(pre["std"]).view(3, 1, 1)


def test_the_sidecar_recipe_is_levits_preprocessing(exported, tmp_path):
    """An app following the sidecar (docs/edge.md, step by step) gets the tensor levit predict gets,
    on portrait, landscape and square images whose crop offsets round both ways."""
    import numpy as np
    from PIL import Image

    from levit.data.preprocess import Preprocess

    pre = edge.read_sidecar(exported[0].path)["preprocessing"]
    official = Preprocess(HW)
    rng = np.random.default_rng(0)
    for hw in [(120, 161), (161, 120), (100, 100), (95, 240), (300, 97)]:
        img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        img.save(tmp_path / "x.png")
        got, want = _as_the_sidecar_says(img, pre), official(tmp_path / "x.png")
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5, hw  # x/255 vs x*(1/255): an ulp


def test_xnnpack_rewrites_keep_the_numbers(model):
    """The graph rewrites leave none of the ops XNNPACK refuses and move the same numbers."""
    aten = torch.ops.aten
    fused = levit.fuse(model)
    x = photos(1, HW, seed=9)
    gm = torch.export.export(fused, (x,)).module()
    before = {n.target for n in gm.graph.nodes}
    assert {aten.split_with_sizes.default, aten.matmul.default} <= before  # there was something to rewrite
    gm = pte.xnnpack_friendly(gm)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert not {n.target for n in nodes} & {aten.split_with_sizes.default, aten.matmul.default, aten.contiguous.default}
    assert all(n.args[4:] in ((), (1,)) for n in nodes if n.target == aten.slice.Tensor)  # no stride-2 slice
    assert sum(n.target == aten.cat.default for n in nodes) == 2  # the 3x5 grid's two odd sides
    with torch.inference_mode():  # in float64, where only a changed computation could differ
        assert rel_max_error(gm.double()(x.double()), copy.deepcopy(fused).double()(x.double())) < 1e-12


def test_xnnpack_rewrites_of_a_dynamic_batch_leave_no_slice(model):
    """XNNPACK slices no tensor of dynamic shape: with a dynamic batch the q/k/v slices become linear
    layers of the matching weight rows and the shrink attention's subsampling 1x1 convolutions of
    stride 2, the same numbers at every batch (the lowered program is one XNNPACK subgraph: below)."""
    aten = torch.ops.aten
    fused = levit.fuse(model)
    x = photos(3, HW, seed=9)
    batch = torch.export.Dim("batch", min=1, max=3)
    gm = pte.xnnpack_friendly(torch.export.export(fused, (x[:2],), dynamic_shapes=({0: batch},)).module())
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(n.target == aten.slice.Tensor for n in nodes)
    # the model's 14 linear layers, where each of the two qkv layers is now 3 and the shrink attention's kv 2
    assert sum(n.target == aten.linear.default for n in nodes) == 14 + 2 * 2 + 1
    assert sum(n.target == aten.conv2d.default for n in nodes) == 4 + 2  # the stem's, the 3x5 grid's two sides
    exact = copy.deepcopy(fused).double()
    with torch.inference_mode():
        for b in (1, 3):
            assert rel_max_error(gm.double()(x[:b].double()), exact(x[:b].double())) < 1e-12


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_program_that_fails_its_check_writes_nothing(model, exported, tmp_path, monkeypatch, precision):
    """A planted wrong weight between lowering and the check (the program holds the model's weights,
    the model checked against has one weight matrix changed) fails, leaving earlier files untouched."""
    res, _ = exported
    planted = copy.deepcopy(model)
    with torch.no_grad():
        planted.stem[0].conv.weight.neg_()  # the first convolution's filters, sign flipped
    monkeypatch.setattr(edge, "lower", lambda *a, **k: pte.Lowered(res.path.read_bytes(), 1, 0))
    out = tmp_path / "m.pte"
    out.write_bytes(b"old")
    edge.sidecar_path(out).write_text("old")
    calib = photos(8, HW, seed=2) if precision == "int8" else None
    match = "does not match PyTorch" if precision == "fp32" else "below the accepted"
    with pytest.raises(ExportError, match=match):
        edge.export_executorch(
            planted, out, precision=precision, calibration=calib, int8=edge.Int8Options(min_agreement=0.9)
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pte"]
    assert out.read_bytes() == b"old" and edge.sidecar_path(out).read_text() == "old"


@pytest.mark.parametrize(("activations", "at_run_time"), [("dynamic", True), ("static", False)])
def test_int8_activation_schemes(activations, at_run_time):
    """dynamic: the linear layers' inputs get their scales while the program runs (choose_qparams in
    the graph); static: fixed, calibrated scales only. Both keep the fp32 model's answers here."""
    m = randomized_model("levit_tiny", seed=4, img_size=32, embed_dim=(16,), num_heads=(1,), depth=(1,))
    fused = levit.fuse(m)
    x = photos(4, 32, seed=13)
    gm = pte.xnnpack_friendly(torch.export.export(fused, (x[:1],)).module())
    q = pte._quantize(gm, x, 1, True, activations)
    targets = {str(n.target) for n in q.graph.nodes if n.op == "call_function"}
    assert any("choose_qparams" in t for t in targets) == at_run_time, targets
    assert any("quantize_per_channel" in t for t in targets)  # int8 weights per output channel either way
    with torch.inference_mode():
        got = torch.cat([q(x[i : i + 1]) for i in range(4)])  # exported at batch 1
        assert torch.equal(got.argmax(1), fused(x).argmax(1))


def _write_photos(folder, n: int) -> None:
    """``n`` photo-like PNGs that the evaluation transform turns into 48x80 inputs."""
    from PIL import Image

    folder.mkdir()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, img in enumerate(photos(n, (91, 152), seed=3)):  # shorter side already 80 / 0.875
        arr = ((img * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")


def test_int8_through_the_cli(model, exported, tmp_path, capsys):
    """int8 (PT2E, XNNPACK's quantizer) calibrated on image files at the default fixed batch of 1:
    written with its agreement with fp32, well under half the fp32 file, runs any number of images."""
    ckpt = levit.save(model, tmp_path / "tiny.safetensors")
    _write_photos(tmp_path / "calib", 8)
    out = tmp_path / "tiny_int8.pte"
    argv = ["export", "-c", str(ckpt), "-o", str(out), "--precision", "int8"]  # the file knows its model
    code = main([*argv, "--calibration", str(tmp_path / "calib")])
    printed = capsys.readouterr().out
    assert code == 0 and "executorch int8, dynamic activations, batch 1," in printed, printed
    assert "top-1 agreement with fp32" in printed
    meta = edge.read_sidecar(out)
    assert meta["precision"] == "int8" and meta["int8_activations"] == "dynamic" and meta["batch"] == 1
    assert meta["check"]["images"] == 8 and meta["xnnpack"]["subgraphs"] == 1
    # levit.deploy's int8 on these 8 images: OpenVINO 7/8 and 0.13, onnxruntime 4/8 and 0.16 (randomised
    # weights have close top logits: tests/test_deploy.py); a wrong scale or weight agrees on ~1/1000
    assert meta["check"]["top1_agreement"] >= 4 / 8 and meta["check"]["max_rel_error"] < 0.4, meta["check"]
    fp32_size = exported[0].size_bytes
    assert out.stat().st_size < 0.45 * fp32_size  # int8 weights; the tiny model's fp32 attention biases stay
    x = photos(5, HW, seed=5)
    with torch.inference_mode():
        ref = levit.fuse(model)(x)
    program = edge.load(out)  # batch 1: 5 images run one by one
    got = program(x)
    assert got.shape == (5, 1000) and torch.isfinite(got).all()
    assert rel_max_error(program(x[:1]), ref[:1]) < 0.5 and torch.equal(program(x[3:4]), got[3:4])


def test_programs_with_different_threads_take_turns(model, exported):
    """Two programs on 1 and 2 threads called in turn: each resize of ExecuTorch's threadpool frees
    the pool the other was loaded with, so each reloads itself (without that the process crashes)."""
    res, _ = exported
    before = pte.get_threads()
    x = photos(2, HW, seed=12)
    with torch.inference_mode():
        ref = levit.fuse(model)(x)
    try:
        one, two = pte.Program(res.path, max_batch=3, threads=1), pte.Program(res.path, max_batch=3, threads=2)
        outs = [p(x) for p in (one, two, one, two)]
        assert pte.get_threads() == 2
    finally:
        pte.set_threads(before)
    assert all(rel_max_error(o, ref) <= 1e-5 for o in outs)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--format", "executorch", "--precision", "bf16"], "--precision"),
        (["-o", "{out}.pte", "--precision", "int8"], "--calibration"),
        (["-o", "{out}.onnx", "--precision", "int8"], "--precision int8 is only for --format executorch"),
        (["-o", "{out}.onnx", "--dynamic-batch"], "--dynamic-batch"),
        (["-o", "{out}.pte", "--int8-activations", "static"], "--int8-activations are for --precision int8"),
        (["-o", "{out}.pte", "--precision", "int8", "--calibration", ".", "--int8-activations", "x"], "dynamic"),
        (["-o", "{out}.pte", "--dynamic-batch", "-b", "1"], "--batch-size"),
        (["--format", "executorch", "-o", "{out}.onnx"], ".pte"),
    ],
)
def test_unsupported_options_are_one_line_usage_errors(tmp_path, capsys, args, flag):
    out = str(tmp_path / "m")
    args = [a.format(out=out) for a in args]
    if "-o" not in args:
        args += ["-o", out + ".pte"]
    code = main(["export", "-m", "levit_tiny", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert list(tmp_path.iterdir()) == []


def test_deploy_backend_runs_the_program(model, exported, monkeypatch):
    """levit.deploy(backend="executorch") runs an ExecuTorch program (here the fp32 one already lowered:
    the wiring, not the lowering, is under test) and resizes ExecuTorch's threadpool as asked."""
    res, _ = exported
    monkeypatch.setattr(pte, "lower", lambda *a, **k: pte.Lowered(res.path.read_bytes(), 1, 0))
    before = pte.get_threads()
    try:
        pred = levit.deploy(model, backend="executorch", batch_size=1, threads=1)
        assert pred.backend == "executorch" and pte.get_threads() == 1
        x = photos(3, HW, seed=6)
        with torch.inference_mode():
            assert rel_max_error(pred(x), levit.fuse(model)(x)) <= 1e-5
    finally:
        pte.set_threads(before)
    from levit.runtime.deploy import DeployError

    with pytest.raises(DeployError, match="executorch"):
        levit.deploy(model, backend="executorch", precision="bf16")
