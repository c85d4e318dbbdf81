"""LeViT against today's efficient models (``levit bench --suite modern``): a table and a Pareto picture.

Every model runs in its best inference form, and every model gets the same treatment:

1. built with random weights (speed does not depend on them), its BatchNorm statistics randomised
   so that folding them is a real test, at the resolution its top-1 was measured at
   (:mod:`levit.paper.accuracy`);
2. put in its eager inference form: this library's fused LeViT, timm's ``reparameterize_model`` for
   the others, kept only if its logits equal the model's as built (:data:`TOLERANCE`, relative);
3. each runtime of the run (eager, OpenVINO and ONNX Runtime at fp32 by default) built from that
   form, its logits checked against the eager form's on :data:`CHECK_BATCH` random images at the
   timed resolution; the forms that pass are timed on the timed input against each other in two
   short interleaved rounds, the fastest is kept and the others are released;
4. the kept forms timed together in interleaved rounds (:func:`levit.paper.timing.interleaved`), in
   groups of the models nearest in top-1 (:data:`GROUP_SIZE`, a group cut short where its forms hold
   more than :data:`MEMORY_SHARE` of the machine's memory), the same threads and batch for all;
   a row reports the median img/s with min and max.

:func:`pareto_front`, :func:`add_front_distance` and :func:`levit_ratios` read the result;
:func:`format_field_table` and :func:`plot_field` show it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import LeViTError
from ..utils import memory_limit, num_threads, process_memory, save_figure
from .accuracy import FIELD_ACCURACY, MODERN_QUICK_MODELS
from .speed import (
    BENCH_MODELS,
    SpeedRun,
    bench_inference_form,
    bench_size,
    build_bench_model,
    device_name,
    plot_target,
)
from .timing import interleaved

__all__ = [
    "ALL_EXECUTORCH_MODELS",
    "ALL_QUICK_MODELS",
    "ALL_SUBSET_MODELS",
    "CHECK_BATCH",
    "FRONT_BAND",
    "GROUP_SIZE",
    "PROTOCOLS",
    "RUNTIMES",
    "TOLERANCE",
    "TRIAL_DROP",
    "FastForm",
    "NoFormError",
    "add_front_distance",
    "all_cores",
    "best_form",
    "eager_form",
    "format_field_table",
    "format_protocols",
    "front_in_band",
    "levit_ratios",
    "pareto_front",
    "plot_field",
    "plot_protocols",
    "protocol_plot_path",
    "protocol_runs",
    "relative_error",
    "run_field",
    "run_protocols",
]

# a fast form must give its eager form's logits: max |difference| over max |logit|, fp32 rounding only
TOLERANCE = 1e-4
# the check runs on its own small batch: every runtime here takes any batch (the exported graphs keep
# the batch axis dynamic), and a large model's batch of 16 would cost more than the timing itself
CHECK_BATCH = 2
# the runtimes `auto` chooses each model's form from, all at fp32
RUNTIMES: tuple[str, ...] = ("eager", "openvino", "onnxruntime")
# the trial's second round races only the forms within this factor of the fastest in its first: a
# slower one cannot win, and its calls are the trial's longest (docs/field.md, "How long a run takes")
TRIAL_DROP = 1.5
# the models timed in the same interleaved rounds (nearest in top-1): every kept form holds its
# compiled runtime, so a run over the whole suite would otherwise hold them all at once
GROUP_SIZE = 8
# the kept forms of a group may hold at most this share of the machine's memory: past it the group is
# timed as it stands and the model just added starts the next one, so that the next model's build
# (its eager, ONNX Runtime and OpenVINO forms alive at once) still has room beside them
# (docs/field.md, "Memory", has the sizes)
MEMORY_SHARE = 0.4
# the accuracy range the docs read the front in (the range LeViT's variants span, with room either side)
FRONT_BAND: tuple[float, float] = (70.0, 84.0)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` (a scale-free distance between two sets of logits)."""
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.shape != ref.shape:
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Running statistics and affine terms of every BatchNorm set near, but not at, their defaults."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.05)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.4 + 0.8)
            if m.affine:
                with torch.no_grad():
                    m.bias.add_(torch.randn(n, generator=g) * 0.02)


class NoFormError(LeViTError):
    """No runtime of the run gave model ``name`` a form that passed (``forms``: each one's reason)."""

    def __init__(self, name: str, forms: dict[str, dict]) -> None:
        self.name, self.forms = name, forms
        reasons = "; ".join(f"{k}: {v['error']}" for k, v in forms.items())
        super().__init__(f"{name}: no form passed the check against eager ({reasons})")


