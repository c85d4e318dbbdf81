"""levit.deploy: every backend and precision gives the right shape and stays within its fidelity bound."""

from __future__ import annotations

import gc
import importlib
import warnings
from pathlib import Path

import pytest
import torch
from helpers import photos, tiny_model

import levit
from levit.runtime.calibration import fidelity
from levit.runtime.deploy import DeployError, DeployWarning, Predictor, check_backend, resolve
from levit.runtime.export import openvino_core, to_openvino


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def images():
    return photos(12, 64, seed=1)


@pytest.fixture(scope="module")
def reference(model, images):
    with torch.no_grad():
        return model(images)


# (backend, precision, max relative logit error, min top-1 agreement) on these 12 images: what the
# working runtimes achieve on this tiny 64px model with this seed (measured: fp32 4e-6 and 12/12;
# bf16 0.042 and 12/12; int8 OpenVINO 0.38 and 9/12, onnxruntime 0.57 and 8/12) with a margin, so a
# quantizer that flips half the answers or a precision that doubles the error fails. int8 on a model
# this small is rough (6/12 to 10/12 over other seeds); randomised weights have close top logits,
# so even on LeViT-128S and real photos int8 agrees on 72% and bf16 on 85% (timm's bf16 export: 87%;
# benchmarks/speed_targets.py). Without VNNI (oneDNN limited to AVX2) NNCF's overflow fix keeps
# int8 OpenVINO at 10/12 and 0.35 here; ONNX Runtime's 7-bit weights keep onnxruntime within its
# bounds on such a CPU (test_onnxruntime_int8_follows_the_saturation_probe), where 8-bit ones saturate.
CASES = [
    ("eager", "fp32", 1e-5, 1.0),
    ("onnxruntime", "fp32", 1e-5, 1.0),
    ("openvino", "fp32", 1e-5, 1.0),
    ("eager", "bf16", 0.07, 10 / 12),
    ("openvino", "bf16", 0.06, 10 / 12),
    ("openvino", "int8", 0.5, 8 / 12),
    ("onnxruntime", "int8", 0.75, 7 / 12),
]


@pytest.mark.parametrize(("backend", "precision", "max_err", "min_agree"), CASES)
def test_backend_precision(model, images, reference, backend, precision, max_err, min_agree):
    calib = images if precision != "fp32" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployWarning)  # CPUs without bf16/VNNI: covered by the capability tests
        pred = levit.deploy(model, backend=backend, precision=precision, batch_size=5, threads=1, calibration=calib)
        precision = resolve(backend, precision)[1]  # OpenVINO bf16 runs fp32 on a CPU without bf16
    assert isinstance(pred, Predictor) and pred.backend == backend and pred.precision == precision
    out = pred(images)  # 12 images, batch 5: three chunks, the last one partial
    assert out.shape == (12, model.config.num_classes) and out.dtype == torch.float32
    f = fidelity(out, reference)
    assert f["max_rel_error"] <= max_err, f
    assert f["top1_agreement"] >= min_agree, f
    if precision == "fp32":
        assert pred.fidelity is None
    else:  # reduced precision reports its fidelity on the calibration images (here: the same images)
        assert pred.fidelity is not None and pred.fidelity["images"] == 12
        assert pred.fidelity["top1_agreement"] == pytest.approx(f["top1_agreement"])
        assert pred.fidelity["max_rel_error"] == pytest.approx(f["max_rel_error"], rel=1e-3)


def test_inductor_pads_partial_batches_to_its_compiled_shape(images):
    """The compiled backend sees only its fixed batch (no recompilation); outputs are trimmed back.
    Checked on the Predictor without compiling (compiling costs minutes on a busy 2-core machine)."""
    seen = []

    def run(x):
        seen.append(x.shape[0])
        return x.mean((2, 3))  # a stand-in network: per-image outputs

    pred = Predictor(
        run, backend="inductor", precision="fp32", batch_size=8, threads=1, device=torch.device("cpu"), img_size=64
    )
    out = pred(images)  # 12 images: a full chunk of 8, then 4 padded to 8
    assert seen == [8, 8] and out.shape == (12, 3)
    torch.testing.assert_close(out, images.mean((2, 3)))
    eager = Predictor(
        run, backend="eager", precision="fp32", batch_size=8, threads=1, device=torch.device("cpu"), img_size=64
    )
    seen.clear()
    eager(images[:3])
    assert seen == [3]  # only the compiled backend pads


def test_deploy_leaves_model_untouched(model, images, reference):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levit.deploy(model, backend="eager", precision="bf16")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_fidelity_measures_disagreement():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f = fidelity(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), ref)
    assert f["top1_agreement"] == 0.5 and f["max_rel_error"] == pytest.approx(1.0)


