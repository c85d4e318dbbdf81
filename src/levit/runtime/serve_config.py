"""``ServeConfig``: the settings of ``levit serve`` besides the model, in a module that imports no torch,
so that the deployments of ``levit serve --ray`` that hold no model (its front, and the placeholder
answering while the replicas load: :mod:`levit.runtime.serve_ray_front`) start without it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .options import OptionError, check_model_options

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """Everything the service and its server need besides the model (picklable, for Ray replicas),
    validated once (:class:`~levit.runtime.options.OptionError` names the field).

    ``crop_pct`` ``None`` (the default) keeps the model's own, as ``levit predict`` does; ``threads``,
    ``lanes`` and ``decode_workers`` ``None`` fill the cores (:func:`levit.runtime.pipeline.lane_layout`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32  # levit predict's CPU batch
    max_wait_ms: float = 5.0
    max_body_mb: float = 20.0
    max_pixels: int = 50_000_000  # header check before decoding: a 30000x30000 PNG never gets decoded
    topk: int = 5
    crop_pct: float | None = None  # None: the model's pretrained_cfg
    decoder: str = "pil"  # levit.data.preprocess.Preprocess's decoder, as levit predict's --decoder
    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None  # CPU threads per model lane (None: cores // lanes; pipeline.lane_layout)
    lanes: int | None = None  # batches computed at once (None: cores // threads, or a lane per core up to 8)
    decode_workers: int | None = None  # threads decoding at once (None: the CPU count); bounds memory too
    max_queue: int | None = None  # classify requests admitted at once, beyond: 429 (None: queue_bound)
    read_timeout_s: float = 30.0  # a client that has not sent its whole body by then gets 408
    max_header_bytes: int = 16 * 1024  # a larger request head gets 431 (the single-process server)
    header_timeout_s: float = 10.0  # a request head not in by then: 408, connection closed
    grpc_port: int | None = None  # KServe v2 over gRPC on this port too (0: a free one; the single process)
    drain_timeout_s: float = 30.0  # SIGTERM: longest wait for in-flight requests
    quiet: bool = False
    model_name: str | None = None  # reported in each answer (default: the model's variant)
    checkpoint: str | None = None  # the file the model was read from: SIGHUP re-reads it
    checkpoints: tuple[tuple[str, str], ...] = ()  # several models: (name, the file each was read from)
    model_control: bool = True  # POST /v2/repository/models/{name}/load may load a new version
    calibration: tuple[str, ...] | None = None  # int8: calibration image files/folders

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "topk",
            "threads",
            "lanes",
            "decode_workers",
            "max_pixels",
            "max_queue",
            "max_header_bytes",
        ):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError(name, f"must be >= 1, got {v}")
        if self.max_wait_ms < 0:
            raise OptionError("max_wait_ms", f"must be >= 0, got {self.max_wait_ms}")
        for name in ("max_body_mb", "read_timeout_s", "drain_timeout_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise OptionError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("port", "grpc_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 65535:
                raise OptionError(name, f"must be in 0..65535, got {v}")
        check_model_options(self)
        if self.precision == "int8" and not self.calibration:
            raise OptionError("precision", "int8 needs {calibration} IMAGES (files or folders)")
        if self.calibration and self.precision != "int8":  # as PredictOptions: unused images are a mistake
            raise OptionError("calibration", "calibrates an int8 model: add {precision} int8")

    def queue_bound(self, lanes: int) -> int:
        """Classify requests admitted at once on ``lanes`` model lanes: ``max_queue``, by default one
        full batch per lane and a quarter batch more. An admitted request then finds about the lanes'
        batches ahead of it, so that under overload the requests taken keep their latency (one batch
        time to wait, one to compute) and the memory they hold stays that of about ``lanes x
        max_batch_size`` uploads; the others get 429 with a ``Retry-After`` that spreads their retries
        (:meth:`levit.runtime.batcher.Batcher.retry_after_s`). The quarter batch is for requests
        whose client has just gone: each holds its place until the server reads the connection's
        end, and a client that reconnects at once must not find its own old request in the last
        place (docs/serving.md, "Back-pressure and deadlines")."""
        return self.max_queue or lanes * self.max_batch_size + max(1, self.max_batch_size // 4)

    def replace(self, **changes: Any) -> ServeConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)
