"""The fetch gate's bookkeeping on a real (unconnected) consumer with two partitions, and
the retry timer's view of a partition read to its end and of its partitions after
rebalances."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from services.dispatcher import retry_timer
from services.dispatcher.flow import FetchGate, in_records
from services.dispatcher.offsets import AssignmentWatch, OffsetTracker
from services.dispatcher.retry_timer import RetryTimer, Waiting
from services.shared import HandOver, Topics

FIRST, SECOND = TopicPartition("deliveries", 0), TopicPartition("deliveries", 1)


@pytest.fixture
async def consumer() -> AsyncIterator[AIOKafkaConsumer]:
    # Assignment, pause and resume are bookkeeping in the client: no broker is needed.
    client = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", enable_auto_commit=False)
    client.assign([FIRST, SECOND])
    yield client
    await client.stop()


async def test_only_the_partition_holding_its_share_is_paused(
    consumer: AIOKafkaConsumer,
) -> None:
    gate = FetchGate(consumer)
    room = gate.hold_shares({FIRST: 5, SECOND: 1}, limit=10)
    assert consumer.paused() == {FIRST}
    # Room left is 4, and no fetch may bring more than a share (5).
    assert room == 4


async def test_a_partition_is_resumed_once_below_its_share(consumer: AIOKafkaConsumer) -> None:
    gate = FetchGate(consumer)
    gate.hold_shares({FIRST: 5}, limit=10)
    assert gate.hold_shares({FIRST: 4}, limit=10) == 5
    assert consumer.paused() == set()


async def test_everything_is_paused_once_the_total_reaches_the_limit(
    consumer: AIOKafkaConsumer,
) -> None:
    gate = FetchGate(consumer)
    # Neither partition holds its share of 50, but together they hold the whole limit.
    room = gate.hold_shares({FIRST: 49, SECOND: 51}, limit=100)
    assert consumer.paused() == {FIRST, SECOND}
    assert room == 1, "a fetch asks for at least one record; paused, it brings none"


async def test_a_fetch_never_brings_more_than_a_share(consumer: AIOKafkaConsumer) -> None:
    gate = FetchGate(consumer)
    assert gate.hold_shares({}, limit=10_000) == 5_000


async def test_a_partition_handed_back_unpaused_by_a_rebalance_is_paused_again(
    consumer: AIOKafkaConsumer,
) -> None:
    gate = FetchGate(consumer)
    gate.hold_shares({FIRST: 5}, limit=10)
    consumer.assign([FIRST, SECOND])  # a rebalance: the same partitions, unpaused
    assert consumer.paused() == set()
    gate.hold_shares({FIRST: 5}, limit=10)
    assert consumer.paused() == {FIRST}


async def test_one_busy_partition_may_take_the_room_the_others_do_not_use(
    consumer: AIOKafkaConsumer,
) -> None:
    """With a reserve: each partition's part of it is 100 // 4 = 25. FIRST is past its
    part, but the room left (70) is more than SECOND is owed (25): nothing is paused."""
    gate = FetchGate(consumer)
    assert gate.hold_with_reserve({FIRST: 30}, limit=100) == 25
    assert consumer.paused() == set()


async def test_the_reserve_left_is_kept_for_the_partitions_below_their_part(
    consumer: AIOKafkaConsumer,
) -> None:
    gate = FetchGate(consumer)
    # Room left 15, SECOND owed 20: FIRST stops, SECOND reads on.
    assert gate.hold_with_reserve({FIRST: 80, SECOND: 5}, limit=100) == 15
    assert consumer.paused() == {FIRST}
    # FIRST's records were forwarded: room again, and it reads on.
    gate.hold_with_reserve({FIRST: 10, SECOND: 5}, limit=100)
    assert consumer.paused() == set()


async def test_with_a_reserve_everything_is_paused_at_the_limit(
    consumer: AIOKafkaConsumer,
) -> None:
    gate = FetchGate(consumer)
    assert gate.hold_with_reserve({FIRST: 90, SECOND: 10}, limit=100) == 1
    assert consumer.paused() == {FIRST, SECOND}


async def test_the_retry_timer_knows_a_partition_read_to_its_end_and_not_paused(
    consumer: AIOKafkaConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Put-off first attempts move only from such a partition: their copies are then read
    back within a fetch, never after one of their webhook's later first attempts."""
    timer = RetryTimer(consumer, cast(Any, None), Topics("t."), pending_max=10)
    assert not timer._read_through(FIRST), "never fetched: nothing is known"
    monkeypatch.setattr(consumer, "highwater", lambda partition: 5)
    timer._tracker.add(FIRST, 3)
    assert not timer._read_through(FIRST), "offset 4 is in the log and not read"
    timer._tracker.add(FIRST, 4)
    assert timer._read_through(FIRST)
    timer._gate.hold_shares({FIRST: 5}, limit=10)
    assert not timer._read_through(FIRST), "paused: what is written next stays unread"