def test_calibration_from_image_files(model, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(80, 90, 3) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    pred = levit.deploy(model, backend="eager", precision="bf16", calibration=tmp_path)
    assert pred.fidelity["images"] == 3


@pytest.mark.parametrize(
    ("backend", "precision", "words"),
    [
        ("tensorrt", "fp32", "unknown backend"),
        ("eager", "int4", "unknown precision"),
        ("eager", "int8", "not supported by backend eager"),
        ("onnxruntime", "bf16", "not supported by backend onnxruntime"),
    ],
)
def test_bad_backend_or_precision(backend, precision, words):
    with pytest.raises(DeployError, match=words):
        check_backend(backend, precision)


def test_int8_needs_calibration(model):
    with pytest.raises(DeployError, match="calibration"):
        levit.deploy(model, backend="openvino", precision="int8")


def test_missing_runtime_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    with pytest.raises(DeployError, match=r"openvino.*pip install 'levit\[export\]'"):
        check_backend("openvino", "fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployWarning)
        assert resolve("auto", "fp32")[0] != "openvino"


def test_wrong_input_shape_is_a_clear_error(model):
    pred = levit.deploy(model, backend="eager")
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        pred(torch.randn(2, 3, 32, 32))


# ---- what the CPU can do: each probe forced both ways, so the suite passes on AVX2, AVX-512 and AMX
deploy_mod = importlib.import_module("levit.runtime.deploy")  # the module (``levit.deploy`` is the function)
cpu = importlib.import_module("levit.runtime.cpu")  # the probes: patched here, every backend sees it
backend_torch = importlib.import_module("levit.runtime.backend_torch")
ort_backend = importlib.import_module("levit.runtime.backend_onnxruntime")
ov_backend = importlib.import_module("levit.runtime.backend_openvino")
kernels = importlib.import_module("levit.models.kernels")  # the one bf16 probe deploy and the kernels ask
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture
def no_bf16():
    """The CPU's bf16 probe answers "no" (an AVX2-only CPU) for the test."""
    with kernels.forced(cpu_bf16=False):
        yield


def test_eager_bf16_without_cpu_bf16_runs_plain_bf16_and_warns(no_bf16, model, images, reference):
    from torch.utils._python_dispatch import TorchDispatchMode

    with pytest.warns(DeployWarning, match="no native bf16.*slower than fp32"):
        pred = levit.deploy(model, backend="eager", precision="bf16", batch_size=5, threads=1)
    assert pred.backend == "eager" and pred.precision == "bf16"

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        out = pred(images[:5])
    assert not any("mkldnn" in op for op in ops.seen), ops.seen  # oneDNN's bf16 kernels raise on AVX2
    assert "aten.linear.default" in ops.seen or "aten.addmm.default" in ops.seen
    f = fidelity(out, reference[:5])
    assert f["max_rel_error"] < 0.05 and f["top1_agreement"] >= 0.75


def test_auto_bf16_without_cpu_bf16_keeps_fp32(monkeypatch, no_bf16, model, images, reference):
    monkeypatch.setitem(deploy_mod._AUTO_ORDER, "fp32", ("eager",))  # fast to build; the choice is tested above
    with pytest.warns(DeployWarning, match="auto runs fp32"):
        pred = levit.deploy(model, backend="auto", precision="bf16", batch_size=4, threads=1, calibration=images)
    assert pred.precision == "fp32" and pred.backend == "eager"
    assert pred.fidelity is None  # fp32 ran: nothing to report
    assert fidelity(pred(images[:4]), reference[:4])["max_rel_error"] < 1e-4


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_bf16_reports_what_runs():
    with kernels.forced(cpu_bf16=False), pytest.warns(DeployWarning, match="OpenVINO runs bf16 models in fp32"):
        assert resolve("openvino", "bf16") == ("openvino", "fp32")
    with kernels.forced(cpu_bf16=True), warnings.catch_warnings():
        warnings.simplefilter("error", DeployWarning)
        assert resolve("openvino", "bf16") == ("openvino", "bf16")
        assert resolve("auto", "bf16")[1] == "bf16"


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_does_not_pin_a_model_on_fewer_threads_than_cores(monkeypatch):
    """OpenVINO pins a compiled model's threads from the first core on: two one-thread models (levit
    serve's lanes, Ray actors) would share one core. Fewer threads than cores: no pinning."""
    monkeypatch.setattr(ov_backend, "available_cpus", lambda: 4)
    assert ov_backend.openvino_config("fp32", 1)["ENABLE_CPU_PINNING"] is False
    assert "ENABLE_CPU_PINNING" not in ov_backend.openvino_config("fp32", 4)  # all the cores: OpenVINO's default
    assert "ENABLE_CPU_PINNING" not in ov_backend.openvino_config("fp32", None)
    net = to_openvino(torch.nn.Linear(8, 4).eval(), torch.randn(2, 8))
    compiled = openvino_core().compile_model(net, "CPU", ov_backend.openvino_config("fp32", 1))
    assert compiled.get_property("ENABLE_CPU_PINNING") is False


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
@pytest.mark.parametrize("bf16_ok", [False, True])
def test_openvino_int8_unquantized_layers_follow_the_bf16_probe(bf16_ok):
    with kernels.forced(cpu_bf16=bf16_ok):
        config = ov_backend.openvino_config("int8", 1)
    assert config["INFERENCE_PRECISION_HINT"] == ("bf16" if bf16_ok else "f32")
    assert config["INFERENCE_NUM_THREADS"] == 1
    assert ov_backend.openvino_config("fp32", None)["INFERENCE_PRECISION_HINT"] == "f32"  # asked-for precisions win
    if not bf16_ok:  # OpenVINO takes the option and runs f32 on any CPU
        net = to_openvino(torch.nn.Linear(8, 4).eval(), torch.randn(2, 8))
        compiled = openvino_core().compile_model(net, "CPU", config)
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"


@pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="nncf not installed")
def test_int8_overflow_fix_follows_the_probe(monkeypatch):
    from nncf.quantization.advanced_parameters import OverflowFix

    monkeypatch.setattr(cpu, "cpu_int8_fast", lambda: False)
    assert ov_backend.overflow_fix() is OverflowFix.ENABLE  # 7-bit weights: no 16-bit saturation without VNNI
    monkeypatch.setattr(cpu, "cpu_int8_fast", lambda: True)
    assert ov_backend.overflow_fix() is None


@pytest.mark.parametrize("fast", [False, True])
def test_int8_follows_vnni(monkeypatch, fast):
    monkeypatch.setattr(cpu, "cpu_int8_fast", lambda: fast)
    if fast:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeployWarning)
            assert resolve("auto", "int8")[1] == "int8"
        return
    with pytest.warns(DeployWarning, match="no VNNI/AMX.*auto runs fp32"):
        assert resolve("auto", "int8")[1] == "fp32"
    with pytest.warns(DeployWarning, match="onnxruntime int8 runs, but slower than fp32"):
        assert resolve("onnxruntime", "int8") == ("onnxruntime", "int8")


