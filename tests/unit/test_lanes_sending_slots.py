"""The process's sending slots: however many webhooks have deliveries due, at most
``sending_max`` requests are out at once (each holds a socket, and a process has only so
many files), the others waiting their turn in the order they became due, with none of
their timeout spent; a rebalance wakes the waiting ones to give their records back."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, cast

from aiokafka import ConsumerRecord

from services.dispatcher.lanes import Attempt, Lanes, Pace, sending_slots
from services.shared import OutRecord
from tests.unit.test_lanes_rebalance import OWNED, _Consumer, _record, _until, _written


class _Endpoints:
    """Deliveries that, once due, hold their request open until released."""

    def __init__(self) -> None:
        self.sending = 0
        self.most_at_once = 0
        self.started: list[tuple[bytes | None, int]] = []
        self.withdrawn: list[int] = []
        self.release = asyncio.Event()

    async def attempt(self, record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        try:
            await pace(None)
        except Exception:
            self.withdrawn.append(record.offset)
            raise
        self.started.append((record.key, record.offset))
        self.sending += 1
        self.most_at_once = max(self.most_at_once, self.sending)
        try:
            await self.release.wait()
        finally:
            self.sending -= 1
        return []


def _lanes(consumer: _Consumer, attempt: Attempt, *, sending_max: int) -> Lanes:
    """Lanes with room for every delivery these tests send: only the sending slots hold
    any back."""
    return Lanes(
        cast(Any, consumer),
        attempt,
        _written,
        per_lane=10,
        backlog_max=100,
        sending_max=sending_max,
    )


async def test_no_more_requests_than_the_sending_slots_go_out_at_once() -> None:
    consumer = _Consumer()
    endpoints = _Endpoints()
    lanes = _lanes(consumer, endpoints.attempt, sending_max=2)
    running = asyncio.create_task(lanes.run())
    try:
        # Three webhooks, two deliveries each, all due at once.
        records = [_record(OWNED, offset, key) for offset, key in enumerate([b"a", b"b", b"c"] * 2)]
        await consumer.batches.put({OWNED: records})
        await _until(lambda: len(endpoints.started) == 2)
        await asyncio.sleep(0.1)
        assert len(endpoints.started) == 2, "the other four wait for a slot"
        endpoints.release.set()
        await _until(lambda: len(endpoints.started) == 6)
        assert endpoints.most_at_once == 2
        # Waiting ones went in the order they became due.
        assert [offset for _, offset in endpoints.started] == [0, 1, 2, 3, 4, 5]
        await _until(lambda: lanes._sending == 0)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_rebalance_wakes_the_deliveries_waiting_for_a_slot() -> None:
    """They give their records back (their partition's next owner, or this process once
    the assignment is in, sends them) instead of holding the hand-over up."""
    consumer = _Consumer()
    endpoints = _Endpoints()
    lanes = _lanes(consumer, endpoints.attempt, sending_max=1)
    running = asyncio.create_task(lanes.run())
    try:
        await consumer.batches.put({OWNED: [_record(OWNED, 0, b"a"), _record(OWNED, 1, b"b")]})
        await _until(lambda: len(endpoints.started) == 1)
        await lanes.hand_over(within=0.05)  # offset 0 is still being sent
        await _until(lambda: endpoints.withdrawn == [1])
        endpoints.release.set()
        lanes.reassigned()
        # Sent once the assignment is in, with the slot the withdrawn one gave back.
        await _until(lambda: len(endpoints.started) == 2)
        await _until(lambda: lanes._sending == 0)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


def test_the_sending_slots_leave_room_for_the_pool_and_the_process_own_files() -> None:
    assert sending_slots(None) is None
    assert sending_slots(1024) == (1024 - 256) // 2
    assert sending_slots(20_000) == (20_000 - 256) // 2
    assert sending_slots(100) == 16, "a few, however low the limit"


async def test_a_webhooks_rate_holds_when_sending_slots_free_up_together() -> None:
    """Deliveries of a rate-limited webhook that took their rate slots while every sending
    slot was held would otherwise all go the moment slots free up: the rate holds between
    the requests themselves."""
    consumer = _Consumer()
    release = asyncio.Event()
    sent_at: list[float] = []
    loop = asyncio.get_running_loop()

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        if record.key == b"slow":
            await pace(None)
            await release.wait()
            return []
        while not await pace(5.0):  # as the handler asks again, after a new rate
            pass
        sent_at.append(loop.time())
        return []

    lanes = _lanes(consumer, attempt, sending_max=1)
    running = asyncio.create_task(lanes.run())
    try:
        await consumer.batches.put({OWNED: [_record(OWNED, 0, b"slow")]})
        await _until(lambda: lanes._sending == 1)
        rated = [_record(OWNED, offset, b"rated") for offset in range(1, 5)]
        await consumer.batches.put({OWNED: rated})
        await asyncio.sleep(1.0)  # past every rate slot they took meanwhile
        assert sent_at == []
        release.set()
        await _until(lambda: len(sent_at) == 4)
        gaps = [later - earlier for earlier, later in itertools.pairwise(sent_at)]
        # 0.2 s apart by their slots; one woken late (up to 0.18 s on a loaded machine)
        # leaves the next a little less, not the microseconds of a bunch.
        assert min(gaps) >= 0.02, gaps
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
