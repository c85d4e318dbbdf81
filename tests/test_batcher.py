"""The server's batcher alone (:mod:`levit.runtime.batcher`): the rule on fixed numbers, then the queue
with fake lanes that finish when the test says, on a fake clock. No model, no HTTP, no Ray."""

from __future__ import annotations

import asyncio

import pytest

from levit.runtime.batcher import MAX_RETRY_AFTER_S, Batcher, QueueFullError, batch_delay, batch_size


def delay(**kw) -> float | None:
    args = {"queued": 1, "oldest_wait_s": 0.0, "decoding": 0, "free_lanes": 1, "busy_left": []}
    args["max_batch_size"] = 8
    args["wait_s"] = 0.05
    return batch_delay(**{**args, **kw})


def test_the_rule():
    assert delay(queued=0) is None  # nothing to send
    assert delay(queued=5, free_lanes=0, decoding=9) is None  # every lane busy: wait for one, whatever the wait
    assert delay(queued=1) == 0.0  # a lone request: nobody is being decoded to join it, it goes at once
    assert delay(queued=8, decoding=5) == 0.0  # full
    assert delay(queued=3, decoding=1) == pytest.approx(0.05)  # one more on its way: wait for it
    assert delay(queued=3, decoding=1, oldest_wait_s=0.03) == pytest.approx(0.02)
    assert delay(queued=3, decoding=1, oldest_wait_s=0.07) == 0.0  # waited long enough
    # its part: one batch per free lane of those queued and being decoded
    assert delay(queued=4, decoding=4, free_lanes=2) == 0.0
    assert delay(queued=3, decoding=5, free_lanes=2) == pytest.approx(0.05)
    # another lane about to free: the part is over it too
    assert delay(queued=3, decoding=5, busy_left=[0.0]) == pytest.approx(0.05)  # part 4: one more to come
    assert delay(queued=4, decoding=4, busy_left=[0.0]) == 0.0  # part 4: it goes
    assert delay(queued=4, decoding=4) == pytest.approx(0.05)  # no such lane: the 4 decoding join it
    assert delay(queued=4, decoding=4, busy_left=[8.0]) == pytest.approx(0.05)  # it frees too late to take any


def test_the_lanes_that_take_a_part_of_the_queue_finish_together():
    def size(**kw) -> int:
        args = {"queued": 20, "decoding": 0, "free_lanes": 1, "busy_left": [0.0], "max_batch_size": 32}
        return batch_size(**{**args, **kw})

    assert size() == 10  # another lane about to free: half of the 20, the other half is that lane's
    assert size(busy_left=[4.0]) == 12  # it frees 4 images from now and takes 8: both end 12 images from now
    assert size(busy_left=[20.0]) == 20 and size(busy_left=[]) == 20  # it frees too late / no busy lane
    assert size(busy_left=[-3.0]) == 10  # a lane past its estimate is about to free
    assert size(queued=30, decoding=14) == 22  # those being decoded count: they are on their way
    assert size(free_lanes=2, busy_left=[0.0, 0.0]) == 5 and size(free_lanes=2, busy_left=[]) == 10
    assert size(busy_left=[2.0, 30.0]) == 11  # the first busy lane takes 9; the second frees too late
    assert size(queued=90) == 32 and size(queued=1) == 1 and size(queued=1, busy_left=[0.0] * 7) == 1


class FakeLanes:
    """Lanes whose batches end when the test releases them; each batch recorded as (lane, items)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.release: dict[int, asyncio.Event] = {}

    async def run(self, lane: str, items: list[int]) -> list[int]:
        self.batches.append((lane, items))
        event = self.release.setdefault(len(self.batches) - 1, asyncio.Event())
        await event.wait()
        return [i * 10 for i in items]

    def finish(self, index: int) -> None:
        self.release.setdefault(index, asyncio.Event()).set()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(lanes=("L0",), **kw) -> tuple[Batcher, FakeLanes, Clock]:
    fake, clock = FakeLanes(), Clock()
    args = {"max_batch_size": 4, "max_wait_s": 0.0, "max_queue": 100, "clock": clock}
    return Batcher(list(lanes), fake.run, **{**args, **kw}), fake, clock


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_requests_arriving_while_every_lane_is_busy_fill_one_batch_in_order():
    async def go():
        b, lanes, _ = make()
        first = asyncio.ensure_future(b.submit(1))
        await settle()
        assert lanes.batches == [("L0", [1])]  # alone and nobody decoding: at once
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(2, 8)]
        await settle()
        assert len(lanes.batches) == 1 and b.queued == 6  # the lane is busy: they wait
        lanes.finish(0)
        await settle()
        assert lanes.batches[1] == ("L0", [2, 3, 4, 5])  # the freed lane takes a full batch, oldest first
        lanes.finish(1)
        await settle()
        assert lanes.batches[2] == ("L0", [6, 7])
        lanes.finish(2)
        assert await asyncio.gather(first, *rest) == [10, 20, 30, 40, 50, 60, 70]
        assert b.free == ["L0"] and b.queued == 0

    asyncio.run(go())


def test_a_batch_waits_for_requests_being_decoded_or_goes_with_its_share():
    async def go(lanes_: tuple[str, ...]) -> list:
        b, lanes, _ = make(lanes=lanes_, max_wait_s=5.0)
        with b.decoding_one(), b.decoding_one():
            waiting = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
            await settle()
            seen = list(lanes.batches)
        await settle()  # the two decodes ended (refused images): nobody left to wait for
        if not seen:
            assert lanes.batches == [("L0", [1, 2])]
        lanes.finish(0)
        assert await asyncio.gather(*waiting) == [10, 20]
        return seen

    # one lane: 2 queued and 2 on their way make one batch of 4, so it waits for them
    assert asyncio.run(go(("L0",))) == []
    # two free lanes: 2 is the share of each (4 requests, one batch per lane), so it goes at once
    assert asyncio.run(go(("L0", "L1"))) == [("L0", [1, 2])]


def test_requests_queued_while_both_lanes_compute_are_spread_so_that_they_end_together():
    """The lane that frees takes 9 of 11 queued requests, not 11 (a full batch) nor 6 (half): the other
    lane has 7 images' compute left and then takes the last 2, so both end 9 images from now."""

    async def go():
        b, lanes, clock = make(lanes=("L0", "L1"), max_batch_size=32, max_wait_s=0.01)
        busy = [asyncio.ensure_future(b.submit(1))]
        await settle()
        busy += [asyncio.ensure_future(b.submit(i)) for i in range(2, 12)]  # no batch timed yet: no part
        await settle()
        assert lanes.batches == [("L0", [1]), ("L1", list(range(2, 12)))]
        b.observe_batch(1.25, 10)  # 0.125 s an image (binary fractions: exact arithmetic)
        clock.now += 0.375  # L1 has computed 3 of its 10 images
        queued = [asyncio.ensure_future(b.submit(i)) for i in range(12, 23)]
        await settle()
        assert len(lanes.batches) == 2 and b.queued == 11
        lanes.finish(0)
        await settle()
        assert lanes.batches[2] == ("L0", list(range(12, 21)))
        clock.now += 0.875  # L1 ends its 7 images
        lanes.finish(1)
        await settle()
        assert lanes.batches[3] == ("L1", [21, 22])  # L0 has 2 images left: L1 ends with it
        for i in (2, 3):
            lanes.finish(i)
        assert await asyncio.gather(*busy, *queued) == [10 * i for i in range(1, 23)]

    asyncio.run(go())