@dataclass
class FastForm:
    """What :func:`best_form` chose for one model: its runner on the timed input and what it found."""

    run: Callable[[], object]  # one call of the chosen form on the timed input
    backend: str  # the chosen runtime
    forms: dict[str, dict]  # per runtime: trial img/s, relative error against eager, or the error
    reparam_rel_err: float  # eager inference form against the model as built
    eager_form: str  # "fused" / "reparameterized" / "as built" (when those logits differed from the built model's)
    params: int
    flops: int
    img_size: int


def memory_budget(share: float = MEMORY_SHARE) -> int | None:
    """``share`` of the memory this process may hold (:func:`levit.utils.memory_limit`); ``None``
    where that cannot be read."""
    limit = memory_limit()
    return int(share * limit) if limit else None


def _release() -> None:
    """Collect garbage and hand the freed heap back to the system, so that a run over every model
    holds only the forms it keeps."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Within the block, :func:`_release`'s garbage collection skips what was alive when it began (the
    imported libraries, whose objects a collection after every model would otherwise walk each time);
    what the run makes is collected as before. A heap the caller froze before stays frozen after
    (``gc.unfreeze`` would thaw the caller's objects too)."""
    import timm  # noqa: F401  (imported here so that the freeze covers it; the runtimes likewise)

    for module in ("onnxruntime", "openvino"):
        with contextlib.suppress(ImportError):
            __import__(module)
    frozen_before = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


Runner = Callable[[torch.Tensor], torch.Tensor]


def _form_builder(eager: nn.Module, x: torch.Tensor, cache: dict | None = None) -> Callable[[str], Runner]:
    """A function building the runner of ``eager`` on a runtime, for inputs shaped like ``x``, on this
    process's thread count. ONNX Runtime and OpenVINO start from one ONNX export, made once (OpenVINO's
    conversion goes by way of the ONNX export anyway: :func:`levit.runtime.export.to_openvino`);
    where the export fails, OpenVINO's PyTorch frontend converts the module.

    ``cache`` (a dict the caller keeps) holds the export and OpenVINO's model read from it, so that the
    protocols of one run (:func:`run_protocols`) make them once per model: the export keeps the batch
    axis dynamic, so one export serves batch 16 and batch 1. What is compiled is not shared: an ONNX
    Runtime session's intra-op threads and OpenVINO's ``INFERENCE_NUM_THREADS`` are fixed when the
    session or the compiled model is made, so each thread count compiles its own."""
    from ..runtime.backend_onnxruntime import onnx_bytes, onnxruntime_session
    from ..runtime.backend_openvino import openvino_compiled
    from ..runtime.deploy import build_runner
    from ..runtime.export import openvino_model_from_onnx

    threads = torch.get_num_threads()
    cache = {} if cache is None else cache  # "onnx": the bytes or the export's error; "openvino": likewise

    def made(key: str, make: Callable[[], object]) -> object:
        if key not in cache:
            try:
                cache[key] = make()
            except Exception as e:  # kept: each runtime that needs it reports it
                cache[key] = e
        if isinstance(cache[key], Exception):
            raise cache[key]
        return cache[key]

    def onnx() -> bytes:
        return made("onnx", lambda: onnx_bytes(copy.deepcopy(eager).float().eval(), x))

    def openvino() -> Runner:
        try:  # the ONNX Runtime form's export, read by OpenVINO's ONNX frontend
            model = made("openvino", lambda: openvino_model_from_onnx(onnx()))
        except Exception:  # no ONNX export of this model: OpenVINO's own conversion of the module
            return build_runner(eager, "openvino", "fp32", example=x, threads=threads)
        return openvino_compiled(model, "fp32", threads)

    def build(backend: str) -> Runner:
        if backend == "openvino":
            return openvino()
        if backend == "onnxruntime":
            return onnxruntime_session(onnx(), threads)
        return build_runner(eager, backend, "fp32", example=x, threads=threads)

    return build


def _try_form(
    build: Callable[[str], Runner], backend: str, check: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
) -> tuple[dict, Callable[[], object] | None]:
    """(record, one call on ``x`` or None) of the runner ``build(backend)`` makes: its logits on
    ``check[0]`` checked against ``check[1]`` (the eager form's); None where it fails to build or to
    match."""
    try:
        runner = build(backend)
        err = relative_error(runner(check[0]), check[1])
    except Exception as e:  # a runtime that cannot take a model is a result of the run, not a crash
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return {"img_s": None, "rel_err": None, "error": f"{type(e).__name__}: {first}"}, None
    if not err <= TOLERANCE:
        return {"img_s": None, "rel_err": err, "error": f"logits differ from eager ({err:.1e} > {TOLERANCE:g})"}, None
    return {"img_s": None, "rel_err": err, "error": None}, lambda: runner(x)


