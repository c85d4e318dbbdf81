"""Classify image files with the model's own preprocessing, from a handful to millions.

- :func:`predict_paths`: a small job's results as a list;
- :func:`iter_predictions`: the rows one by one, for any number of images, in constant memory;
- :func:`predict_files`: a whole job (``levit predict``): the backend built (:func:`build_runner`),
  rows streamed to a resumable results file (:mod:`levit.runtime.writers`), bad files reported and
  counted, a progress bar, locally or on Ray.

Each takes one :class:`~levit.runtime.options.PredictOptions` (or its fields as keywords) and runs
:mod:`levit.runtime.pipeline` (or :mod:`levit.runtime.ray_data`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..data.images import IMAGE_EXTENSIONS, find_images
from ..errors import LeViTError
from .options import CALIBRATION_IMAGES, PredictOptions
from .pipeline import Runner, class_names_for, iter_batches, lane_layout, preprocess_for

__all__ = [
    "PredictOptions",
    "Summary",
    "build_runner",
    "class_names_for",
    "iter_predictions",
    "list_inputs",
    "predict_files",
    "predict_paths",
]


def _options(options: PredictOptions | None, fields: dict[str, Any]) -> PredictOptions:
    """``options`` with ``fields`` replaced (a keyword API over the one options object)."""
    opts = options or PredictOptions()
    return opts.replace(**fields) if fields else opts


def list_inputs(paths: Iterable[str | os.PathLike], *, skipped: list[Path] | None = None) -> list[Path]:
    """The image files to classify: files as given plus the images under each folder. A missing path
    raises ``FileNotFoundError``; finding no image at all raises :class:`LeViTError` saying where and
    what was looked for. Files in folders without an image extension go to ``skipped`` when given
    (:func:`levit.data.images.find_images`)."""
    paths = list(paths)
    files = find_images(paths, skipped=skipped)
    if not files:
        where = ", ".join(map(str, paths)) or "(no paths given)"
        raise LeViTError(f"no image files in {where} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return files


def iter_predictions(
    model: nn.Module,
    paths: Iterable[str | os.PathLike],
    options: PredictOptions | None = None,
    *,
    runner: Runner | None = None,
    **fields: Any,
) -> Iterator[dict]:
    """One row per image under ``paths`` (files and folders), in order, in constant memory:
    ``{"path", "top": [{"class", "label", "prob"}, ...], "error"}`` (+ ``"logits"``); an unreadable
    file's row has ``error`` set and an empty ``top``. ``options`` (or its ``fields`` as keywords,
    e.g. ``topk=1``): :class:`~levit.runtime.options.PredictOptions`; ``runner``: a backend, as
    :func:`levit.runtime.pipeline.iter_batches` takes it.

    Example:
        >>> for row in iter_predictions(model, ["photos/"], topk=1):
        ...     print(row["path"], row["top"][0]["label"] if row["top"] else row["error"])
    """
    for rows in iter_batches(model, list_inputs(paths), _options(options, fields), runner=runner):
        yield from rows


def predict_paths(
    model: nn.Module,
    paths: Iterable[str | os.PathLike],
    options: PredictOptions | None = None,
    *,
    progress: bool = True,
    on_error: Callable[[Path, str], None] | None = None,
    runner: Runner | None = None,
    **fields: Any,
) -> list[dict]:
    """Top-k predictions for every readable image under ``paths``, as a list (small jobs; see
    :func:`iter_predictions` and :func:`predict_files` for large ones).

    Returns one dict per image: ``{"path", "top": [{"class", "label", "prob"}, ...]}``. Unreadable
    images are passed to ``on_error(path, message)`` and skipped; no image at all is a
    :class:`~levit.errors.LeViTError`. Options as :func:`iter_predictions`.
    """
    opts = _options(options, fields)
    files = list_inputs(paths)
    results = []
    bar = _bar(len(files), progress and len(files) > opts.default_batch_size(on_cpu=True))
    for row in iter_predictions(model, files, opts, runner=runner):
        if bar is not None:
            bar.update(1)
        error = row.pop("error")
        if error is not None:
            if on_error is not None:
                on_error(Path(row["path"]), error)
            continue
        results.append(row)
    if bar is not None:
        bar.close()
    return results


def build_runner(
    model: nn.Module,
    options: PredictOptions,
    files: Sequence[str | os.PathLike] = (),
    on_note: Callable[[str], None] | None = None,
) -> Runner | None:
    """The backend ``options`` ask for (``None``: the eager fp32 model runs itself).

    On the CPU, one one-thread copy of the backend per lane (:func:`levit.runtime.pipeline.lane_layout`:
    ``threads`` lanes, default one per core, at most eight copies for their memory), which then share
    the cores; an int8 model calibrates once, so it is one copy on all the threads (``threads``), as is
    any backend on a GPU. int8 calibrates on ``options.calibration``, else the first
    :data:`~levit.runtime.options.CALIBRATION_IMAGES` of ``files``
    (:func:`levit.runtime.calibration.load_calibration`); its agreement with fp32 goes to ``on_note``.
    """
    if not options.uses_runtime:
        return None
    from ..utils import available_cpus
    from .calibration import load_calibration
    from .deploy import deploy_lanes

    calibration = None
    if options.precision == "int8":  # decoded exactly as the job's images will be
        sources = list(options.calibration or files[:CALIBRATION_IMAGES])
        calibration = load_calibration(sources, preprocess_for(model, options), CALIBRATION_IMAGES)
    on_cpu = options.device in (None, "cpu")
    lanes, per_lane = lane_layout(options.threads, 1 if options.threads else None, available_cpus())
    if not on_cpu or calibration is not None:
        lanes = 1
    runners = deploy_lanes(
        model,
        lanes,
        threads=per_lane if lanes > 1 else options.threads,
        backend=options.backend,
        precision=options.precision,
        batch_size=options.default_batch_size(on_cpu),
        calibration=calibration,
    )
    first = runners[0]
    if first.fidelity and on_note is not None:
        f = first.fidelity
        on_note(
            f"{first.backend} {first.precision}: top-1 agreement with fp32 {f['top1_agreement'] * 100:.1f}% on "
            f"{f['images']} images, max relative logit error {f['max_rel_error']:.2e}"
        )
    return runners if lanes > 1 else first


def _bar(total: int, enabled: bool):  # -> tqdm | None
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True, smoothing=0.1, disable=None)


@dataclass
class Summary:
    """What a :func:`predict_files` run did: images classified, unreadable (error rows), already in
    the output before it started (``resume``), its wall-clock seconds and the output file."""

    classified: int = 0
    failed: int = 0
    already_done: int = 0
    seconds: float = 0.0
    output: Path | None = None

    _bar: Any = field(default=None, repr=False, compare=False)

    @property
    def images_per_s(self) -> float:
        """Images (classified or not) processed per second of this run."""
        return (self.classified + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def count(self, rows: list[dict], on_error: Callable[[str, str], None] | None = None) -> None:
        """Count one batch's rows, passing each error row to ``on_error(path, reason)``."""
        for r in rows:
            if r["error"] is None:
                self.classified += 1
            else:
                self.failed += 1
                if on_error is not None:
                    on_error(r["path"], r["error"])

    def progress(self, total: int, done: int, close: bool = False) -> None:
        """Advance the progress bar by ``done`` of ``total`` images (made at the first batch, after
        the decoding workers have forked, and only for a job of more than one batch)."""
        if close:
            if self._bar:
                self._bar.close()
            return
        if self._bar is None:
            self._bar = _bar(total, total > done) or False
        if self._bar:
            self._bar.update(done)


