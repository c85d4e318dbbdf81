"""The server's dynamic batcher: an asyncio queue, the model lanes, and the one rule that says when a
batch closes and which lane takes it. No Ray import: the single-process server and each Ray Serve
replica run it on their own event loop.

The rule (:func:`batch_delay` and :func:`batch_size`, asked each time something changes: a request
queued, a decode ended, a lane freed, a wait ran out):

- A batch only closes for a **free lane**: while every lane is busy, requests wait in the queue and
  the first lane to free takes them, oldest first, as one batch (closing batches for busy lanes would
  queue many small batches behind them).
- The lanes should **finish together**. A batch takes its part of the requests queued and being
  decoded, spread over the free lanes and the busy lanes by the compute each busy lane has left (its
  batch size less what it has computed, at the lanes' measured seconds per image), so that every
  lane that takes some ends at the same time (:func:`batch_size`). A busy lane that frees later than
  that takes none: a lane that has just taken its part of a burst has as much left as this one
  would take. Taking everything queued, up to ``max_batch_size``, made that lane's batch longer than
  the others', and its requests the slowest answers (docs/serving.md, "Batching").
- With a lane free, the batch at the head of the queue goes at once when waiting longer would only
  add latency: it holds its part (a burst on two free lanes goes as two batches computed at once; on
  one lane, as one), or **no request is being decoded** to join it (a lone request does not wait).
- Otherwise it goes once its oldest request has waited the longer of ``max_wait_s`` and the time the
  decoding threads take to decode a full batch: the clients of a batch just answered send again at
  once, a burst decoded a few images at a time, and without this wait its first one or two decoded
  images would take the free lane alone while the rest waited a whole batch for the next lane.

Back-pressure: at most ``max_queue`` requests are admitted at once (:meth:`Batcher.admitted`, from
reading the body to the answer); beyond, :class:`QueueFullError` says when to retry
(:meth:`Batcher.retry_after_s`: the refused requests are given turns one image's compute apart, so
that under sustained overload their retries come back spread at the rate the lanes serve, not all a
second later). A request whose waiter is cancelled (its client left, its deadline passed) is dropped
from the queue, never computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["MAX_RETRY_AFTER_S", "Batcher", "QueueFullError", "batch_delay", "batch_size"]

MAX_RETRY_AFTER_S = 30  # the longest Retry-After: past it a client is better told to go elsewhere

Lane = TypeVar("Lane")


class QueueFullError(Exception):
    """The batcher holds ``max_queue`` requests: refused, with the seconds after which to retry."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"server busy: the queue is full, retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


def batch_size(
    *, queued: int, decoding: int, free_lanes: int, busy_left: Sequence[float] = (), max_batch_size: int
) -> int:
    """The most requests the batch closing now takes (at least one, at most ``max_batch_size``).

    The ``queued`` and ``decoding`` requests are spread so that the lanes taking some finish together
    (water-filling): each of the ``free_lanes`` takes ``level`` of them and each busy lane, with
    ``busy_left`` images' compute still ahead of it (one entry per busy lane), ``level`` less that;
    a busy lane with ``level`` or more left takes none."""
    lanes, total = max(free_lanes, 1), float(queued + decoding)
    level = total / lanes
    for left in sorted(busy_left):
        if left >= level:
            break
        lanes, total = lanes + 1, total + max(left, 0.0)
        level = total / lanes
    return max(1, min(max_batch_size, math.ceil(level)))


def batch_delay(
    *,
    queued: int,
    oldest_wait_s: float,
    decoding: int,
    free_lanes: int,
    busy_left: Sequence[float] = (),
    max_batch_size: int,
    wait_s: float,
) -> float | None:
    """Seconds until the batch at the head of the queue closes: ``0.0`` now, ``None`` not until
    something changes (nothing queued, or no lane free for it).

    ``queued``: requests waiting (decoded); ``oldest_wait_s``: how long the first has waited;
    ``decoding``: requests being decoded, about to join; ``free_lanes`` and ``busy_left``: as
    :func:`batch_size`; ``wait_s``: the longest a batch with a free lane waits for them (the module
    docstring gives the rule and the reasons)."""
    if queued == 0 or free_lanes <= 0:
        return None
    part = batch_size(
        queued=queued, decoding=decoding, free_lanes=free_lanes, busy_left=busy_left, max_batch_size=max_batch_size
    )
    if queued >= part or decoding == 0:
        return 0.0
    return max(0.0, wait_s - oldest_wait_s)


@dataclass
class _Entry:
    item: Any
    future: asyncio.Future
    queued_at: float