@dataclass
class _Prepared:
    """One model's eager form (steps 1-2 of this module's description) and what the protocols of one
    run share of it (:func:`run_protocols`): built, its BatchNorm randomised and its fusion checked once."""

    eager: nn.Module
    kind: str  # "fused" / "reparameterized" / "as built"
    check: tuple[torch.Tensor, torch.Tensor]  # the check images and the eager form's logits on them
    reparam_err: float
    params: int
    flops: int
    res: int
    seed: int
    cache: dict = field(default_factory=dict)  # the ONNX export and OpenVINO's model (:func:`_form_builder`)

    def timed_input(self, batch: int) -> torch.Tensor:
        """The timed input at ``batch`` (random images, the same for every form of the model)."""
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(batch, 3, self.res, self.res, generator=g)


def _prepare(name: str, img_size: int | None, seed: int) -> _Prepared:
    entry = BENCH_MODELS[name]
    if entry.implementation == "timm":  # the paper's peers get what every timm model gets here
        entry = replace(entry, implementation="timm+reparam")
    torch.manual_seed(seed)
    model, res = build_bench_model(entry, img_size)
    _randomize_bn(model, seed)
    params, flops = bench_size(entry, model, res)
    xc = torch.randn(CHECK_BATCH, 3, res, res, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        y_built = model(xc)
        eager = bench_inference_form(entry, model).eval()
        y0 = eager(xc)
    reparam_err = relative_error(y0, y_built)
    kind = "fused" if entry.implementation == "levit" else "reparameterized"
    if not reparam_err <= TOLERANCE:  # a fusion that changes the answer is not an inference form
        eager, y0, kind = model, y_built, "as built"
    return _Prepared(eager, kind, (xc, y0), reparam_err, params, flops, res, seed)


def eager_form(name: str, img_size: int | None, batch: int, seed: int) -> tuple:
    """(eager form, its kind, (check images, its logits), timed input, reparam error, params, FLOPs, res)."""
    p = _prepare(name, img_size, seed)
    return p.eager, p.kind, p.check, p.timed_input(batch), p.reparam_err, p.params, p.flops, p.res


def _race(calls: dict[str, Callable[[], object]], trial_s: float, batch: int, forms: dict[str, dict]) -> str:
    """The fastest of ``calls`` (each form's trial img/s written into ``forms``): two interleaved
    rounds of ``trial_s``, the second without the forms :data:`TRIAL_DROP` times slower than the
    fastest in the first (they cannot win it); a single form has nothing to race (its img/s stays
    ``None``: the timed rounds give it)."""
    if len(calls) == 1:
        return next(iter(calls))
    secs = interleaved(calls, rounds=1, window=trial_s, warmup_calls=1)
    best = min(t[0] for t in secs.values())
    second = [k for k in reversed(list(calls)) if secs[k][0] <= TRIAL_DROP * best]  # reversed, as round 2 is
    if len(second) > 1:
        for k, t in interleaved({k: calls[k] for k in second}, rounds=1, window=trial_s, warmup_calls=0).items():
            secs[k] += t
    for backend, t in secs.items():
        forms[backend]["img_s"] = batch / min(t)
    return min(secs, key=lambda k: min(secs[k]))


def best_form(
    name: str,
    *,
    batch: int,
    runtimes: Sequence[str] = RUNTIMES,
    trial_s: float = 1.0,
    img_size: int | None = None,
    seed: int = 0,
    prepared: _Prepared | None = None,
) -> FastForm:
    """The fastest form of model ``name`` among ``runtimes`` that gives its eager form's logits.

    Steps 1-3 of this module's description, at ``img_size`` (``None``: the resolution of the model's
    top-1); ``prepared`` (steps 1-2 done by :func:`_prepare`) is reused instead of building the model
    again. The forms that pass race in two interleaved rounds of ``trial_s`` (:func:`_race`); the
    eager form always passes (it is the reference), so a runtime that fails to convert or differs
    only loses its place, with the reason kept in :attr:`FastForm.forms`.
    """
    p = prepared or _prepare(name, img_size, seed)
    x = p.timed_input(batch)
    forms: dict[str, dict] = {}
    calls: dict[str, Callable[[], object]] = {}
    build = _form_builder(p.eager, x, p.cache)
    for backend in runtimes:
        forms[backend], call = _try_form(build, backend, p.check, x)
        if call is not None:
            calls[backend] = call
    if not calls:
        raise NoFormError(name, forms)
    chosen = _race(calls, trial_s, batch, forms)
    run = calls[chosen]
    del calls, call
    _release()  # the forms not chosen (compiled models, sessions) are freed before the next model
    return FastForm(run, chosen, forms, p.reparam_err, p.kind, p.params, p.flops, p.res)


def _accuracy(name: str, res: int) -> dict:
    """The top-1 of ``name`` and its source, only where the figure was measured at ``res``."""
    entry, acc = BENCH_MODELS[name], FIELD_ACCURACY.get(name)
    top1, source, timm_top1 = (acc.top1, acc.source, acc.timm_top1) if acc else (entry.top1, "", None)
    if top1 is None or res != entry.img_size:
        why = f"unknown at {res}px" + (f" (the figure is at {entry.img_size}px)" if top1 is not None else "")
        return {"top1": None, "top1_source": why, "timm_top1": None}
    return {"top1": top1, "top1_source": source or "LeViT paper, Table 3", "timm_top1": timm_top1}


def _row(name: str, form: FastForm, run: SpeedRun, secs: list[float]) -> dict:
    import timm

    entry = BENCH_MODELS[name]
    batch = (run.batch_sizes or (16,))[0]
    rates = [batch / t for t in secs]
    return {
        "model": name,
        "family": entry.family,
        "implementation": entry.implementation,
        "eager_form": form.eager_form,
        "backend": form.backend,
        "precision": "fp32",
        "device": device_name("cpu"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "batch": batch,
        "threads": run.threads,
        "img_size": form.img_size,
        "img_s": statistics.median(rates),
        "img_s_min": min(rates),
        "img_s_max": max(rates),
        "ms_batch": statistics.median(secs) * 1000,
        "params": form.params,
        "flops": form.flops,
        **_accuracy(name, form.img_size),
        "reparam_rel_err": form.reparam_rel_err,
        "rel_err": form.forms[form.backend]["rel_err"],
        "forms": form.forms,
    }


def _groups(names: Sequence[str], size: int) -> list[list[str]]:
    """``names`` ordered by top-1 (unknown last), cut into groups of at most ``size``: the models
    that compete for the same stretch of the front are timed in the same rounds."""
    acc = {n: FIELD_ACCURACY[n].top1 if n in FIELD_ACCURACY else BENCH_MODELS[n].top1 for n in names}
    order = sorted(names, key=lambda n: (acc[n] is None, acc[n] or 0.0))
    return [order[i : i + size] for i in range(0, len(order), size)]


# rough seconds of one-time work per model, for the estimate of the time left only (the progress
# rescales it by how long the finished steps took): the eager form and its ONNX export once per model,
# then each protocol's compilation (executorch: the lowering, the slowest step of the run)
_PREP_S = 1.5
_BUILD_S = {"auto": 3.0, "executorch": 12.0}


class _Clock:
    """Seconds left of a run: the planned cost of every step, rescaled by how long the done ones took."""

    def __init__(self, plan: float) -> None:
        self.plan, self.done, self.t0 = plan, 0.0, time.perf_counter()

    def step(self, cost: float) -> float:
        self.done += cost
        return (time.perf_counter() - self.t0) * max(self.plan - self.done, 0.0) / max(self.done, 1e-9)


def _model_cost(run: SpeedRun, prepared: bool) -> float:
    """The planned seconds of one model's choice of form in ``run`` (resolved)."""
    n = len(RUNTIMES) if run.backend == "auto" else 1
    trial = 2 * n * (run.warmup_s or 0.0) if n > 1 else 0.0
    return (0.0 if prepared else _PREP_S) + _BUILD_S.get(run.backend or "", 0.5) + trial


def _plan(runs: Sequence[SpeedRun]) -> float:
    seen: set[str] = set()
    total = 0.0
    for run in runs:
        for name in run.models or ():
            total += _model_cost(run, name in seen) + run.windows * run.window_s
            seen.add(name)
    return total


def _run(
    run: SpeedRun,
    progress: Callable[[int, int, str, dict | None], None] | None,
    prepare: Callable[[str, int], tuple[_Prepared, bool]],
    clock: _Clock,
) -> list[dict]:
    """:func:`run_field`'s work on a resolved run; ``prepare(name, i)``: the model's eager form and
    whether an earlier protocol built it."""
    batch = (run.batch_sizes or (16,))[0]
    runtimes = RUNTIMES if run.backend == "auto" else (run.backend,)
    rows: dict[str, dict] = {}
    n, i = len(run.models), 0
    budget = memory_budget()

    def time_together(chosen: dict[str, FastForm]) -> None:
        """``chosen``'s forms timed in the same interleaved rounds, their rows written."""

        def on_round(r: int, rounds: int) -> None:
            eta = clock.step(run.window_s * len(chosen))
            if progress:  # a round is reported once it is done: its start and its end together
                progress(r - 1, rounds, "interleaved round", None)
                progress(r - 1, rounds, "interleaved round", {"eta_s": eta})

        secs = interleaved(
            {k: f.run for k, f in chosen.items()}, rounds=run.windows, window=run.window_s, on_round=on_round
        )
        rows.update({k: _row(k, f, run, secs[k]) for k, f in chosen.items()})

    with num_threads(run.threads):
        for group in _groups(run.models, GROUP_SIZE):
            chosen: dict[str, FastForm] = {}
            for name in group:
                if progress:
                    progress(i, n, name, None)
                prepared, shared = prepare(name, i)
                try:
                    chosen[name] = form = best_form(
                        name, batch=batch, runtimes=runtimes, trial_s=run.warmup_s, prepared=prepared
                    )
                    done = {"img_s": form.forms[form.backend]["img_s"], "backend": form.backend, "precision": "fp32"}
                except NoFormError as e:  # a model no runtime could take is a row of the result
                    rows[name], done = _failed_row(name, e, run), {}
                del prepared
                eta = clock.step(_model_cost(run, shared))
                if progress:
                    progress(i, n, name, {**done, "batch": batch, "eta_s": eta} if done else {"eta_s": eta})
                i += 1
                if done and len(chosen) > 1 and budget and (rss := process_memory()) and rss > budget:
                    newest = chosen.pop(name)  # the forms alive hold too much: the group so far is timed
                    time_together(chosen)
                    chosen = {name: newest}
                    del newest
                    _release()
            if chosen:
                time_together(chosen)
            del chosen
            _release()  # the group's forms, before the next group's are built
    return add_front_distance([rows[name] for name in run.models])


def run_field(run: SpeedRun, *, progress: Callable[[int, int, str, dict | None], None] | None = None) -> list[dict]:
    """The rows of a ``--suite modern`` run, in the run's order: every model in its best form
    (:func:`best_form`), timed in interleaved rounds with the models nearest it in top-1 (groups of
    :data:`GROUP_SIZE`); each row carries its top-1, that figure's source, and its distance from the
    front (:func:`add_front_distance`).

    ``progress(i, n, name, row)`` is called before (``row`` None) and after each model's choice of
    form (``row``: the trial's img/s and the chosen backend; ``{}`` where no runtime took it), then
    twice after each timed round (``name`` "interleaved round", ``row`` None then ``{}``); every
    ``row`` after a step has ``eta_s``, the estimated seconds left.
    """
    run = run.resolved()
    with _heap_frozen():
        return _run(run, progress, lambda name, i: (_prepare(name, run.img_size, i), False), _Clock(_plan([run])))


# ---- several protocols in one run ----------------------------------------------------------------
# the CPU protocols of `levit bench --suite modern --protocol`: the paper's (one thread, batch 16),
# latency (every core of the machine, batch 1) and the phone-class runtime (ExecuTorch XNNPACK, one
# thread, batch 1, as a phone runs one picture at a time)
PROTOCOLS: tuple[str, ...] = ("paper", "latency", "executorch")
# `--protocol all` without --models: the paper's protocol times the whole suite, latency and
# ExecuTorch the quick set (LeViT-128S and -256 and the 9 fast peers nearest them in top-1): the
# ExecuTorch lowering is the run's slowest step, and the three fit 15 minutes on 2 cores only so
ALL_SUBSET_MODELS: tuple[str, ...] = MODERN_QUICK_MODELS
# ... less EfficientViT-M5 in ExecuTorch's (10 models): its lowering is several times the others'
# (docs/field.md), and EfficientNet-B0 has its top-1
ALL_EXECUTORCH_MODELS: tuple[str, ...] = tuple(m for m in ALL_SUBSET_MODELS if m != "efficientvit_m5")
# `--protocol all`: the trial window of each form where --warmup is not given, shorter than one
# protocol's: the trial only picks the runtime that the interleaved rounds then time
ALL_TRIAL_S = 0.25
# `--protocol all --quick`: LeViT at both ends, the fastest peer below them and the two nearest
# above LeViT-128S, in every protocol; EfficientNet-B0 rather than EfficientViT-M5 (the same 77.1%),
# whose ExecuTorch lowering takes several times as long (docs/field.md gives the run's time)
ALL_QUICK_MODELS: tuple[str, ...] = (
    "mobilenetv4_conv_small",
    "levit_128s",
    "efficientnet_b0",
    "repvit_m0_9",
    "levit_256",
)


# `--protocol all`: interleaved rounds of 1 s per protocol (where --windows/--window are not given)
ALL_WINDOWS: dict[str, int] = {"paper": 4, "latency": 3, "executorch": 3}


def all_cores() -> int:
    """The CPU cores this process may run on (the latency protocol's threads)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def protocol_runs(run: SpeedRun, protocol: str) -> list[tuple[str, SpeedRun]]:
    """``(name, resolved run)`` of each protocol ``protocol`` names (one of :data:`PROTOCOLS`, or
    ``"all"``): ``run`` with that protocol's threads, batch and backend (``run``'s own are replaced).

    Its models: ``run.models`` where given; else with ``"all"`` the whole suite for the paper's
    protocol, :data:`ALL_SUBSET_MODELS` for latency and :data:`ALL_EXECUTORCH_MODELS` for ExecuTorch,
    or :data:`ALL_QUICK_MODELS` for every protocol with ``quick``; else the suite (its quick set with
    ``quick``). With ``"all"`` (not ``quick``) the rounds, windows and trials not given in ``run`` are
    :data:`ALL_WINDOWS`, 1 s and :data:`ALL_TRIAL_S`."""
    if protocol not in (*PROTOCOLS, "all"):
        raise LeViTError(f"--protocol: unknown {protocol!r}; choose from {', '.join(PROTOCOLS)}, all")
    settings = {
        "paper": {"threads": 1, "batch_sizes": (16,), "backend": "auto"},
        "latency": {"threads": all_cores(), "batch_sizes": (1,), "backend": "auto"},
        "executorch": {"threads": 1, "batch_sizes": (1,), "backend": "executorch"},
    }
    out = []
    for name in PROTOCOLS if protocol == "all" else (protocol,):
        models, timing = run.models, {}
        if models is None and protocol == "all":
            subset = {"paper": None, "latency": ALL_SUBSET_MODELS, "executorch": ALL_EXECUTORCH_MODELS}[name]
            models = ALL_QUICK_MODELS if run.quick else subset
        if protocol == "all" and not run.quick:
            # shorter rounds and trials than one protocol's, so that the three fit 15 minutes on 2
            # cores; a window of 1 s still holds dozens of calls of the slowest model at batch 16
            timing = {
                "windows": ALL_WINDOWS[name] if run.windows is None else run.windows,
                "window_s": 1.0 if run.window_s is None else run.window_s,
                "warmup_s": ALL_TRIAL_S if run.warmup_s is None else run.warmup_s,
            }
        out.append((name, replace(run, suite="modern", models=models, **settings[name], **timing).resolved()))
    return out


def run_protocols(
    runs: Sequence[tuple[str, SpeedRun]],
    *,
    progress: Callable[[int, int, str, dict | None], None] | None = None,
    on_protocol: Callable[[str, SpeedRun], None] | None = None,
) -> list[dict]:
    """The rows of every protocol of ``runs`` (from :func:`protocol_runs`), each with its
    ``protocol``, one after the other (``on_protocol(name, run)`` before each; ``progress`` as in
    :func:`run_field`, its ``eta_s`` over the whole of ``runs``).

    Each model is built, its BatchNorm randomised and its eager form checked once for every protocol
    that times it, and exported to ONNX once (:func:`_form_builder`: the export and OpenVINO's model
    read from it are shared; each protocol compiles its own for its threads and races its own trial,
    as the fastest runtime at one thread and batch 16 need not be the fastest at batch 1)."""
    runs = [(name, run.resolved()) for name, run in runs]
    with _heap_frozen():
        return _run_protocols(runs, progress, on_protocol)


def _run_protocols(
    runs: list[tuple[str, SpeedRun]],
    progress: Callable[[int, int, str, dict | None], None] | None,
    on_protocol: Callable[[str, SpeedRun], None] | None,
) -> list[dict]:
    """:func:`run_protocols`' work on resolved runs, the heap frozen."""
    clock = _Clock(_plan([run for _, run in runs]))
    kept: dict[str, _Prepared] = {}  # the models a later protocol times too
    rows: list[dict] = []
    for k, (protocol, run) in enumerate(runs):
        later = {m for _, r in runs[k + 1 :] for m in r.models or ()}

        def prepare(name: str, i: int, run: SpeedRun = run, later: set[str] = later) -> tuple[_Prepared, bool]:
            if name in kept:
                return kept[name], True
            p = _prepare(name, run.img_size, i)
            if name in later:
                kept[name] = p
            return p, False

        if on_protocol:
            on_protocol(protocol, run)
        rows += [{"protocol": protocol, **r} for r in _run(run, progress, prepare, clock)]
        for name in set(kept) - later:
            del kept[name]
        _release()
    return rows


def _failed_row(name: str, e: NoFormError, run: SpeedRun) -> dict:
    """The row of a model no runtime could take: its accuracy, no speed, and each runtime's reason."""
    entry = BENCH_MODELS[name]
    return {
        "model": name,
        "family": entry.family,
        "implementation": entry.implementation,
        "backend": None,
        "device": device_name("cpu"),
        "batch": (run.batch_sizes or (16,))[0],
        "threads": run.threads,
        "img_size": run.img_size or entry.img_size,
        "img_s": None,
        **_accuracy(name, run.img_size or entry.img_size),
        "forms": e.forms,
        "error": str(e),
    }


# ---- the front ---------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(speed, top1)`` points no other point dominates (at least as fast and at
    least as accurate, and better in one), fastest first."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_top1 = [], float("-inf")
    for i in order:
        if points[i][1] > best_top1:
            front.append(i)
            best_top1 = points[i][1]
    return front