def _waiting_in(timer: RetryTimer, partition: TopicPartition, offset: int) -> None:
    timer._tracker.add(partition, offset)
    entry = Waiting(10**18, partition.topic, partition.partition, offset, b"wh", b"{}", False)
    heapq.heappush(timer._heap, entry)
    timer._waiting_values.add(entry.value)


async def test_the_retry_timer_keeps_what_waits_through_rebalances_that_leave_it(
    consumer: AIOKafkaConsumer,
) -> None:
    timer = RetryTimer(consumer, cast(Any, None), Topics("t."), pending_max=10)
    _waiting_in(timer, FIRST, 3)
    _waiting_in(timer, SECOND, 4)
    consumer.assign([FIRST])
    timer.reassigned()
    consumer.assign([FIRST, SECOND])
    timer.reassigned()
    timer._forget_revoked()
    assert [entry.offset for entry in timer._heap] == [3], "SECOND was away in between"
    assert timer._tracker.seen(FIRST, 3)


async def test_the_retry_timer_reads_again_after_two_rebalances_between_two_turns(
    consumer: AIOKafkaConsumer,
) -> None:
    """The partition may have been another process's in between, which forwarded and
    committed what waits here: it is dropped, and read again from the commit point."""
    timer = RetryTimer(consumer, cast(Any, None), Topics("t."), pending_max=10)
    _waiting_in(timer, FIRST, 3)
    consumer.assign([SECOND])
    timer.reassigned()
    consumer.assign([FIRST, SECOND])
    timer.reassigned()
    assert timer._assignments.owned() == {SECOND}, "nor is its commit point moved"
    timer._forget_revoked()
    assert timer.pending == 0
    assert not timer._tracker.seen(FIRST, 3)
    _waiting_in(timer, FIRST, 3)
    timer._forget_revoked()
    assert timer.pending == 1, "once: the next look keeps what it reads"


async def test_a_generation_completed_without_this_process_counts_as_a_move(
    consumer: AIOKafkaConsumer,
) -> None:
    """Its join was retried without a revoke (or it was expelled) while another member
    held the partitions for a generation: one revoke and one assignment, the same
    partitions, and still any of them may have moved."""
    coordinator = SimpleNamespace(generation=4)
    consumer._coordinator = coordinator
    try:
        watch = AssignmentWatch(consumer)
        watch.reassigned()
        assert watch.look() == {FIRST, SECOND}
        coordinator.generation = 5
        watch.reassigned()
        assert watch.look() == {FIRST, SECOND}, "the next generation: nothing moved"
        coordinator.generation = 7
        watch.reassigned()
        assert watch.owned() == set()
        assert watch.look() == set()
        assert watch.look() == {FIRST, SECOND}, "once: the next look keeps them"
    finally:
        consumer._coordinator = None


async def test_a_generation_missed_after_the_start_counts_as_a_move(
    consumer: AIOKafkaConsumer,
) -> None:
    """The consumer's start ran its first assignment before the watch was made; expelled
    from that generation and back two later, it may have lost its partitions between."""
    coordinator = SimpleNamespace(generation=1)
    consumer._coordinator = coordinator
    try:
        watch = AssignmentWatch(consumer)
        coordinator.generation = 3
        watch.reassigned()
        assert watch.look() == set()
    finally:
        consumer._coordinator = None


