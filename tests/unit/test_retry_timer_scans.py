"""A turn of the retry timer's loop does not look through every waiting retry: while an
endpoint is down 100,000 may wait, and the loop turns many times a second on the event
loop the delivery lanes share. Only a partition lost makes it filter what waits."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any, cast

from aiokafka import TopicPartition

from services.dispatcher.retry_timer import RetryTimer, Waiting
from services.shared import Topics

FIRST, SECOND = TopicPartition("t.retry.0", 0), TopicPartition("t.retry.0", 1)


class _Consumer:
    """Just what the timer asks of a consumer here: its assignment and commits."""

    def __init__(self) -> None:
        self.assigned = {FIRST, SECOND}
        self.committed: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.update(offsets)


class _CountingHeap(list[Waiting]):
    """The timer's heap, counting the entries anything iterates over."""

    inspected = 0

    def __iter__(self) -> Iterator[Waiting]:
        for entry in super().__iter__():
            self.inspected += 1
            yield entry


def _timer(consumer: _Consumer, pending: int) -> tuple[RetryTimer, _CountingHeap]:
    timer = RetryTimer(cast(Any, consumer), cast(Any, None), Topics("t."), pending_max=pending)
    timer._forget_revoked()  # the first look, as after the first fetch
    heap = _CountingHeap()
    for offset in range(pending):
        partition = FIRST if offset % 2 else SECOND
        timer._tracker.add(partition, offset)
        value = b'{"n": %d}' % offset
        heap.append(Waiting(10**18 + offset, partition.topic, partition.partition, offset,
                            b"wh", value, False))  # fmt: skip
        timer._waiting_values.add(value)
    heapq.heapify(heap)
    timer._heap = heap
    heap.inspected = 0
    return timer, heap


async def test_a_turn_with_the_same_partitions_does_not_look_through_the_heap() -> None:
    consumer = _Consumer()
    timer, heap = _timer(consumer, 100_000)
    for _ in range(20):
        timer._forget_revoked()
        await timer._commit()
    assert heap.inspected == 0, f"{heap.inspected} waiting retries looked at in 20 turns"
    assert timer._heap is heap, "nothing was lost: the heap is not rebuilt"
    assert timer.pending == 100_000
    assert consumer.committed == {FIRST: 1, SECOND: 0}


async def test_a_partition_lost_still_drops_what_waits_of_it() -> None:
    consumer = _Consumer()
    timer, _ = _timer(consumer, 1000)
    consumer.assigned = {FIRST}
    timer.reassigned()
    timer._forget_revoked()
    assert timer.pending == 500
    assert {(entry.topic, entry.partition) for entry in timer._heap} == {
        (FIRST.topic, FIRST.partition)
    }
    assert timer._heap[0].offset == 1, "still a heap"
    assert timer._waiting_values == {entry.value for entry in timer._heap}
    assert not timer._tracker.seen(SECOND, 0), "read again from its commit point"
    # The next turns, with the assignment as it is now, leave the heap alone.
    kept = timer._heap
    timer._forget_revoked()
    await timer._commit()
    assert timer._heap is kept
    assert consumer.committed == {FIRST: 1}