def add_front_distance(rows: Sequence[dict]) -> list[dict]:
    """``rows`` with ``on_front``, ``front_speed_ratio`` (img/s over the fastest model at least as
    accurate: 1.0 on the front) and ``front_top1_gap`` (points of top-1 below the most accurate model
    at least as fast: 0.0 on the front); rows without a top-1 get ``None``."""
    pts = [(r["img_s"], r["top1"]) for r in rows if r.get("top1") is not None and r.get("img_s") is not None]
    front = {pts[i] for i in pareto_front(pts)}
    out = []
    for r in rows:
        r = dict(r)
        if r.get("top1") is None or r.get("img_s") is None:
            r.update(on_front=None, front_speed_ratio=None, front_top1_gap=None)
        else:
            s, a = r["img_s"], r["top1"]
            r["on_front"] = (s, a) in front
            r["front_speed_ratio"] = s / max(ps for ps, pa in pts if pa >= a)
            r["front_top1_gap"] = max(pa for ps, pa in pts if ps >= s) - a
        out.append(r)
    return out


def front_in_band(rows: Sequence[dict], band: tuple[float, float] = FRONT_BAND) -> list[dict]:
    """The rows on the front with a top-1 inside ``band`` (inclusive), most accurate last."""
    return sorted(
        (r for r in add_front_distance(rows) if r["on_front"] and band[0] <= r["top1"] <= band[1]),
        key=lambda r: r["top1"],
    )


