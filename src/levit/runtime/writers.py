"""Prediction rows to a file, written as they come and resumable: JSON Lines, CSV or Parquet by extension.

A row is ``{"path", "top": [{"class", "label", "prob"}, ...], "error"}`` (+ ``"logits"``), as
:func:`levit.runtime.pipeline.make_rows` makes it; ``error`` is ``None`` for a classified image, and ``top``
is empty for an unreadable one. Every format reads back (:func:`read_results`) to the very same rows.

A run writes ``FILE.partial`` and renames it to ``FILE`` when every image is in it, so a file under
the real name is always complete. Rows are flushed after every batch: a process killed at any moment
(even ``kill -9``) loses at most the batches in flight, and ``resume=True`` continues the partial file
(a last line cut in half is dropped), skipping the images already in it. Parquet cannot be appended
to, so its partial file holds the rows as JSON Lines and becomes Parquet when the run completes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import LeViTError
from ..utils import atomic_path, fsync_dir, os_error_line
from .options import OUTPUT_SUFFIXES

__all__ = [
    "FORMATS",
    "OutputExistsError",
    "ResultWriter",
    "output_format",
    "partial_path",
    "read_results",
    "rows_to_table",
    "table_to_rows",
]

FORMATS = {suffix: suffix[1:] for suffix in OUTPUT_SUFFIXES}  # file suffix -> format
_PARQUET_CHUNK = 8192  # rows per Parquet row group when a finished run converts its JSON Lines journal


class OutputExistsError(LeViTError):
    """The output (or, with ``partial``, an interrupted run's partial file) exists and neither resume
    nor overwrite was asked."""

    def __init__(self, message: str, *, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


def output_format(path: str | os.PathLike) -> str:
    """``"jsonl"``, ``"csv"`` or ``"parquet"`` from the file's extension; anything else is a :class:`LeViTError`."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise LeViTError(f"{Path(path).name}: unknown output format; use a {', '.join(FORMATS)} file name")
    return fmt


def partial_path(path: str | os.PathLike) -> Path:
    """Where a run writes ``path`` until it is complete: ``path`` + ``.partial``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


# ---- Arrow (Parquet and Ray Data) ------------------------------------------------------------
def arrow_schema(include_logits: bool):  # -> pyarrow.Schema
    """The rows' Arrow schema (Parquet files, Ray Data batches)."""
    import pyarrow as pa

    top = pa.struct([("class", pa.int64()), ("label", pa.string()), ("prob", pa.float64())])
    fields = [("path", pa.string()), ("top", pa.list_(top)), ("error", pa.string())]
    if include_logits:
        fields.append(("logits", pa.list_(pa.float32())))  # the model's float32 values, exactly
    return pa.schema(fields)


def rows_to_table(rows: list[dict], *, include_logits: bool):  # -> pyarrow.Table
    """Rows as a pyarrow table (:func:`arrow_schema`)."""
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=arrow_schema(include_logits))


def table_to_rows(table) -> list[dict]:
    """A pyarrow table (or record batch) of rows back to row dicts."""
    return table.to_pylist()


def _import_pyarrow() -> None:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LeViTError("Parquet output needs pyarrow: pip install pyarrow (or 'levit[cluster]')") from None


# ---- CSV: one row per image, top-k flattened to columns ------------------------------------
def _csv_header(k: int, include_logits: bool) -> list[str]:
    cols = ["path", "error"] + [f"{f}_{i}" for i in range(1, k + 1) for f in ("class", "label", "prob")]
    return cols + (["logits"] if include_logits else [])


def _csv_record(row: dict, k: int, include_logits: bool) -> list:
    rec: list = [row["path"], row["error"] or ""]
    for i in range(k):
        t = row["top"][i] if i < len(row["top"]) else None
        rec += [t["class"], t["label"], repr(t["prob"])] if t else ["", "", ""]
    if include_logits:
        rec.append(json.dumps(row["logits"]) if row.get("logits") is not None else "")
    return rec


def _csv_row(rec: dict) -> dict:
    top, i = [], 1
    while f"class_{i}" in rec:
        if rec[f"class_{i}"] != "":
            top.append({"class": int(rec[f"class_{i}"]), "label": rec[f"label_{i}"], "prob": float(rec[f"prob_{i}"])})
        i += 1
    row = {"path": rec["path"], "top": top, "error": rec["error"] or None}
    if "logits" in rec:
        row["logits"] = json.loads(rec["logits"]) if rec["logits"] else None
    return row


