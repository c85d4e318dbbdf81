"""Classify image files with the official evaluation preprocessing, from a handful to millions.

- :func:`predict_paths`: a small job's results as a list;
- :func:`iter_predictions`: the rows one by one, for any number of images, in constant memory;
- :func:`predict_files`: a whole job (``levit predict``): rows streamed to a resumable results file
  (:mod:`levit.runtime.writers`), bad files reported and counted, a progress bar, locally or on Ray.

All three run :mod:`levit.runtime.pipeline` (decoding in worker processes while the model runs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ..data.images import IMAGE_EXTENSIONS, find_images
from ..data.transforms import DEFAULT_CROP_PCT
from ..errors import LeViTError
from .pipeline import DEFAULT_MAX_PIXELS, Preprocess, Runner, class_names_for, iter_batches, iter_batches_ray

__all__ = ["Summary", "class_names_for", "iter_predictions", "list_inputs", "predict_files", "predict_paths"]


def _first(runner: Runner | None) -> Callable[[Tensor], Tensor] | None:
    """The (first) backend of ``runner``: one callable, or one per lane."""
    return runner[0] if isinstance(runner, (list, tuple)) else runner  # type: ignore[return-value]


def list_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files to classify: files as given plus the images under each folder. A missing path
    raises ``FileNotFoundError``; finding no image at all raises :class:`LeViTError` saying where and
    what was looked for."""
    paths = list(paths)
    files = find_images(paths)
    if not files:
        where = ", ".join(map(str, paths)) or "(no paths given)"
        raise LeViTError(f"no image files in {where} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return files


def iter_predictions(
    model: nn.Module,
    paths: Iterable[str | os.PathLike],
    *,
    topk: int = 5,
    batch_size: int | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
    fast_decode: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    include_logits: bool = False,
    class_names: Sequence[str] | None = None,
    runner: Runner | None = None,
) -> Iterator[dict]:
    """One row per image under ``paths`` (files and folders), in order, in constant memory:
    ``{"path", "top": [{"class", "label", "prob"}, ...], "error"}`` (+ ``"logits"``); an unreadable
    file's row has ``error`` set and an empty ``top``. Arguments as :func:`levit.runtime.pipeline.iter_batches`;
    ``crop_pct``, ``fast_decode`` and ``max_pixels`` as :class:`levit.runtime.pipeline.Preprocess`.

    Example:
        >>> for row in iter_predictions(model, ["photos/"], topk=1):
        ...     print(row["path"], row["top"][0]["label"] if row["top"] else row["error"])
    """
    pre = Preprocess.for_model(
        _first(runner) or model, crop_pct=crop_pct, fast_decode=fast_decode, max_pixels=max_pixels
    )
    for rows in iter_batches(
        model,
        list_inputs(paths),
        topk=topk,
        batch_size=batch_size,
        preprocess=pre,
        workers=workers,
        threads=threads,
        device=device,
        include_logits=include_logits,
        class_names=class_names,
        runner=runner,
    ):
        yield from rows


def predict_paths(
    model: nn.Module,
    paths: Iterable[str | os.PathLike],
    *,
    topk: int = 5,
    batch_size: int = 32,
    crop_pct: float = DEFAULT_CROP_PCT,
    progress: bool = True,
    on_error: Callable[[Path, str], None] | None = None,
    runner: Runner | None = None,
    **kwargs: object,
) -> list[dict]:
    """Top-k predictions for every readable image under ``paths``, as a list (small jobs; see
    :func:`iter_predictions` and :func:`predict_files` for large ones).

    Returns one dict per image: ``{"path", "top": [{"class", "label", "prob"}, ...]}``. Unreadable
    images are passed to ``on_error(path, message)`` and skipped; no image at all is a
    :class:`LeViTError`. The model is fused first when it is an unfused LeViT (same outputs,
    faster). ``runner`` (e.g. a :func:`levit.deploy` predictor) replaces the model's forward pass:
    logits from a (B, 3, H, W) batch. ``kwargs``: the other options of :func:`iter_predictions`.
    """
    files = list_inputs(paths)
    results = []
    bar = _bar(len(files), progress and len(files) > batch_size)
    for row in iter_predictions(
        model, files, topk=topk, batch_size=batch_size, crop_pct=crop_pct, runner=runner, **kwargs
    ):  # type: ignore[arg-type]
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

    @property
    def images_per_s(self) -> float:
        """Images (classified or not) processed per second of this run."""
        return (self.classified + self.failed) / self.seconds if self.seconds > 0 else 0.0


def predict_files(
    model: nn.Module,
    files: Sequence[str | os.PathLike],
    *,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    topk: int = 5,
    batch_size: int | None = None,
    preprocess: Preprocess | None = None,
    include_logits: bool = False,
    class_names: Sequence[str] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    runner: Runner | None = None,
    ray: bool | str = False,
    ray_backend: dict | None = None,
    on_rows: Callable[[list[dict]], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
    progress: bool = True,
) -> Summary:
    """Classify ``files`` (a list, e.g. from :func:`list_inputs`) as one job.

    Rows go to ``output`` (``.jsonl``, ``.csv`` or ``.parquet``; :class:`levit.runtime.writers.ResultWriter`:
    written and flushed batch by batch, ``resume`` skips the images already there, an existing file
    needs ``resume`` or ``overwrite``) and/or to ``on_rows(rows)`` per batch. Each unreadable file is
    passed to ``on_error(path, reason)`` and gets an error row; the run goes on. ``ray``: run on Ray
    Data (``True``: the cluster already initialised here, else a new local one; a string: the address
    of one to join), the backend given as ``ray_backend`` (:func:`levit.deploy` arguments, built on
    each actor) instead of ``runner``. The other arguments are :func:`levit.runtime.pipeline.iter_batches`'s.
    """
    from .writers import ResultWriter

    use_ray = ray is not False and ray is not None
    if use_ray and runner is not None:
        raise LeViTError("on Ray the backend is built on each actor: pass ray_backend=dict(...), not runner")
    start = time.perf_counter()
    summary = Summary(output=Path(output) if output is not None else None)
    k = min(topk, model.config.num_classes)
    writer = (
        ResultWriter(output, k=k, include_logits=include_logits, resume=resume, overwrite=overwrite)
        if output is not None
        else None
    )
    try:
        todo = [os.fspath(f) for f in files]
        if writer is not None and writer.done:
            todo = [f for f in todo if f not in writer.done]
            summary.already_done = len(files) - len(todo)
        pre = preprocess or Preprocess.for_model(_first(runner) or model)
        if use_ray:
            batches = iter_batches_ray(
                model,
                todo,
                address=ray if isinstance(ray, str) and ray else None,
                topk=topk,
                batch_size=batch_size or 32,
                preprocess=pre,
                include_logits=include_logits,
                class_names=class_names,
                backend=ray_backend,
            )
        else:
            batches = iter_batches(
                model,
                todo,
                topk=topk,
                batch_size=batch_size,
                preprocess=pre,
                workers=workers,
                threads=threads,
                device=device,
                include_logits=include_logits,
                class_names=class_names,
                runner=runner,
            )
        bar = None
        for rows in batches:
            if bar is None:  # made after the first batch: the decoding workers fork before its thread starts
                bar = _bar(len(todo), progress and len(todo) > len(rows))
            if writer is not None:
                writer.write(rows)
            for r in rows:
                if r["error"] is None:
                    summary.classified += 1
                else:
                    summary.failed += 1
                    if on_error is not None:
                        on_error(r["path"], r["error"])
            if on_rows is not None:
                on_rows(rows)
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
    except BaseException:
        if writer is not None:
            writer.abort()  # the partial file stays, flushed, for --resume
        raise
    if writer is not None:
        writer.close()
    summary.seconds = time.perf_counter() - start
    return summary
