"""Where levit's OpenVINO conversion (`levit.runtime.export.to_openvino`: `levit.deploy`, `levit export`,
`levit bench --suite modern`) starts from: the module's ONNX export, read by OpenVINO's ONNX frontend
(what it does), or the module itself, converted by OpenVINO's PyTorch frontend (which traces it
first). Per model: the CPU seconds of each conversion and compile, the two forms' logits against the
eager form's, and their speed timed in interleaved rounds (one thread, batch 16, the suite's protocol).

    python benchmarks/openvino_source.py                    # the --quick set's 11 models
    python benchmarks/openvino_source.py levit_128s fastvit_sa12 --rounds 9

A ratio above 1 means the form built from the ONNX export runs faster.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics

import openvino as ov
import torch

from levit.paper.field import eager_form, relative_error
from levit.paper.speed import MODERN_QUICK_MODELS
from levit.paper.timing import interleaved
from levit.runtime.backend_onnxruntime import onnx_bytes
from levit.runtime.backend_openvino import openvino_compiled
from levit.runtime.export import openvino_model_from_onnx


def cpu_s() -> float:
    """This process's CPU seconds so far (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    """Parse the flags, build both forms of each model, print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=list(MODERN_QUICK_MODELS))
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    p.add_argument("--window", type=float, default=1.0, help="seconds per form per round (default 1)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        "| model | from the module: convert + compile | from ONNX: export + convert + compile | rel. error module / ONNX | speed ONNX / module |"
    )
    print("|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name in args.models:
        eager, _, (xc, ref), x, *_ = eager_form(name, None, 16, 0)
        module = copy.deepcopy(eager).float().eval()
        t = cpu_s()
        by_pytorch = ov.convert_model(module, example_input=x)  # OpenVINO's PyTorch frontend
        by_pytorch.reshape({by_pytorch.inputs[0]: ov.PartialShape([-1, *x.shape[1:]])})
        from_module = openvino_compiled(by_pytorch, "fp32", 1)
        t_module = cpu_s() - t
        t = cpu_s()
        exported = onnx_bytes(module, x)
        t_export = cpu_s() - t
        from_onnx = openvino_compiled(openvino_model_from_onnx(exported), "fp32", 1)
        t_onnx = cpu_s() - t - t_export
        errs = [relative_error(f(xc), ref) for f in (from_module, from_onnx)]
        secs = interleaved(
            {"module": lambda f=from_module, x=x: f(x), "onnx": lambda f=from_onnx, x=x: f(x)},
            rounds=args.rounds,
            window=args.window,
        )
        ratio = statistics.median(secs["module"]) / statistics.median(secs["onnx"])
        totals[0] += t_module
        totals[1] += t_onnx
        print(
            f"| {name} | {t_module:.1f} s | {t_export:.1f} + {t_onnx:.1f} s | {errs[0]:.1e} / {errs[1]:.1e} | {ratio:.3f} |",
            flush=True,
        )
    print(
        f"\nOpenVINO's conversion and compile, all models: {totals[0]:.0f} s from the module, {totals[1]:.0f} s from the ONNX export (which ONNX Runtime's form needs anyway)"
    )


if __name__ == "__main__":
    main()
