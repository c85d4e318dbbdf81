"""The run folder (``--output``): checkpoint files, the overwrite guard, resume, RNG state, metrics.

Layout::

    config.yaml                  the resolved recipe
    metrics.jsonl                one JSON object per logged step, per epoch, and a final summary
    checkpoints/ckpt-<step>.pth  full training states, the newest ``keep_last`` kept
    checkpoints/*.corrupt        unreadable checkpoints, set aside (never loaded, never pruned)
    best.pth                     the weights with the best top-1 (loads in create_model / levit eval / predict)
    tensorboard/                 when ``tensorboard: true``

Guarantees: every file is written to a temporary name, fsynced and renamed (a crash leaves the old file
or the complete new one); a fresh run refuses a folder that holds any trace of an earlier run; resuming
never starts over silently.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, LeViTError
from ..utils import atomic_path, first_line

__all__ = [
    "MetricsRecorder",
    "RunDir",
    "atomic_save",
    "check_resume_fits",
    "checkpoint_files",
    "find_resume_checkpoint",
    "load_state",
    "rng_state",
    "seed_all",
    "set_rng_state",
]

TRACES = ("best.pth", "metrics.jsonl", "config.yaml", "checkpoints", "tensorboard")
#: the torchrun job a run folder belongs to (``TORCHELASTIC_RUN_ID``), written when the run starts
ELASTIC_MARKER = ".torchelastic-run-id"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`levit.utils.atomic_path` (temporary file, fsync, rename): a crash at
    any moment leaves either the old state or the complete new file, never half a file."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        # torch reports a failed write (a full disk) as a bare stream-position error over the OSError:
        # the system's error is raised again, naming the file
        err = e if isinstance(e, OSError) else e.__context__
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from e
        raise
    return path


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """``ckpt-<step>.pth`` files in ``folder``, newest (highest step) first."""
    files = [f for f in Path(folder).glob("ckpt-*.pth") if f.stem[5:].isdigit()]
    return sorted(files, key=lambda f: int(f.stem[5:]), reverse=True)


def load_state(path: str | os.PathLike) -> dict:
    """A training checkpoint's contents (``weights_only``: no code is run); :class:`CheckpointError` otherwise."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: unreadable training checkpoint ({type(e).__name__}: {first_line(e, 120)})"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "global_step" not in state:
        raise CheckpointError(f"{path}: not a levit training checkpoint (no model/global_step)")
    return state


def find_resume_checkpoint(output: str | os.PathLike, *, set_aside: bool = True) -> tuple[Path, dict] | None:
    """The newest readable checkpoint under ``output/checkpoints`` and its contents, or None.

    Unreadable checkpoints newer than it are renamed to ``*.pth.corrupt`` (``set_aside``), so they are
    neither loaded again nor counted by pruning; each is reported on stderr."""
    for path in checkpoint_files(Path(output) / "checkpoints"):
        try:
            return path, load_state(path)
        except CheckpointError as e:
            if set_aside and path.exists():
                aside = path.with_name(path.name + ".corrupt")
                try:
                    path.rename(aside)
                except FileNotFoundError:  # another process set it aside first
                    continue
                print(f"warning: {first_line(e)}; set aside as {aside.name}", file=sys.stderr)
    return None