# ---- reading ---------------------------------------------------------------------------------
def _complete_lines(path: Path, *, repair: bool) -> int:
    """The byte length of ``path``'s complete lines; with ``repair`` a torn last line is cut off."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return size
        end, block = size, 1 << 16  # look back for the last newline
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            end = start
    if repair:
        with open(path, "rb+") as f:
            f.truncate(end)
    return end


def _iter_jsonl(path: Path, limit: int | None = None) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            n += len(line.encode("utf-8"))
            if limit is not None and n > limit:
                return
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise LeViTError(f"{path}: line {lineno} is not a JSON row ({e.msg})") from None


def _iter_csv(path: Path, limit: int | None = None) -> Iterator[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        torn = limit is not None and limit < os.fstat(f.fileno()).st_size  # an interrupted run's last line
        text: Iterable[str] = io.StringIO(f.buffer.read(limit).decode("utf-8"), newline="") if torn else f
        for rec in csv.DictReader(text):
            yield _csv_row(rec)


def read_results(path: str | os.PathLike, fmt: str | None = None) -> Iterator[dict]:
    """The rows of a results file written by ``levit predict --output`` (or its ``.partial``), in file
    order, as the pipeline made them. ``fmt``: ``"jsonl"``, ``"csv"`` or ``"parquet"`` (default: from
    the extension; a ``.partial`` file is read as its output's format, JSON Lines for Parquet)."""
    path = Path(path)
    if fmt is None:
        partial = path.name.endswith(".partial")
        fmt = output_format(path.with_name(path.name[: -len(".partial")]) if partial else path)
        if partial and fmt == "parquet":
            fmt = "jsonl"
    if fmt == "jsonl":
        yield from _iter_jsonl(path, _complete_lines(path, repair=False))
    elif fmt == "csv":
        yield from _iter_csv(path, _complete_lines(path, repair=False))
    else:
        _import_pyarrow()
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_CHUNK):
            yield from table_to_rows(batch)