def _is_levit(row: dict) -> bool:
    return "LeViT" in row["family"]


def levit_ratios(rows: Sequence[dict]) -> list[tuple[dict, dict | None, float | None]]:
    """For each of this library's LeViT rows: the nearest other model of equal or higher top-1
    (the least accurate such model, the fastest among ties; LeViTs of any implementation excluded)
    and LeViT's img/s over that model's (``None`` where no model is that accurate)."""
    out = []
    for r in rows:
        if r.get("implementation") != "levit" or r.get("top1") is None or r.get("img_s") is None:
            continue
        timed = [p for p in rows if p.get("top1") is not None and p.get("img_s") is not None]
        peers = [p for p in timed if not _is_levit(p) and p["top1"] >= r["top1"]]
        peer = min(peers, key=lambda p: (p["top1"], -p["img_s"])) if peers else None
        out.append((r, peer, r["img_s"] / peer["img_s"] if peer else None))
    return out


# ---- output ------------------------------------------------------------------------------------
_COLUMNS = [
    ("model", "model", "{}"),
    ("backend", "form", "{}"),
    ("img_size", "res", "{}"),
    ("img_s", "img/s", "{:.1f}"),
    ("img_s_min", "min", "{:.1f}"),
    ("img_s_max", "max", "{:.1f}"),
    ("params", "params M", "{:.1f}"),
    ("flops", "FLOPs M", "{:.0f}"),
    ("top1", "top-1", "{:.1f}"),
    ("front_speed_ratio", "speed/front", "{:.2f}"),
    ("front_top1_gap", "top-1 gap", "{:.1f}"),
    ("rel_err", "rel err", "{:.0e}"),
]