async def test_a_refused_forward_backs_off_without_holding_up_a_hand_over(
    consumer: AIOKafkaConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pause after the broker refused a forward is taken outside the loop's turn: a
    rebalance's hand-over (about 2.4 s in all) must not wait it out."""
    timer = RetryTimer(consumer, cast(Any, None), Topics("t."), pending_max=10)
    timer.reassigned()
    timer._forget_revoked()
    entry = Waiting(0, FIRST.topic, FIRST.partition, 3, b"wh", b"{}", False)
    timer._tracker.add(FIRST, 3)
    heapq.heappush(timer._heap, entry)
    refused = asyncio.Event()

    async def broker_refuses(producer: Any, records: Any) -> dict[int, BaseException]:
        refused.set()
        return {0: KafkaConnectionError("broker busy")}

    async def nothing_fetched(**_: Any) -> dict[Any, Any]:
        await asyncio.sleep(0.01)
        return {}

    async def nothing_to_commit() -> None:
        return None

    monkeypatch.setattr(retry_timer, "send_each", broker_refuses)
    monkeypatch.setattr(timer, "_commit", nothing_to_commit)
    monkeypatch.setattr(consumer, "getmany", nothing_fetched)
    running = asyncio.create_task(timer.run())
    try:
        await asyncio.wait_for(refused.wait(), 2)
        await asyncio.sleep(0.05)  # the loop is now backing off
        handing_over = asyncio.get_running_loop().time()
        await timer.hand_over(2.4)
        assert asyncio.get_running_loop().time() - handing_over < 0.5
        assert timer.pending == 1, "the refused record waits for another try"
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


def test_bytes_weigh_as_records_once_they_are_the_larger_share() -> None:
    """Ten records' limit and 1,000 bytes': 100 bytes weigh as one record."""
    counts = {FIRST: 2, SECOND: 3}
    sizes = {FIRST: 950, SECOND: 120}
    assert in_records(counts, sizes, 10, 1_000) == {FIRST: 10, SECOND: 3}
    assert in_records(counts, sizes, 10, None) == counts


def test_the_tracker_counts_the_bytes_still_open() -> None:
    tracker = OffsetTracker()
    tracker.add(FIRST, 0, 100)
    tracker.add(FIRST, 1, 50)
    tracker.add(FIRST, 1, 50)  # read again after a rebalance: counted once
    tracker.add(SECOND, 0, 7)
    tracker.done(FIRST, 0)
    tracker.done(FIRST, 0)
    assert tracker.open_bytes() == {FIRST: 50, SECOND: 7}
    tracker.retain([SECOND])
    assert tracker.open_bytes() == {SECOND: 7}


async def test_the_retry_timer_holds_a_partition_back_by_its_bytes(
    consumer: AIOKafkaConsumer,
) -> None:
    """One retry of 900 KB weighs as ninety of a hundred records here: the partition
    holding it is paused while the other may still read its reserve."""
    timer = RetryTimer(
        consumer, cast(Any, None), Topics("t."), pending_max=100, pending_max_bytes=1_000_000
    )
    timer._tracker.add(FIRST, 0, 900_000)
    timer._apply_backpressure()
    assert consumer.paused() == {FIRST}
    timer._tracker.done(FIRST, 0)
    timer._apply_backpressure()
    assert consumer.paused() == set()


async def test_a_loop_handed_over_for_a_stop_stays_handed_over() -> None:
    """A rebalance ending while the process stops does not set the loop going again: it is
    about to be cancelled, and what it began would be cut short."""
    hand_over = HandOver(1.0)
    handed_over: list[float] = []
    resumed: list[bool] = []

    async def before_revoke(within: float) -> None:
        handed_over.append(within)

    hand_over.before_revoke = before_revoke
    hand_over.after_assign = lambda: resumed.append(True)
    await hand_over.on_partitions_assigned({FIRST})
    assert resumed == [True]
    await hand_over.stop()
    assert handed_over == [1.0]
    await hand_over.on_partitions_assigned({FIRST})
    assert resumed == [True]