def test_the_wait_ends_on_the_clock():
    async def go():
        b, lanes, clock = make(max_wait_s=0.02)
        with b.decoding_one():
            task = asyncio.ensure_future(b.submit(1))
            await settle()
            assert lanes.batches == []  # one on its way
            clock.now += 0.05  # past the wait
            await asyncio.sleep(0.05)  # the dispatcher's timer
            assert lanes.batches == [("L0", [1])]
        lanes.finish(0)
        assert await task == 10

    asyncio.run(go())


def test_a_cancelled_request_is_never_computed():
    async def go():
        b, lanes, _ = make()
        busy = asyncio.ensure_future(b.submit(1))
        await settle()
        gone = asyncio.ensure_future(b.submit(2))
        kept = asyncio.ensure_future(b.submit(3))
        await settle()
        gone.cancel()  # its client left, or its deadline passed
        await settle()
        lanes.finish(0)
        lanes.finish(1)
        assert await asyncio.gather(busy, kept) == [10, 30]
        assert [items for _, items in lanes.batches] == [[1], [3]]

    asyncio.run(go())


def test_the_queue_is_bounded_and_says_when_to_retry():
    b, _, clock = make(lanes=("L0", "L1"), max_queue=2)
    b.observe_batch(1.6, 4)  # 0.4 s an image on a lane: a turn every 0.2 s on two lanes
    with b.admitted(), b.admitted():
        with pytest.raises(QueueFullError) as e, b.admitted():
            pass
        assert e.value.retry_after_s == 1  # 2 admitted x 0.2 s, then its own turn: 0.6 s, rounded up
        assert b.admitted_now == 2
        # the refused line up: 20 more refusals end 0.6 + 20 x 0.2 = 4.6 s away, the last told 5 s
        waits = [b.retry_after_s() for _ in range(20)]
        assert waits == sorted(waits) and waits[0] == 1 and waits[-1] == 5
        clock.now += 3.0  # turns pass: the line is 1.6 s long now
        assert b.retry_after_s() == 2
        clock.now += 10.0  # all passed: back to the admitted ones' time
        assert b.retry_after_s() == 1
        for _ in range(1000):  # a client retrying at once, again and again: capped
            wait = b.retry_after_s()
        assert wait == MAX_RETRY_AFTER_S
    assert b.admitted_now == 0
    with b.admitted():  # room again
        pass


def test_a_failing_batch_fails_its_requests_and_gives_the_lane_back():
    async def go():
        async def broken(lane, items):
            raise RuntimeError("backend fell over")

        b = Batcher(["L0"], broken, max_batch_size=4, max_wait_s=0.0, max_queue=10)
        with pytest.raises(RuntimeError, match="fell over"):
            await b.submit(1)
        await settle()
        assert b.free == ["L0"]

    asyncio.run(go())


def test_busy_until_its_last_request_is_answered_then_closed():
    """A retired model version's batcher: busy while a request is admitted, queued or computing; once
    idle, closing it stops its dispatcher and lets go of its lanes."""

    async def go():
        b, lanes, _ = make()
        assert not b.busy
        with b.admitted():
            assert b.busy
        task = asyncio.ensure_future(b.submit(1))
        await settle()
        assert b.busy  # computing
        lanes.finish(0)
        assert await task == 10
        await settle()
        assert not b.busy
        dispatcher = b._state.task
        b.close()
        await settle()
        assert dispatcher.cancelled() and b.free == []

    asyncio.run(go())