def _weight_range(onnx_model: bytes) -> tuple[int, int]:
    """The smallest and largest int8 value of the quantized weights of every MatMul and Conv."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_model).graph
    consumers = {i: n.op_type for n in graph.node for i in n.input}
    dequant_out = {n.input[0]: consumers.get(n.output[0]) for n in graph.node if n.op_type == "DequantizeLinear"}
    ws = [
        numpy_helper.to_array(t)
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and dequant_out.get(t.name) in ("MatMul", "Conv")
    ]
    assert ws, "no int8 weights in the quantized graph"
    return min(int(w.min()) for w in ws), max(int(w.max()) for w in ws)


@pytest.mark.parametrize("saturates", [False, True], ids=["vnni", "no-vnni"])
def test_onnxruntime_int8_follows_the_saturation_probe(monkeypatch, model, images, reference, saturates):
    """Without VNNI, ONNX Runtime's u8 x s8 kernels add product pairs in 16 bits (255 x 127 x 2 does not
    fit): there the weights are quantized to 7 bits (255 x 64 x 2 fits), elsewhere to all 8. Each side
    forced, its quantized graph inspected, and within the onnxruntime int8 bounds of CASES (8-bit
    weights only where this CPU's kernels really cannot saturate)."""
    here_saturates = cpu.u8s8_saturates()
    monkeypatch.setattr(cpu, "u8s8_saturates", lambda: saturates)
    assert ort_backend.quantization_options()["reduce_range"] is saturates
    made = []
    real = ort_backend.quantize_int8
    monkeypatch.setattr(ort_backend, "quantize_int8", lambda *a: made.append(real(*a)) or made[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployWarning)
        pred = levit.deploy(model, backend="onnxruntime", precision="int8", batch_size=5, threads=1, calibration=images)
    assert len(made) == 1
    lo, hi = _weight_range(made[0])
    if saturates:
        assert lo >= -64 and hi <= 64, (lo, hi)
    else:
        assert max(-lo, hi) == 127, (lo, hi)  # per-channel symmetric: each channel's largest weight is +-127
    if here_saturates and not saturates:
        return  # 8-bit weights on a CPU without VNNI: the saturation this test shows the remedy for
    max_err, min_agree = next(c[2:] for c in CASES if c[:2] == ("onnxruntime", "int8"))
    f = fidelity(pred(images), reference)
    assert f["max_rel_error"] <= max_err and f["top1_agreement"] >= min_agree, f


def test_u8s8_saturation_probe_reads_flags_with_a_fallback(monkeypatch):
    """x86 without VNNI/AMX saturates; with any of them, or on ARM, it does not. ONNX Runtime reads the
    CPU itself, so oneDNN's ISA limit does not count."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"sse2", "avx2", "fma"})
    assert cpu.u8s8_saturates()
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        monkeypatch.setattr(cpu, "cpu_flags", lambda f=flag: {"sse2", "avx2", f})
        assert not cpu.u8s8_saturates(), flag
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"fp", "asimd", "asimddp"})  # ARM's Features line
    assert not cpu.u8s8_saturates()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: None)  # /proc/cpuinfo unreadable
    for machine, cap, saturates in (("x86_64", "AVX2", True), ("AMD64", "AMX", False), ("aarch64", "DEFAULT", False)):
        monkeypatch.setattr(cpu.platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=cap: c)
        assert cpu.u8s8_saturates() is saturates, machine


def _no_isa_limit(monkeypatch) -> None:
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def test_cpu_int8_probe_reads_flags_with_a_fallback(monkeypatch):
    _no_isa_limit(monkeypatch)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "fma"})
    assert not cpu.cpu_int8_fast()
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        monkeypatch.setattr(cpu, "cpu_flags", lambda f=flag: {"avx2", f})
        assert cpu.cpu_int8_fast()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: None)  # /proc/cpuinfo unreadable
    for cap, fast in (("AVX2", False), ("AVX512", True), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=cap: c)
        assert cpu.cpu_int8_fast() == fast


def test_int8_probe_obeys_onednn_isa_limit(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    _no_isa_limit(monkeypatch)
    assert cpu.cpu_int8_fast()
    for limit, fast in (("avx2", False), ("AVX512_CORE", False), ("AVX512_CORE_VNNI", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
        assert cpu.cpu_int8_fast() is fast, limit
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert not cpu.cpu_int8_fast()


# ---- CUDA graphs, structurally (a fake graph stands in for torch.cuda.CUDAGraph) ---------------
@pytest.fixture
def fake_graphs(monkeypatch):
    """Pretend CUDA graphs exist; a 'graph' replays ``fn`` on its static input into its static output."""
    captures: list[tuple[int, ...]] = []

    def capture(fn, static_in):
        captures.append(tuple(static_in.shape))
        static_out = fn(static_in)

        def replay():
            assert torch.is_inference_mode_enabled()  # as in a real replay: the buffers are inference tensors
            static_out.copy_(fn(static_in))

        return static_out, replay

    monkeypatch.setattr(backend_torch, "capture_cuda_graph", capture)
    monkeypatch.setattr(backend_torch, "graphs_available", lambda device: True)
    monkeypatch.setattr(deploy_mod, "_GPU_ONLY", ())  # let the CPU stand in for the GPU
    return captures


def test_cudagraph_pads_the_last_batch_and_captures_once(fake_graphs, model, images, reference):
    pred = levit.deploy(model, backend="cudagraph", batch_size=5)
    assert pred.backend == "cudagraph" and fake_graphs == [(5, 3, 64, 64)]  # captured at deploy time
    out = pred(images)  # 12 images: 5 + 5 + 2 padded to 5
    assert out.shape == (12, model.config.num_classes)
    assert fidelity(out, reference)["max_rel_error"] < 1e-4  # every chunk's own input reached the graph
    assert fake_graphs == [(5, 3, 64, 64)]  # no re-capture for the partial batch
    first = pred(images[:3])
    assert fidelity(first, reference[:3])["max_rel_error"] < 1e-4
    run = pred._run
    assert set(run.graphs) == {(5, 3, 64, 64)}
    y = run(images[:2])  # another shape: one new capture, kept
    with torch.inference_mode():  # callers in or out of inference mode alike
        run(images[2:4])
    assert fake_graphs == [(5, 3, 64, 64), (2, 3, 64, 64)]
    assert fidelity(y, reference[:2])["max_rel_error"] < 1e-4
    assert y.data_ptr() != run.graphs[(2, 3, 64, 64)][1].data_ptr()  # callers never get the static buffer


def test_cudagraph_needs_a_gpu(model):
    with pytest.raises(DeployError, match="cudagraph needs a CUDA GPU"):
        levit.deploy(model, backend="cudagraph")


def test_auto_on_a_gpu_picks_graphs_for_small_batches_inductor_for_large(monkeypatch):
    monkeypatch.setattr(backend_torch, "graphs_available", lambda device: True)
    for precision in ("fp32", "fp16", "bf16"):
        assert resolve("auto", precision, "cuda", 1) == ("cudagraph", precision)
        assert resolve("auto", precision, "cuda", 1024) == ("inductor", precision)
        assert resolve("auto", precision, "cuda", 64) == ("cudagraph", precision)  # measured on an H200
        assert resolve("auto", precision, "cuda", 65) == ("inductor", precision)
    monkeypatch.setitem(deploy_mod._AUTO_GPU_GRAPH_MAX_BATCH, "bf16", 128)  # the table is per precision
    assert resolve("auto", "bf16", "cuda", 128) == ("cudagraph", "bf16")
    assert resolve("auto", "fp16", "cuda", 128) == ("inductor", "fp16")
    monkeypatch.setattr(backend_torch, "graphs_available", lambda device: False)
    assert resolve("auto", "fp16", "cuda", 1) == ("inductor", "fp16")
    with pytest.raises(DeployError, match="CPU only"):
        resolve("openvino", "fp32", "cuda")


export_mod = importlib.import_module("levit.runtime.export")  # the package's one ONNX export and OpenVINO conversion


def _needs(package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} not installed")


# (backend, precision, the levit function doing the one-time work). int8 is checked on ONNX Runtime,
# whose calibration takes 0.5 s here; OpenVINO's (NNCF) takes 3 s, and both go through prepare_runner
LANE_CASES = [
    pytest.param("openvino", "fp32", (export_mod, "to_openvino"), marks=_needs("openvino")),
    pytest.param("onnxruntime", "fp32", (export_mod, "write_onnx"), marks=_needs("onnxruntime")),
    pytest.param("onnxruntime", "int8", (ort_backend, "quantize_int8"), marks=_needs("onnxruntime")),
]


def _alternate_signal_stack_is_sound() -> bool:
    """Whether this thread's alternate signal stack (where Python's signal handlers run) is either
    off or inside memory that is mapped writable (``/proc/self/maps``; True where there is none)."""
    if not Path("/proc/self/maps").exists():
        return True
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    ss = StackT()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(ss)) == 0
    if ss.ss_flags & 2 or not ss.ss_sp:  # SS_DISABLE
        return True
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= ss.ss_sp and ss.ss_sp + ss.ss_size <= hi:
            return perms.startswith("rw")
    return False


@pytest.mark.parametrize(("backend", "precision", "spied"), LANE_CASES)
def test_lanes_convert_once_and_match_one_deploy(monkeypatch, model, images, backend, precision, spied):
    """levit serve rebuilds every lane on a reload: one conversion (and calibration) for all lanes, each
    lane a compiled model of its own giving what one deploy() gives, bit for bit."""
    owner, name = spied
    real, calls = getattr(owner, name), []
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(name) or real(*a, **k))
    kw = {
        "backend": backend,
        "precision": precision,
        "batch_size": 4,
        "calibration": images[:8] if precision == "int8" else None,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeployWarning)  # int8 on a CPU without VNNI: tested above
        lanes = deploy_mod.deploy_lanes(model, 2, threads=1, **kw)
        assert len(calls) == 1 and len(lanes) == 2
        single = levit.deploy(model, threads=1, **kw)
    assert len(calls) == 2  # the sharing ends with the deploy_lanes call
    assert len({id(lane._run) for lane in lanes}) == 2  # a runner each: lanes run at the same time
    expected = single(images)
    for lane in lanes:
        assert (lane.backend, lane.precision, lane.threads) == (backend, precision, 1)
        assert torch.equal(lane(images), expected)
        assert lane.fidelity == single.fidelity
    # OpenVINO's CPU plugin points the thread's alternate signal stack at memory of its own and puts
    # back the one it found when it goes: with a Core per lane, lanes dropped in another order than
    # made left it on freed memory, and the next Python signal handler (SIGCHLD, once a DataLoader
    # with workers has run) crashed the process. One Core for the process keeps it sound.
    assert _alternate_signal_stack_is_sound()
    del lanes[0]  # the first made goes first
    gc.collect()
    assert _alternate_signal_stack_is_sound()
    del lanes, lane, single
    gc.collect()
    assert _alternate_signal_stack_is_sound()