def _cells(r: dict) -> list[str]:
    line = []
    for key, _, fmt in _COLUMNS:
        v = r.get(key)
        if key in ("params", "flops") and v is not None:
            v = v / 1e6
        if key == "backend" and r.get("eager_form") == "as built":
            v = f"{v} (unfused)"
        line.append(("unknown" if key == "top1" else "-") if v is None else fmt.format(v))
    line[0] += " *" if r.get("on_front") else ""
    return line


def format_field_table(rows: Sequence[dict]) -> str:
    """The modern suite's table, fastest first, then the front between 70% and 84% top-1 and
    LeViT's speed ratio to the nearest model of equal or higher accuracy."""
    if not rows:
        return "(no results)"
    rows = sorted(add_front_distance(rows), key=lambda r: -(r["img_s"] or 0.0))
    cells = [_cells(r) for r in rows]
    heads = [h for _, h, _ in _COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda xs: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))  # noqa: E731
    r0 = rows[0]
    out = [
        f"{r0['device']}, {r0['threads']} thread(s), batch {r0['batch']}, fp32; "
        f"torch {r0.get('torch', torch.__version__)}, timm {r0.get('timm', '-')}",
        line(heads),
        *(line(c) for c in cells),
        "* on the front; speed/front: img/s over the fastest model at least as accurate; top-1 gap: points "
        "below the most accurate model at least as fast; rel err: the timed form against eager",
        f"front, {FRONT_BAND[0]:g}-{FRONT_BAND[1]:g}% top-1: "
        + (", ".join(f"{r['model']} ({r['top1']:.1f})" for r in front_in_band(rows)) or "none"),
    ]
    out += [f"did not run: {r['error']}" for r in rows if r.get("img_s") is None]
    for r, peer, ratio in levit_ratios(rows):
        if peer is None:
            out.append(f"{r['model']} ({r['top1']:.1f}): no other model here is as accurate")
        else:
            out.append(
                f"{r['model']} ({r['top1']:.1f}): {ratio:.2f}x the img/s of {peer['model']} ({peer['top1']:.1f}), "
                "the nearest model of equal or higher top-1"
            )
    return "\n".join(out)