# ---- writing ---------------------------------------------------------------------------------
def check_destination(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
    """Whether a job may write ``path``, checked before it starts: its folder exists, and an existing
    ``path`` or its partial file (an interrupted run) needs ``resume`` or ``overwrite``
    (:class:`OutputExistsError`, whose ``partial`` says which was found)."""
    path = Path(path)
    if resume and overwrite:
        raise LeViTError("resume and overwrite contradict each other: choose one")
    if not path.parent.is_dir():
        raise LeViTError(f"{path}: folder {path.parent} does not exist")
    if resume or overwrite:
        return
    if partial_path(path).exists():
        raise OutputExistsError(
            f"{partial_path(path)} is left from an interrupted run: resume it, or overwrite to start again",
            partial=True,
        )
    if path.exists():
        raise OutputExistsError(f"{path} exists: resume to add missing images, or overwrite to replace it")


class ResultWriter:
    """Writes rows to ``path`` (format from the extension) through ``path.partial``.

    ``k``: classes per row (CSV columns; a resumed file must have been written with the same ``k``
    and ``include_logits``). ``resume``: continue ``path.partial``, or a finished ``path``, skipping the
    images already in it (:attr:`done`); ``overwrite``: start again and replace ``path`` when done.
    Without either, an existing ``path`` or ``path.partial`` is an :class:`OutputExistsError`.
    Use as a context manager: :meth:`close` on success renames the finished file into place; on an
    error or interrupt the partial file stays, flushed, for ``resume``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        k: int,
        include_logits: bool = False,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.path, self.fmt = Path(path), output_format(path)
        self.partial = partial_path(self.path)
        self.k, self.include_logits = k, include_logits
        if self.fmt == "parquet":
            _import_pyarrow()
        check_destination(self.path, resume=resume, overwrite=overwrite)
        if overwrite:
            with contextlib.suppress(FileNotFoundError):
                self.partial.unlink()
        # a partial file made here (fresh, or seeded from a finished file to add images to) is this
        # writer's to remove when it ends with no row written, a refused resume included: the user's
        # own files are left as they were
        seeded = resume and not self.partial.exists() and self.path.exists()
        if seeded:
            self._seed_from(self.path)
        self._created = seeded or not self.partial.exists()
        self._written = 0
        self._file: IO[str] | None = open(self.partial, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self.done: set[str] = set()
        self.resumed_rows = 0
        try:
            self._load_done()
            self._lock()  # after reading: a POSIX lock goes with the first close of any handle on the file
        except BaseException:
            self.abort()
            raise
        self._csv = csv.writer(self._file) if self.fmt == "csv" else None
        if self._csv is not None and os.fstat(self._file.fileno()).st_size == 0:
            self._csv.writerow(_csv_header(k, include_logits))
            self._file.flush()

    # -- resume
    @property
    def _journal_fmt(self) -> str:
        return "csv" if self.fmt == "csv" else "jsonl"

    def _seed_from(self, final: Path) -> None:
        """A finished file to add images to: copied to the partial file (in the journal's format)."""
        with atomic_path(self.partial) as tmp:
            if self.fmt == "parquet":
                with open(tmp, "w", encoding="utf-8") as f:
                    for row in read_results(final, "parquet"):
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                shutil.copyfile(final, tmp)

    def _load_done(self) -> None:
        end = _complete_lines(self.partial, repair=True)  # a torn last line: the batch in flight, dropped
        if end and self._journal_fmt == "csv":
            with open(self.partial, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
            want = _csv_header(self.k, self.include_logits)
            if header != want:
                raise LeViTError(
                    f"{self.partial} has the columns {','.join(header[:6])}...; this run writes "
                    f"{','.join(want[:6])}... (same --topk and --include-logits to resume it)"
                )
        reader = _iter_csv if self._journal_fmt == "csv" else _iter_jsonl
        for row in reader(self.partial):
            wrong_k = row.get("error") is None and len(row["top"]) != self.k
            if wrong_k or ("logits" in row) != self.include_logits:
                raise LeViTError(
                    f"{self.partial} was written with other settings (top-{len(row['top'])}, logits "
                    f"{'on' if 'logits' in row else 'off'}): resume it with the same --topk and --include-logits"
                )
            self.done.add(row["path"])
            self.resumed_rows += 1

    def _lock(self) -> None:
        """Refuse to append where another live process is appending. A POSIX record lock (``lockf``):
        unlike ``flock``, forked children (decoding workers) do not inherit it, and it dies with its process."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks
            return
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LeViTError(f"{self.partial} is being written by another process") from None

    # -- writing
    def write(self, rows: list[dict]) -> None:
        """Append ``rows`` and flush them to the operating system (they survive a killed process)."""
        f = self._file
        if f is None:
            raise RuntimeError("writer is closed")
        try:
            if self._csv is not None:
                self._csv.writerows(_csv_record(r, self.k, self.include_logits) for r in rows)
            else:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
        except OSError as e:  # a full disk: the rows flushed before stay for --resume (a torn last line is dropped)
            raise LeViTError(
                f"cannot write the results: {os_error_line(e, self.partial)}; the rows written so far stay "
                "there for --resume"
            ) from e
        self._written += len(rows)
        self.done.update(r["path"] for r in rows)

    def close(self) -> Path:
        """Finish: sync the partial file and move it (converted, for Parquet) to :attr:`path`."""
        f = self._file
        if f is None:
            return self.path
        try:
            f.flush()
            os.fsync(f.fileno())
            if self.fmt == "parquet":
                self._to_parquet()  # a failure removes its half-written file; the journal stays
        except OSError as e:
            self.abort()
            raise LeViTError(f"cannot finish the results: {os_error_line(e, self.path)}") from e
        self._file = None
        if self.fmt == "parquet":
            f.close()
            self.partial.unlink()
        else:
            os.replace(self.partial, self.path)  # while still locked
            f.close()
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Stop without finishing: the partial file stays (flushed) for a resumed run, unless this
        writer made it and wrote no row into it."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk: what reached the file stays, for resume
                self._file.flush()
            with contextlib.suppress(OSError):  # closes even when its own last flush fails
                self._file.close()
            self._file = None
            if self._created and not self._written:
                with contextlib.suppress(FileNotFoundError):
                    self.partial.unlink()

    def _to_parquet(self) -> None:
        import pyarrow.parquet as pq

        schema = arrow_schema(self.include_logits)
        with atomic_path(self.path) as tmp, pq.ParquetWriter(tmp, schema) as out:
            chunk: list[dict] = []
            for row in _iter_jsonl(self.partial):
                chunk.append(row)
                if len(chunk) == _PARQUET_CHUNK:
                    out.write_table(rows_to_table(chunk, include_logits=self.include_logits))
                    chunk = []
            if chunk:
                out.write_table(rows_to_table(chunk, include_logits=self.include_logits))

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
