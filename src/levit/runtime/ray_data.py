"""Prediction on a Ray cluster (``levit predict --ray``): Ray Data ``map_batches`` over the file list,
each actor running the same :class:`~levit.data.preprocess.Preprocess` and backend as a local run
(:mod:`levit.runtime.pipeline`), so the rows are the same."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data.preprocess import Preprocess, collate, load_item
from ..errors import LeViTError
from .options import PredictOptions
from .pipeline import RowMaker, class_names_for, inference_model, preprocess_for
from .ray_setup import init_quietly

__all__ = ["RayClassifier", "iter_batches_ray"]


class RayClassifier:
    """A Ray Data ``map_batches`` actor: one torch thread (one actor per CPU), the model (or
    ``levit.deploy(model, **backend)``), rows as a pyarrow table (:mod:`levit.runtime.writers`' schema)."""

    def __init__(self, model_ref: tuple, preprocess: Preprocess, rows: RowMaker, backend: dict | None) -> None:
        import ray

        torch.set_num_threads(1)
        self.model = inference_model(ray.get(model_ref[0]))  # a reference: the weights travel once per node
        self.run: Callable[[Tensor], Tensor] = self.model
        if backend:
            from .deploy import deploy

            self.run = deploy(self.model, **backend)
        self.pre, self.rows = preprocess, rows

    def __call__(self, batch: dict[str, np.ndarray]):
        """The rows of one Ray Data batch of paths, as a pyarrow table."""
        from .writers import rows_to_table

        rows = self.rows(self.run, collate([load_item(self.pre, p) for p in batch["path"].tolist()]))
        return rows_to_table(rows, include_logits=self.rows.include_logits)


def _backend_recipe(options: PredictOptions, calibration: Sequence[str] | None) -> dict | None:
    """The :func:`levit.deploy` arguments each actor builds its backend from (one thread each), or
    ``None`` for the eager fp32 model."""
    if not options.uses_runtime:
        return None
    return {
        "backend": options.backend,
        "precision": options.precision,
        "threads": 1,
        "calibration": list(calibration) if calibration else None,
        "batch_size": options.default_batch_size(on_cpu=True),
    }


def iter_batches_ray(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    options: PredictOptions | None = None,
    *,
    preprocess: Preprocess | None = None,
    calibration: Sequence[str] | None = None,
    actors: int | None = None,
) -> Iterator[list[dict]]:
    """:func:`levit.runtime.pipeline.iter_batches` on a Ray cluster, with the same rows in input order.

    ``options.ray``: the address of a running cluster (``""`` or ``None``: the one already initialised
    in this process, else a new one-machine cluster); its backend fields pick what each actor runs
    (``calibration``: the int8 calibration images). ``actors``: how many (default: the cluster's CPUs).
    The files must be readable at the same paths on every node (a shared file system).
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise LeViTError("--ray needs Ray Data: pip install 'levit[cluster]'") from None
    import logging

    opts = options or PredictOptions()
    paths = [os.fspath(p) for p in paths]
    names = list(opts.class_names) if opts.class_names is not None else class_names_for(model)
    if not paths:
        return
    if not ray.is_initialized():
        init_quietly(opts.ray or None)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the rows in input order, as a local run writes them
    ctx.enable_progress_bars = False  # levit's own bar counts the rows
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no INFO plan dumps or progress-bar notices
    n = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    model_ref = ray.put(inference_model(model).cpu())
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, min(n * 4, len(paths))))
    ds = ds.map_batches(
        RayClassifier,
        fn_constructor_kwargs={
            "model_ref": (model_ref,),  # in a tuple: Ray passes the reference, the actor fetches it
            "preprocess": preprocess or preprocess_for(model, opts),
            "rows": RowMaker(torch.device("cpu"), min(opts.topk, model.config.num_classes), names, opts.include_logits),
            "backend": _backend_recipe(opts, calibration),
        },
        batch_size=opts.default_batch_size(on_cpu=True),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_cpus=1,
    )
    from .writers import table_to_rows

    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = table_to_rows(table)
        if rows:
            yield rows
    del model_ref
