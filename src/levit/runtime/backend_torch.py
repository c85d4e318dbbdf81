"""The PyTorch backends of :func:`levit.deploy`: ``eager``, ``inductor`` and ``cudagraph``.

Each runner maps a (B, 3, H, W) float32 tensor to (B, classes) float32 logits:

- ``eager``: the fused module under ``torch.inference_mode``;
- ``inductor``: ``torch.compile`` with weight freezing (constant-folded, prepacked weights);
- ``cudagraph``: the fused eager module replayed from CUDA graphs (one capture per input shape,
  a static input buffer): no kernel-launch overhead on a GPU, where small batches are launch-bound.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["TORCH_DTYPES", "capture_cuda_graph", "graph_runner", "graphs_available", "torch_runner"]

#: the torch dtype of each precision these backends run
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def graphs_available(device: torch.device | str) -> bool:
    """Whether CUDA graphs can run on ``device`` (a CUDA device, CUDA available)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def torch_runner(module: nn.Module, precision: str, compile: bool) -> Callable[[Tensor], Tensor]:
    """``module`` (a copy, cast to ``precision``) in eager mode, or compiled by inductor with frozen
    weights when ``compile``."""
    dtype = TORCH_DTYPES[precision]
    module = copy.deepcopy(module).eval().to(dtype)
    if compile:
        module = torch.compile(module, options={"freezing": True})

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return module(x.to(dtype)).float()

    return run


def capture_cuda_graph(fn: Callable[[Tensor], Tensor], static_in: Tensor) -> tuple[Tensor, Callable[[], None]]:
    """Warm ``fn`` up on a side stream, then capture ``fn(static_in)`` into one CUDA graph.

    Returns the graph's static output and its replay function. :func:`graph_runner` looks it up on
    this module at each capture, so a test can put a fake graph in its place on a machine without CUDA.
    """
    side = torch.cuda.Stream(device=static_in.device)
    side.wait_stream(torch.cuda.current_stream(static_in.device))
    with torch.cuda.stream(side):
        for _ in range(3):  # cuBLAS/cuDNN workspaces and autotuning happen outside the capture
            fn(static_in)
    torch.cuda.current_stream(static_in.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)
    return static_out, graph.replay


def graph_runner(module: nn.Module, precision: str) -> Callable[[Tensor], Tensor]:
    """Replay ``module`` from CUDA graphs: one capture per input shape, each with a static input buffer.

    The returned function keeps its graphs in ``run.graphs`` (shape -> (input, output, replay)).
    """
    dtype = TORCH_DTYPES[precision]
    module = copy.deepcopy(module).eval().to(dtype)
    graphs: dict[tuple[int, ...], tuple[Tensor, Tensor, Callable[[], None]]] = {}

    @torch.inference_mode()  # the static buffers are inference tensors: only ever touched in here
    def run(x: Tensor) -> Tensor:
        key = tuple(x.shape)
        if key not in graphs:
            static_in = torch.empty(key, dtype=dtype, device=x.device)
            static_in.copy_(x)
            static_out, replay = capture_cuda_graph(module, static_in)
            graphs[key] = (static_in, static_out, replay)
        static_in, static_out, replay = graphs[key]
        static_in.copy_(x)
        replay()
        return static_out.to(torch.float32, copy=True)  # the static buffer is overwritten by the next replay

    run.graphs = graphs  # type: ignore[attr-defined]
    return run