@dataclass
class _LoopState:
    """What lives on one event loop: the queue, the wake-up event and the dispatching task."""

    loop: asyncio.AbstractEventLoop
    queue: deque = field(default_factory=deque)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class Batcher(Generic[Lane]):
    """Requests in, batches out to the free lanes, by the rule of :func:`batch_delay`.

    ``run(lane, items)`` computes one batch on ``lane`` and returns one result per item, in order; the
    batcher runs up to one batch per lane at once and gives each lane back when its batch ends.
    ``decode_threads``: how many requests decode at once (the full-batch decoding time is the wait
    for a burst). ``clock``: monotonic seconds.
    """

    def __init__(
        self,
        lanes: list[Lane],
        run: Callable[[Lane, list[Any]], Awaitable[list[Any]]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        decode_threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free: list[Lane] = list(lanes)
        self.lanes = len(lanes)
        self.run = run
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.decode_threads = decode_threads
        self.clock = clock
        self.decoding = 0  # requests being decoded (or waiting for a decoding thread)
        self.admitted_now = 0  # requests admitted and not yet answered
        self.per_decode_s = 0.0  # one decode's seconds (moving average)
        self.per_image_s = 0.0  # a lane's seconds per image (moving average)
        self._turns_end = 0.0  # when the last refused request's turn comes (clock seconds)
        self._state: _LoopState | None = None
        self._running: set[asyncio.Task] = set()  # the batches computing (the loop keeps weak references)
        self._started: dict[int, tuple[float, int]] = {}  # each busy lane's batch: (start, images), by id

    # ---- what the requests call ------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of the ``max_queue`` places for a request, from its body to its answer;
        :class:`QueueFullError` when none is left."""
        if self.admitted_now >= self.max_queue:
            raise QueueFullError(self.retry_after_s())
        self.admitted_now += 1
        try:
            yield
        finally:
            self.admitted_now -= 1

    @contextlib.contextmanager
    def decoding_one(self) -> Iterator[None]:
        """Count a request as being decoded (a batch with a free lane may wait for it) while inside."""
        self.decoding += 1
        try:
            yield
        finally:
            self.decoding -= 1
            self._wake()

    def observe_decode(self, seconds: float) -> None:
        """One decode's duration, for the full-batch decoding time."""
        self.per_decode_s = seconds if self.per_decode_s == 0 else 0.9 * self.per_decode_s + 0.1 * seconds

    def observe_batch(self, seconds: float, images: int) -> None:
        """One batch's compute time: the lanes' seconds per image, for the compute a busy lane has left
        (:func:`batch_size`) and :meth:`retry_after_s`."""
        per = seconds / max(images, 1)
        self.per_image_s = per if self.per_image_s == 0 else 0.8 * self.per_image_s + 0.2 * per

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` and wait for its result; cancelling the wait drops it from the queue."""
        state = self._loop_state()
        future = state.loop.create_future()
        state.queue.append(_Entry(item, future, self.clock()))
        self._wake()
        return await future

    @property
    def busy(self) -> bool:
        """Whether any request is admitted, decoding, queued or computing."""
        return bool(self.admitted_now or self.decoding or self.queued or self._running)

    def close(self) -> None:
        """Stop dispatching and let go of the lanes (a retired model version's, once it is not :attr:`busy`)."""
        if self._state is not None and self._state.task is not None:
            self._state.task.cancel()
        self._state = None
        self.free = []

    @property
    def queued(self) -> int:
        """Requests decoded and waiting for a batch."""
        return len(self._state.queue) if self._state else 0

    def full_decode_s(self) -> float:
        """Seconds the decoding threads take to decode a full batch."""
        return self.max_batch_size * self.per_decode_s / min(self.decode_threads, self.max_batch_size)

    def retry_after_s(self) -> int:
        """``Retry-After`` for a request refused now: whole seconds (1 to :data:`MAX_RETRY_AFTER_S`)
        until its turn. The refused requests line up behind what is admitted, each one image's compute
        on the lanes after the one before; a turn that has passed frees its place. Without the line
        every refused client of a sustained overload would come back after the same second, and most
        would be refused again: the shedding, and the clients' retries, would take the cores the
        lanes need."""
        now, per_turn = self.clock(), self.per_image_s / self.lanes
        self._turns_end = max(self._turns_end, now + self.admitted_now * per_turn) + per_turn
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(self._turns_end - now)))

    # ---- dispatching -------------------------------------------------------------------------------
    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:  # a new event loop (tests run several)
            self._state = _LoopState(loop)
        if self._state.task is None or self._state.task.done():
            self._state.task = loop.create_task(self._dispatch(self._state))
        return self._state

    def _wake(self) -> None:
        if self._state is not None:
            self._state.changed.set()

    async def _dispatch(self, state: _LoopState) -> None:
        """Close batches as :func:`batch_delay` says, each on the lane it frees."""
        while True:
            while state.queue and state.queue[0].future.done():  # the waiter left: never computed
                state.queue.popleft()
            now, per_image_s = self.clock(), self.per_image_s
            counts = {
                "queued": len(state.queue),
                "decoding": self.decoding,
                "free_lanes": len(self.free),
                # images' compute each busy lane has left; unknown before a batch was timed: none shared
                "busy_left": [n - (now - t) / per_image_s for t, n in self._started.values()] if per_image_s else [],
                "max_batch_size": self.max_batch_size,
            }
            oldest_wait_s = now - state.queue[0].queued_at if state.queue else 0.0
            delay = batch_delay(
                **counts, oldest_wait_s=oldest_wait_s, wait_s=max(self.max_wait_s, self.full_decode_s())
            )
            if delay == 0.0:
                size, batch = batch_size(**counts), []
                while state.queue and len(batch) < size:
                    entry = state.queue.popleft()
                    if not entry.future.done():
                        batch.append(entry)
                if batch:
                    lane = self.free.pop(0)
                    self._started[id(lane)] = (now, len(batch))
                    task = state.loop.create_task(self._run_batch(lane, batch))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                continue
            state.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.changed.wait(), delay)

    async def _run_batch(self, lane: Lane, batch: list[_Entry]) -> None:
        try:
            results = await self.run(lane, [e.item for e in batch])
        except BaseException as e:
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(e if isinstance(e, Exception) else RuntimeError("batch cancelled"))
            if not isinstance(e, Exception):
                raise
        else:
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        finally:
            self._started.pop(id(lane), None)
            self.free.append(lane)
            self._wake()