def plot_field(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """The Pareto picture: top-1 against img/s (log x), a colour per family, the front drawn as a
    staircase, LeViT's points labelled."""
    plt, path = plot_target(path)
    import matplotlib.ticker

    pts = [r for r in add_front_distance(rows) if r.get("top1") is not None and r.get("img_s") is not None]
    if not pts:
        raise LeViTError("nothing to plot: none of the benchmarked models has a sourced top-1")
    fig, ax = plt.subplots(figsize=(10.5, 6), dpi=110)
    markers = "osD^v<>pPhX*"
    for k, fam in enumerate(dict.fromkeys(r["family"] for r in pts)):
        fr = [r for r in pts if r["family"] == fam]
        levit = fam == "LeViT (levit)"
        ax.scatter(
            [r["img_s"] for r in fr],
            [r["top1"] for r in fr],
            marker=markers[k % len(markers)],
            s=60 if levit else 30,
            color="tab:red" if levit else None,
            label=fam,
            zorder=3,
        )
        for r in fr:
            ax.annotate(
                r["model"],
                (r["img_s"], r["top1"]),
                textcoords="offset points",
                xytext=(5, -3),
                fontsize=8 if levit else 6,
                fontweight="bold" if levit else "normal",
                color="tab:red" if levit else "0.35",
            )
    front = sorted((r for r in pts if r["on_front"]), key=lambda r: r["img_s"])
    ax.step([r["img_s"] for r in front], [r["top1"] for r in front], where="pre", color="k", lw=1, alpha=0.6)
    ax.plot([], [], color="k", lw=1, alpha=0.6, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("images / second (measured on this machine, log scale)")
    ax.set_ylabel("ImageNet-1k top-1 % (cited source per model)")
    r0 = pts[0]
    proto = f", {r0['protocol']} protocol" if r0.get("protocol") else ""
    ax.set_title(
        title or f"{r0['device']}, {r0['threads']} thread(s), batch {r0['batch']}, fp32, best form{proto}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    fig.tight_layout()
    return save_figure(fig, path)


def _by_protocol(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("protocol") or "", []).append(r)
    return out


def format_protocols(rows: Sequence[dict]) -> str:
    """:func:`format_field_table` of each protocol's rows (a ``protocol`` column), under its name."""
    parts = _by_protocol(rows)
    if len(parts) == 1:
        return format_field_table(rows)
    return "\n\n".join(f"== protocol {name} ==\n{format_field_table(rs)}" for name, rs in parts.items())


def protocol_plot_path(path: str | os.PathLike, protocol: str) -> Path:
    """``FILE.png`` -> ``FILE_<protocol>.png``: the picture of one protocol of a run of several."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{protocol}{path.suffix}")


def plot_protocols(rows: Sequence[dict], path: str | os.PathLike) -> list[Path]:
    """One Pareto picture per protocol: ``path`` itself where the rows hold one, else
    :func:`protocol_plot_path` of each (``field.png`` -> ``field_paper.png``, ``field_latency.png``...)."""
    parts = _by_protocol(rows)
    if len(parts) == 1:
        return [plot_field(rows, path)]
    return [plot_field(rs, protocol_plot_path(path, name)) for name, rs in parts.items()]
