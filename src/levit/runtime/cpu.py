"""What this CPU can do: the probes every reduced-precision choice of the backends is keyed on.

Each probe reads what the machine reports (``/proc/cpuinfo``, torch's own capability checks) and has
a fallback for when it cannot be read. Callers look the probes up on this module
(``cpu.cpu_int8_fast()``), so a test forces every consumer at once by patching one name here.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_bf16_supported", "cpu_flags", "cpu_int8_fast", "u8s8_saturates"]

# int8 dot-product instructions: x86 VNNI (AVX-512 or AVX), AMX, ARM dot products
_INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}
# the x86 ones: with them a u8 x s8 dot product accumulates in 32 bits, without them in 16 first
_X86_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
# oneDNN ISA limits (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``) that leave out every int8 dot product
_ISA_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}
_X86_MACHINES = {"x86_64", "amd64", "i386", "i686", "x86"}


def cpu_bf16_supported() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (torch's own probe, as
    :func:`levit.models.kernels.cpu_bf16_supported` answers it: tests force it with ``kernels.forced``)."""
    from ..models.kernels import cpu_bf16_supported as probe

    return probe()


def cpu_flags() -> set[str] | None:
    """The CPU feature flags from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); None if unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return None


def cpu_int8_fast() -> bool:
    """Whether int8 GEMMs beat fp32 here: VNNI (AVX-512 or AVX), AMX, or ARM dot products.

    Reads /proc/cpuinfo; when it is unreadable, falls back to torch's capability (AVX-512 CPUs
    without VNNI are rare, AVX2-only ones have no int8 dot products of that width). oneDNN limited
    to an ISA without VNNI (``ONEDNN_MAX_CPU_ISA=AVX2``, which OpenVINO's oneDNN obeys too) counts
    as no.
    """
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if limit.strip().upper() in _ISA_WITHOUT_VNNI:
        return False
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & _INT8_FLAGS)
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's u8 x s8 int8 GEMMs can saturate here: an x86 CPU without VNNI or AMX.

    Without them ONNX Runtime multiplies u8 activations by s8 weights with ``VPMADDUBSW``, which adds
    each pair of products into 16 bits and clamps what does not fit (255 x 127 x 2 does not), so a
    model quantized to the full 8-bit weight range can lose its answers (ONNX Runtime's quantization
    guide describes it, with its remedies: 7-bit weights, or u8 weights). ARM's kernels widen first.
    ONNX Runtime reads the CPU itself, so oneDNN's ISA limit does not count here. When
    ``/proc/cpuinfo`` is unreadable an x86 CPU counts as saturating unless torch reports AMX: the
    remedy is exact everywhere and only costs a little precision.
    """
    flags = cpu_flags()
    if flags is not None:  # every x86-64 CPU lists sse2; ARM lists its own features
        return "sse2" in flags and not flags & _X86_VNNI_FLAGS
    if platform.machine().lower() not in _X86_MACHINES:
        return False
    return torch.backends.cpu.get_cpu_capability() != "AMX"
