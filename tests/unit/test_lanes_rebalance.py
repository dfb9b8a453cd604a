"""The delivery lanes around a rebalance. A partition gained waits, unread and unhandled,
until what its last owner knew about it is read (decision 54), while the partitions owned
already go on; before partitions move, nothing more is sent until the new assignment is
in (decision 55). Deliveries waiting for a rate slot give it up for a rebalance, a stop
or a change to their endpoint's rate. A partition moved away and back between two looks
is read again (decision 60), and a failing fetch does not keep the lanes, or the retry
timer, from looking."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError

from services.dispatcher import lanes as lanes_module
from services.dispatcher.lanes import Lanes, Pace
from services.dispatcher.retry_timer import RetryTimer
from services.shared import OutRecord, Topics

OWNED, GAINED = TopicPartition("t.deliveries", 0), TopicPartition("t.deliveries", 1)


class _Consumer:
    """Just what the lanes ask of a consumer: batches, an assignment, pauses, commits."""

    def __init__(self) -> None:
        self.assigned = {OWNED}
        self.paused: set[TopicPartition] = set()
        self.committed: dict[TopicPartition, int] = {}
        self.batches: asyncio.Queue[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]
        self.batches = asyncio.Queue()
        # Set: every fetch fails, as with a broker gone away; ``fetch_failed`` once one has.
        self.broken = False
        self.fetch_failed = asyncio.Event()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def getmany(
        self, *, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        if self.broken:
            self.fetch_failed.set()
            await asyncio.sleep(0.05)
            raise KafkaConnectionError("the broker is away")
        try:
            return await asyncio.wait_for(self.batches.get(), timeout_ms / 1000)
        except TimeoutError:
            return {}

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused -= set(partitions)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.update(offsets)


def _record(
    partition: TopicPartition, offset: int, key: bytes = b"wh"
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        partition.topic, partition.partition, offset, 0, 0, key, b"{}", None, 2, 2, []
    )


async def _until(check: Any) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        if check():
            return
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def _written(_source: ConsumerRecord, records: list[OutRecord]) -> None:
    """Outcomes written at once (nowhere)."""


async def test_a_gained_partition_waits_for_its_last_owners_put_offs() -> None:
    consumer = _Consumer()
    handled: list[tuple[int, int]] = []
    read: list[set[TopicPartition]] = []
    release = asyncio.Event()

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        handled.append((record.partition, record.offset))
        return []

    async def publish(_source: ConsumerRecord, records: list[OutRecord]) -> None:
        pass

    async def gained(partitions: set[TopicPartition]) -> None:
        read.append(partitions)
        if GAINED in partitions:
            await release.wait()

    lanes = Lanes(
        cast(Any, consumer), attempt, publish, per_lane=1, backlog_max=100, on_gained=gained
    )
    running = asyncio.create_task(lanes.run())
    try:
        await _until(lambda: read == [{OWNED}] and OWNED not in consumer.paused)
        consumer.assigned.add(GAINED)
        # Fetched in the same turn as the partition was found gained.
        await consumer.batches.put({OWNED: [_record(OWNED, 0)], GAINED: [_record(GAINED, 0)]})
        await _until(lambda: (0, 0) in handled)
        await consumer.batches.put({OWNED: [_record(OWNED, 1)]})
        await _until(lambda: (0, 1) in handled)
        assert read == [{OWNED}, {GAINED}]
        assert GAINED in consumer.paused
        assert (1, 0) not in handled
        release.set()
        await _until(lambda: GAINED not in consumer.paused)
        await consumer.batches.put({GAINED: [_record(GAINED, 1)]})
        await _until(lambda: (1, 1) in handled)
        assert handled == [(0, 0), (0, 1), (1, 0), (1, 1)]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_read_that_fails_still_lets_the_partition_go_on() -> None:
    consumer = _Consumer()
    handled: list[int] = []

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        handled.append(record.offset)
        return []

    async def publish(_source: ConsumerRecord, records: list[OutRecord]) -> None:
        pass

    async def gained(partitions: set[TopicPartition]) -> None:
        raise RuntimeError("a bug")

    lanes = Lanes(
        cast(Any, consumer), attempt, publish, per_lane=1, backlog_max=100, on_gained=gained
    )
    running = asyncio.create_task(lanes.run())
    try:
        await consumer.batches.put({OWNED: [_record(OWNED, 0)]})
        await _until(lambda: handled == [0] and OWNED not in consumer.paused)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


def _paced_lanes(
    *, per_lane: int = 3, rate: float | None = 0.5
) -> tuple[_Consumer, Lanes, list[int]]:
    """Lanes sending one delivery every two seconds (by default), and the offsets they
    send."""
    consumer = _Consumer()
    sent: list[int] = []

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        await pace(None)
        sent.append(record.offset)
        return []

    async def publish(_source: ConsumerRecord, records: list[OutRecord]) -> None:
        pass

    lanes = Lanes(
        cast(Any, consumer), attempt, publish, per_lane=per_lane, backlog_max=100, rate=rate
    )
    return consumer, lanes, sent


async def test_a_rebalance_takes_back_deliveries_waiting_for_their_rate_slot() -> None:
    """Their slots may be seconds away: waiting for them would use up the rebalance, and
    sending them after it would send them twice. They go back, in order, and are sent
    once the rebalance leaves their partition here."""
    consumer, lanes, sent = _paced_lanes()
    running = asyncio.create_task(lanes.run())
    try:
        await consumer.batches.put({OWNED: [_record(OWNED, n) for n in range(4)]})
        await _until(lambda: sent == [0])
        started = asyncio.get_running_loop().time()
        await lanes.hand_over(within=10)
        assert asyncio.get_running_loop().time() - started < 1.9  # the next slot: 2 s
        await asyncio.sleep(0.3)
        assert sent == [0]
        lanes.reassigned()
        await _until(lambda: sent[:2] == [0, 1])
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_stop_neither_waits_for_rate_slots_nor_sends_their_deliveries() -> None:
    """Their slots may be further off than the stop's grace: rather than hold the stop up
    and go out during it, they are left uncommitted for the next process to send."""
    consumer, lanes, sent = _paced_lanes()
    running = asyncio.create_task(lanes.run())
    try:
        await consumer.batches.put({OWNED: [_record(OWNED, n) for n in range(4)]})
        await _until(lambda: sent == [0])
        started = asyncio.get_running_loop().time()
        await lanes.drain(grace_seconds=10)
        assert asyncio.get_running_loop().time() - started < 1.9  # the next slot: 2 s
        assert sent == [0]
        assert consumer.committed == {OWNED: 1}
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


class _Paced:
    """Lanes over a stand-in consumer, their one endpoint paced at ``rate`` a second; a
    delivery whose slot a wake gave up asks again at the rate then. ``sent``: when each
    delivery went out."""

    def __init__(self, rate: float) -> None:
        self.consumer = _Consumer()
        self.rate = rate
        self.sent: list[float] = []
        self.lanes = Lanes(
            cast(Any, self.consumer), self._attempt, self._publish, per_lane=3, backlog_max=100
        )

    async def _attempt(self, record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        while not await pace(self.rate):
            pass
        self.sent.append(asyncio.get_running_loop().time())
        return []

    async def _publish(self, _source: ConsumerRecord, records: list[OutRecord]) -> None:
        pass


async def _sent_at_rates(change: Any) -> list[float]:
    """When each of four deliveries to one endpoint went out, at 0.2 a second until
    ``change(paced)`` once the first was sent."""
    paced = _Paced(0.2)
    running = asyncio.create_task(paced.lanes.run())
    try:
        await paced.consumer.batches.put({OWNED: [_record(OWNED, n) for n in range(4)]})
        await _until(lambda: len(paced.sent) == 1)
        change(paced)
        await _until(lambda: len(paced.sent) == 4)
        return [at - paced.sent[0] for at in paced.sent]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_rate_raised_reaches_the_deliveries_already_waiting_for_slots() -> None:
    """At 0.2 a second the next three deliveries hold slots 5, 10 and 15 s away; raised to
    10 a second, they go out 100 ms apart, not at the slots taken at the old rate."""

    def raise_rate(paced: _Paced) -> None:
        paced.rate = 10.0
        paced.lanes.wake(b"wh")

    offsets = await _sent_at_rates(raise_rate)
    assert offsets[-1] < 2.0, offsets
    # Still paced, at the new rate: three slots 100 ms apart after the first one's (a
    # timer fires at its time or later, never earlier).
    assert offsets[-1] >= 0.25, offsets


async def test_a_wake_for_another_endpoint_leaves_the_slots_as_they_were() -> None:
    """Only the lane of the webhook that changed asks again: the waiting deliveries of
    another keep their slots (the first of them is 5 s away)."""

    paced = _Paced(0.2)
    running = asyncio.create_task(paced.lanes.run())
    try:
        await paced.consumer.batches.put({OWNED: [_record(OWNED, n) for n in range(4)]})
        await _until(lambda: len(paced.sent) == 1)
        paced.rate = 10.0
        paced.lanes.wake(b"another")
        # Woken, this lane would send the rest within 0.3 s.
        await asyncio.sleep(1.5)
        assert len(paced.sent) == 1, "the deliveries went out before their slots"
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


class _Gated:
    """Lanes over a stand-in consumer, one delivery at a time, offset 0 held at the
    endpoint until ``gate`` opens. ``sent``: the offsets sent; ``read``: the partitions
    each take-over read was for."""

    def __init__(self) -> None:
        self.consumer = _Consumer()
        self.sent: list[int] = []
        self.read: list[set[TopicPartition]] = []
        self.gate = asyncio.Event()
        self.lanes = Lanes(
            cast(Any, self.consumer),
            self._attempt,
            self._publish,
            per_lane=1,
            backlog_max=100,
            on_gained=self._gained,
        )

    async def _attempt(self, record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        if record.offset == 0:
            await self.gate.wait()
        self.sent.append(record.offset)
        return []

    async def _publish(self, _source: ConsumerRecord, records: list[OutRecord]) -> None:
        pass

    async def _gained(self, partitions: set[TopicPartition]) -> None:
        self.read.append(partitions)


async def _two_rebalances_in_one_turn(*, away: bool) -> tuple[list[int], list[set[TopicPartition]]]:
    """Records 0 to 2 wait (0 being sent) when two rebalances end before the loop looks
    again, the partition away in between or not; then the partition is fetched from 2,
    where its other owner would have committed. What was sent, and the take-over reads."""
    gated = _Gated()
    consumer, lanes = gated.consumer, gated.lanes
    turn, entered = asyncio.Event(), asyncio.Event()
    fetch = consumer.getmany

    async def held_fetch(
        *, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        # The loop stays in this fetch until the test lets it turn.
        entered.set()
        await turn.wait()
        return await fetch(timeout_ms=timeout_ms, max_records=max_records)

    running = asyncio.create_task(lanes.run())
    try:
        consumer.getmany = held_fetch  # type: ignore[method-assign]
        turn.set()
        await consumer.batches.put({OWNED: [_record(OWNED, n) for n in range(3)]})
        await _until(lambda: gated.read == [{OWNED}] and lanes.backlog == 3)
        turn.clear()
        entered.clear()
        await entered.wait()  # the loop's next fetch holds it now
        for assigned in (set() if away else {OWNED}, {OWNED}):
            await lanes.hand_over(within=0.05)  # offset 0 is still being sent
            consumer.assigned = assigned
            lanes.reassigned()
        await consumer.batches.put({OWNED: [_record(OWNED, 2)]})
        turn.set()
        gated.gate.set()
        await _until(lambda: 2 in gated.sent)
        await asyncio.sleep(0.3)
        return gated.sent, gated.read
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_partition_moved_away_and_back_between_two_turns_is_read_again() -> None:
    """It may have been another process's in between, which sent and committed what waits
    here (up to 2): that is dropped, the put-offs are read back, and the partition is read
    again from its commit point: 1 is not sent a second time."""
    sent, read = await _two_rebalances_in_one_turn(away=True)
    assert sent == [0, 2]
    assert read == [{OWNED}, {OWNED}]


async def test_a_partition_kept_through_two_rebalances_keeps_what_waits() -> None:
    """Never away, it had no other owner: nothing is dropped or read back, and what was
    fetched again from the commit point is not taken twice."""
    sent, read = await _two_rebalances_in_one_turn(away=False)
    assert sent == [0, 1, 2]
    assert read == [{OWNED}]


async def test_a_rate_lowered_while_none_waits_still_spaces_the_next_delivery() -> None:
    """Lowered from 10 to 1 a second just after a delivery, with nothing waiting: the lane
    is not forgotten as idle (its next slot was given up with the change), so the next
    delivery still goes a second after the last, not at once."""
    paced = _Paced(10.0)
    running = asyncio.create_task(paced.lanes.run())
    try:
        await paced.consumer.batches.put({OWNED: [_record(OWNED, 0)]})
        await _until(lambda: len(paced.sent) == 1)
        paced.rate = 1.0
        paced.lanes.wake(b"wh")
        paced.lanes._swept_at = float("-inf")  # the next turn sweeps idle lanes away
        await asyncio.sleep(0.3)
        await paced.consumer.batches.put({OWNED: [_record(OWNED, 1)]})
        await _until(lambda: len(paced.sent) == 2)
        assert paced.sent[1] - paced.sent[0] >= 0.95
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_the_lanes_resume_after_a_rebalance_while_every_fetch_fails() -> None:
    """A fetch that fails takes nothing, and the turn still sees the rebalance end: the
    delivery waiting behind the one in flight goes out, though no fetch succeeds."""
    gated = _Gated()
    running = asyncio.create_task(gated.lanes.run())
    try:
        await gated.consumer.batches.put({OWNED: [_record(OWNED, 0), _record(OWNED, 1)]})
        await _until(lambda: gated.lanes.backlog == 2)
        gated.consumer.broken = True
        await gated.consumer.fetch_failed.wait()  # no fetch succeeds from now on
        await gated.lanes.hand_over(within=0.05)  # offset 0 is still being sent
        gated.lanes.reassigned()
        gated.gate.set()
        await _until(lambda: gated.sent == [0, 1])
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_the_retry_timer_sees_a_rebalance_end_while_every_fetch_fails() -> None:
    """It forwards nothing between a rebalance's end and its next look at the assignment;
    a fetch that fails must not keep that look from happening."""
    consumer = _Consumer()
    consumer.broken = True
    timer = RetryTimer(cast(Any, consumer), cast(Any, None), Topics("t."), pending_max=10)
    running = asyncio.create_task(timer.run())
    try:
        await consumer.fetch_failed.wait()
        timer.reassigned()
        assert timer._assignments.rebalanced
        await _until(lambda: not timer._assignments.rebalanced)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


@pytest.mark.parametrize("sends", [True, False], ids=["would_send", "would_put_off"])
async def test_a_delivery_whose_partition_moved_while_it_waited_neither_sends_nor_writes(
    sends: bool,
) -> None:
    """A delivery held past the rebalance's bound before it sends (a database read that
    took long) finds its partition gone when it goes on: it sends nothing and writes
    nothing (not even a put-off), and is not put back in its lane; the partition's new
    owner has it."""
    consumer = _Consumer()
    waiting, go = asyncio.Event(), asyncio.Event()
    sent: list[int] = []
    published: list[OutRecord] = []

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        waiting.set()
        await go.wait()
        if not sends:
            return [("t.retry.1", b"wh", b"put off")]
        await pace(None)
        sent.append(record.offset)
        return [("t.attempts", None, b"attempt")]

    async def publish(_source: ConsumerRecord, records: list[OutRecord]) -> None:
        published.extend(records)

    lanes = Lanes(cast(Any, consumer), attempt, publish, per_lane=1, backlog_max=100)
    running = asyncio.create_task(lanes.run())
    try:
        await consumer.batches.put({OWNED: [_record(OWNED, 0)]})
        await waiting.wait()
        await lanes.hand_over(within=0.05)  # the delivery is still waiting
        consumer.assigned = set()
        lanes.reassigned()
        await _until(lambda: not lanes._handing_over)  # the loop saw the partition go
        go.set()
        await asyncio.sleep(0.2)
        assert (sent, published) == ([], [])
        assert not any(lane.waiting for lane in lanes._lanes.values())
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_large_records_pause_their_partition_by_their_bytes() -> None:
    """Counted alone, ten thousand records of 900 KB would be 9 GB in memory: records
    waiting for a stalled endpoint stop their partition's fetching once they hold its
    share of the bytes, long before its share of the records."""
    consumer = _Consumer()
    consumer.assigned = {OWNED, GAINED}
    stalled = asyncio.Event()

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        await stalled.wait()
        return []

    async def publish(_source: ConsumerRecord, records: list[OutRecord]) -> None:
        pass

    lanes = Lanes(
        cast(Any, consumer),
        attempt,
        publish,
        per_lane=1,
        backlog_max=10_000,
        backlog_max_bytes=4_000_000,
    )
    big = b"x" * 600_000

    def large(partition: TopicPartition, offset: int) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(
            partition.topic, partition.partition, offset, 0, 0, b"wh", big, None, 2, len(big), []
        )

    running = asyncio.create_task(lanes.run())
    try:
        # 1.8 MB waits in OWNED: under its 2 MB share, it reads on.
        await consumer.batches.put({OWNED: [large(OWNED, n) for n in range(3)]})
        await consumer.batches.put({GAINED: [_record(GAINED, 0)]})
        await _until(lambda: consumer.batches.empty())
        await asyncio.sleep(0.1)
        assert consumer.paused == set()
        # 2.4 MB: past its share of the bytes with four records of a 5,000 share.
        await consumer.batches.put({OWNED: [large(OWNED, 3)]})
        await _until(lambda: consumer.paused == {OWNED})
    finally:
        stalled.set()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_hand_over_commits_what_finished_while_a_slow_delivery_is_still_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow endpoint is nearly always in flight somewhere when a rebalance comes: past
    the hand-over's bound the deliveries that finished are committed anyway, so their next
    owner does not send them again; only the slow one goes again."""
    # No periodic commit (the loop's clock may be past any finite interval from 0).
    monkeypatch.setattr(lanes_module, "_COMMIT_INTERVAL_SECONDS", float("inf"))
    consumer = _Consumer()
    handled: list[int] = []
    stuck = asyncio.Event()

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        if record.key == b"slow":
            await stuck.wait()
        handled.append(record.offset)
        return []

    lanes = Lanes(cast(Any, consumer), attempt, _written, per_lane=1, backlog_max=100)
    running = asyncio.create_task(lanes.run())
    try:
        records = [_record(OWNED, 0, b"fast"), _record(OWNED, 1, b"slow")]
        records += [_record(OWNED, 2, b"fast")]
        await consumer.batches.put({OWNED: records})
        await _until(lambda: handled == [0, 2])
        assert consumer.committed.get(OWNED, 0) == 0
        started = asyncio.get_running_loop().time()
        await lanes.hand_over(within=0.5)
        assert asyncio.get_running_loop().time() - started < 1.5
        assert consumer.committed == {OWNED: 1}
    finally:
        stuck.set()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_once_a_stop_begins_no_delivery_starts_behind_those_being_sent() -> None:
    """Between the stop signal and the drain the service cancels its other loops; a
    delivery finishing meanwhile must not start the next one in its lane (each would get
    a whole grace of its own)."""
    consumer = _Consumer()
    started: list[int] = []
    first_sent = asyncio.Event()

    async def attempt(record: ConsumerRecord[bytes, bytes], pace: Pace) -> list[OutRecord]:
        started.append(record.offset)
        await first_sent.wait()
        return []

    lanes = Lanes(cast(Any, consumer), attempt, _written, per_lane=1, backlog_max=100)
    running = asyncio.create_task(lanes.run())
    try:
        await consumer.batches.put({OWNED: [_record(OWNED, n) for n in range(3)]})
        await _until(lambda: started == [0])
        lanes.stop_starting()
        first_sent.set()
        await asyncio.sleep(0.3)
        assert started == [0]
        await lanes.drain(grace_seconds=1)
        assert started == [0]
        assert consumer.committed == {OWNED: 1}
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_delivery_whose_partition_moves_before_it_first_runs_is_not_sent() -> None:
    """Its task is made, and its partition dropped (a rebalance seen without a revoke)
    before the task's first step: it counts as moved, and its new owner sends it."""
    _, lanes, sent = _paced_lanes(per_lane=1, rate=None)
    lanes._enqueue(_record(OWNED, 0))
    lanes._drop_waiting({OWNED})
    await asyncio.sleep(0.05)
    assert sent == []
    assert not lanes._tasks