def predict_files(
    model: nn.Module,
    files: Sequence[str | os.PathLike],
    options: PredictOptions | None = None,
    *,
    on_rows: Callable[[list[dict]], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    progress: bool = True,
    runner: Runner | None = None,
) -> Summary:
    """Classify ``files`` (a list, e.g. from :func:`list_inputs`) as one job: ``levit predict``.

    The backend is built as ``options`` say (:func:`build_runner`; on Ray, by each actor). Rows go to
    ``options.output`` (:class:`levit.runtime.writers.ResultWriter`: written and flushed batch by
    batch, ``resume`` skips the images already there, an existing file needs ``resume`` or
    ``overwrite``) and/or to ``on_rows(rows)`` per batch. Each unreadable file is passed to
    ``on_error(path, reason)`` and gets an error row; the run goes on. ``on_note`` receives one-line
    notes about the run (an int8 model's agreement with fp32); ``progress`` shows a bar. ``runner``:
    a backend built beforehand (as :func:`build_runner` builds it) instead of the one ``options`` ask for.
    """
    from .writers import ResultWriter

    opts = options or PredictOptions()
    start = time.perf_counter()
    summary = Summary(output=Path(opts.output) if opts.output is not None else None)
    k = min(opts.topk, model.config.num_classes)
    writer = None
    if opts.output is not None:
        writer = ResultWriter(
            opts.output, k=k, include_logits=opts.include_logits, resume=opts.resume, overwrite=opts.overwrite
        )
    try:
        todo = [os.fspath(f) for f in files]
        if writer is not None and writer.done:
            todo = [f for f in todo if f not in writer.done]
            summary.already_done = len(files) - len(todo)
        for rows in _batches(model, todo, opts, on_note, runner):
            if writer is not None:
                writer.write(rows)
            summary.count(rows, on_error)
            if on_rows is not None:
                on_rows(rows)
            if progress:
                summary.progress(len(todo), len(rows))
        summary.progress(0, 0, close=True)
    except BaseException:
        if writer is not None:
            writer.abort()  # the partial file stays, flushed, for resume
        raise
    if writer is not None:
        writer.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _batches(
    model: nn.Module,
    todo: list[str],
    opts: PredictOptions,
    on_note: Callable[[str], None] | None,
    runner: Runner | None,
) -> Iterator[list[dict]]:
    """The rows of ``todo``, batch by batch: on Ray Data, or here with ``runner`` or the backend
    ``opts`` ask for."""
    calibration_files = list(opts.calibration or todo[:CALIBRATION_IMAGES])
    if opts.ray is not None:
        if runner is not None:
            raise LeViTError("on Ray each actor builds its backend from the options: pass no runner")
        from .ray_data import iter_batches_ray

        return iter_batches_ray(model, todo, opts, calibration=calibration_files)
    if runner is None and todo:
        runner = build_runner(model, opts, calibration_files, on_note)
    return iter_batches(model, todo, opts, preprocess=preprocess_for(model, opts), runner=runner)