class RunDir:
    """The output folder of one run. Only the main process (``is_main=True``) writes."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True) -> None:
        self.path, self.is_main = Path(path), is_main
        self.existed = self.path.exists()  # a failed start removes only what it made
        self.ckpt_dir = self.path / "checkpoints"

    def traces(self) -> list[str]:
        """Names of the earlier run's files in the folder (``best.pth``, ``checkpoints/`` ...)."""
        found = [t + ("/" if (self.path / t).is_dir() else "") for t in TRACES if (self.path / t).exists()]
        return found

    def valuables(self) -> list[str]:
        """The earlier run's files worth keeping: weights (``best.pth``, anything in ``checkpoints/``,
        unreadable checkpoints set aside included) and metrics (``metrics.jsonl`` with records,
        TensorBoard logs). ``config.yaml`` and empty folders alone are not: a run that failed in its
        first epoch leaves only those, and the next run may take the folder over."""
        found = []
        if (self.path / "best.pth").exists():
            found.append("best.pth")
        if self.ckpt_dir.is_dir() and any(not p.name.startswith(".") for p in self.ckpt_dir.iterdir()):
            found.append("checkpoints/")
        metrics = self.path / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size > 0:
            found.append("metrics.jsonl")
        tensorboard = self.path / "tensorboard"
        if tensorboard.is_dir() and any(f.is_file() for f in tensorboard.rglob("*")):
            found.append("tensorboard/")
        return found

    def _take_over(self) -> None:
        """Say so when a folder with run files but nothing of value is reused by a new run."""
        found = self.traces()
        if found and self.is_main:
            print(
                f"note: --output {self.path} holds {', '.join(found)} of a run that saved no weights and no "
                "metrics: starting a new run there",
                file=sys.stderr,
            )

    def refuse_if_used(self) -> None:
        """A fresh run never overwrites an earlier one: weights or metrics of it are an error (a folder
        with nothing of value is taken over, see :meth:`valuables`)."""
        if self.valuables():
            raise LeViTError(
                f"--output {self.path} holds an earlier run ({', '.join(self.traces())}): continue it with "
                "--resume auto, or pick another --output (nothing is overwritten)"
            )
        self._take_over()

    def resume_point(self, resume: str | None) -> tuple[Path, dict] | None:
        """The checkpoint to continue from for ``--resume`` (``None``, ``auto`` or a path), after the
        overwrite guard; ``auto`` on a folder with run files but no readable checkpoint is an error."""
        if resume in (None, "", "none"):
            self.refuse_if_used()
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_file():
                raise LeViTError(f"--resume: checkpoint file not found: {path}")
            return path, load_state(path)
        found = find_resume_checkpoint(self.path, set_aside=self.is_main)
        if found is None and not self.valuables():
            self._take_over()  # nothing of value: a fresh start
            return None
        if found is None:
            aside = sorted(p.name for p in self.ckpt_dir.glob("*.corrupt")) if self.ckpt_dir.is_dir() else []
            extra = f"; unreadable checkpoints set aside: {', '.join(aside)}" if aside else ""
            raise LeViTError(
                f"--resume auto: {self.path} holds {', '.join(self.traces())} but no readable checkpoint{extra}. "
                "Nothing was changed: move these files away to start over, or pick another --output"
            )
        return found

    def prepare(self, config: Mapping[str, Any]) -> None:
        """Create the folder, clear temporary files left by a crash and write ``config.yaml``."""
        if not self.is_main:
            return
        import yaml

        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.ckpt_dir):
            for tmp in folder.glob(".*.tmp*"):  # left by a crash mid-write
                tmp.unlink(missing_ok=True)
        with atomic_path(self.path / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        if run_id:  # this folder belongs to this torchrun job: its restarts continue it (elastic_restart)
            with atomic_path(self.path / ELASTIC_MARKER) as tmp:
                tmp.write_text(run_id)

    def elastic_restart(self) -> int:
        """The torchrun restart number (``TORCHELASTIC_RESTART_COUNT``) when this process is a restart
        of the job that started the run in this folder (its ``TORCHELASTIC_RUN_ID`` is the folder's);
        0 otherwise: a first attempt, or a folder another job wrote, which the overwrite guard judges."""
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        marker = self.path / ELASTIC_MARKER
        if restarts < 1 or not run_id or not marker.is_file():
            return 0
        return restarts if marker.read_text().strip() == run_id else 0

    def save_checkpoint(self, payload: Mapping[str, Any], step: int, keep_last: int) -> Path:
        """Write ``checkpoints/ckpt-<step>.pth`` and keep only the newest ``keep_last``."""
        path = atomic_save(dict(payload), self.ckpt_dir / f"ckpt-{step:09d}.pth")
        for old in checkpoint_files(self.ckpt_dir)[keep_last:]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, payload: Mapping[str, Any]) -> Path:
        """Write ``best.pth`` (model weights + levit metadata)."""
        return atomic_save(dict(payload), self.path / "best.pth")

    def discard(self, made: list[Path]) -> None:
        """After a failed start: remove the folder if this run created it, else the listed paths it made."""
        if not self.is_main:
            return
        if not self.existed and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def check_resume_fits(path: Path, saved: dict, cfg: Any, class_names: list[str]) -> None:
    """A resume checkpoint (``path``, its contents ``saved``) made for another model, resolution,
    class list or head: say which."""
    old = saved.get("train_config") or {}
    meta = saved.get("levit") or {}
    diffs = []
    for key in ("model", "img_size", "distillation", "drop_path"):
        if key in old and old[key] != getattr(cfg, key):
            diffs.append(f"{key} {old[key]!r} (checkpoint) vs {getattr(cfg, key)!r} (this run)")
    old_names = meta.get("class_names")
    if old_names is not None and list(old_names) != class_names:
        diffs.append(f"classes {_short(old_names)} (checkpoint) vs {_short(class_names)} (this run's --data)")
    if diffs:
        raise CheckpointError(f"{path}: was made for another run: {'; '.join(diffs)}")


def _short(names: list[str]) -> str:
    return f"{len(names)} [{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}]"


# ---- RNG state ----------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state of this process (torch CPU + CUDA, numpy, python), tensors only."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(states: Mapping) -> None:
    """Restore a state from :func:`rng_state`."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np_state = states["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    py_state = states["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))


# ---- metrics ------------------------------------------------------------------------------------
class MetricsRecorder:
    """Rank-0 JSON lines (``metrics.jsonl``) + optional TensorBoard."""

    def __init__(self, out: Path, is_main: bool, tensorboard: bool) -> None:
        self.is_main, self.path, self.tensorboard = is_main, Path(out) / "metrics.jsonl", None
        if is_main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise LeViTError("tensorboard=true needs the tensorboard package: pip install 'levit[train]'") from e
            self.tensorboard = SummaryWriter(str(Path(out) / "tensorboard"))

    def truncate(self, global_step: int, epochs_done: int) -> None:
        """On resume: drop records written after the checkpoint (the run will write them again)."""
        if not self.is_main or not self.path.is_file():
            return
        if global_step == 0 and epochs_done == 0:  # a fresh start: no stale records of a killed run
            self.path.unlink()
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
            if (
                record.get("event") == "summary"
                or (record.get("event") == "step" and record["step"] > global_step)
                or (record.get("event") == "epoch" and record["epoch"] > epochs_done)
            ):
                continue
            keep.append(line)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict, step: int | None = None) -> None:
        """Append one record (and its numbers to TensorBoard at ``step``)."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.tensorboard.add_scalar(f"{record['event']}/{key}", value, step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tensorboard is not None:
            self.tensorboard.close()
