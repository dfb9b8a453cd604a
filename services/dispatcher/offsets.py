"""Which offsets are safe to commit when records finish out of order, and which partitions
a loop may still commit after rebalances.

A partition's commit point is its lowest unfinished offset (or one past the last record
seen when all are finished), so a crash re-reads every record whose outcome was not yet
durable and never skips one.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

# Finished offsets a partition's heap may hold beyond as many as are open, before it is
# rebuilt from the open ones.
_COMPACT_SLACK = 64


class OffsetTracker:
    def __init__(self) -> None:
        # Per partition, each unfinished offset with the bytes its record holds.
        self._open: dict[TopicPartition, dict[int, int]] = {}
        # Per partition, a min-heap of its unfinished offsets, in which finished ones stay
        # until they come to the top or the heap is rebuilt: the commit point is read off
        # it without looking at every offset (a retry partition may hold 100,000 of them,
        # and its commit point is asked for at every turn of the loop).
        self._lowest: dict[TopicPartition, list[int]] = {}
        self._bytes: dict[TopicPartition, int] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def __len__(self) -> int:
        return sum(len(offsets) for offsets in self._open.values())

    def open_counts(self) -> dict[TopicPartition, int]:
        """Unfinished records per partition."""
        return {partition: len(offsets) for partition, offsets in self._open.items()}

    def open_bytes(self) -> dict[TopicPartition, int]:
        """The bytes unfinished records hold, per partition."""
        return dict(self._bytes)

    def add(self, partition: TopicPartition, offset: int, size: int = 0) -> None:
        offsets = self._open.setdefault(partition, {})
        if offset not in offsets:
            heapq.heappush(self._lowest.setdefault(partition, []), offset)
        self._bytes[partition] = self._bytes.get(partition, 0) + size - offsets.get(offset, 0)
        offsets[offset] = size
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def done(self, partition: TopicPartition, offset: int) -> None:
        offsets = self._open.get(partition)
        if offsets is not None and offset in offsets:
            self._bytes[partition] -= offsets.pop(offset)
            lowest = self._lowest[partition]
            if not offsets:
                lowest.clear()
            elif len(lowest) > 2 * len(offsets) + _COMPACT_SLACK:
                # Finished offsets above one that stays (a far-off retry) would pile up:
                # rebuilt once they outnumber the open ones, at a cost the ``done`` calls
                # since the last rebuild pay for.
                lowest[:] = offsets
                heapq.heapify(lowest)

    def is_open(self, partition: TopicPartition, offset: int) -> bool:
        return offset in self._open.get(partition, ())

    def seen(self, partition: TopicPartition, offset: int) -> bool:
        """Whether this record was read before (finished or not) since the partition came."""
        return offset < self._next.get(partition, 0)

    def read_upto(self, partition: TopicPartition) -> int:
        """One past the last offset read from the partition (0 when none was)."""
        return self._next.get(partition, 0)

    def retain(self, partitions: Iterable[TopicPartition]) -> set[TopicPartition]:
        """Forget partitions this consumer no longer owns (their new owner re-reads them);
        returns the ones forgotten."""
        keep = set(partitions)
        dropped = {p for p in self._next if p not in keep}
        for table in (self._open, self._lowest, self._bytes, self._next, self._committed):
            for partition in [p for p in table if p not in keep]:
                del table[partition]
        return dropped

    def point(self, partition: TopicPartition) -> int | None:
        """Where a restart would resume this partition now."""
        if partition not in self._next:
            return None
        return self._point(partition, self._next[partition])

    def lag(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
        """Per partition the consumer owns and has read from: records in the log not yet
        finished here (records read and held, a retry waiting for its time, count as
        behind)."""
        behind = {}
        # No await between reading the assignment and asking about its partitions: a
        # rebalance cannot slip in between.
        for partition in consumer.assignment():
            highwater = consumer.highwater(partition)
            if highwater is None:
                continue  # not fetched yet: nothing known
            point = self.point(partition)
            # Nothing read from it yet is not nothing behind: a fetch of a partition
            # paused at once (a full backlog) is dropped, its high-water mark kept. Its
            # consumer's position says where reading starts; the caller asks it.
            if point is not None:
                behind[partition] = max(0, highwater - point)
        return behind

    def to_commit(self) -> dict[TopicPartition, int]:
        """Commit points that moved since the last call to ``committed``."""
        points = {}
        for partition, following in self._next.items():
            point = self._point(partition, following)
            if self._committed.get(partition) != point:
                points[partition] = point
        return points

    def committed(self, points: dict[TopicPartition, int]) -> None:
        self._committed.update(points)

    def _point(self, partition: TopicPartition, following: int) -> int:
        """The lowest unfinished offset, else ``following``; finished offsets at the top of
        the heap are let go on the way (each once)."""
        offsets = self._open.get(partition)
        if not offsets:
            return following
        lowest = self._lowest[partition]
        while lowest[0] not in offsets:
            heapq.heappop(lowest)
        return lowest[0]


class AssignmentWatch:
    """Which partitions a loop may go on with after rebalances it did not see happen.

    A loop looks at its consumer's assignment once a turn. A partition moved to another
    process and back by two rebalances between two looks seems never to have left, yet
    that process may have handled and committed what waits here. So every assignment a
    rebalance ends with is noted, and a partition missing from any of them since the last
    look counts as gone: the loop drops what it holds of it and reads it again from its
    commit point, as for a partition lost and gained."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        # In every assignment since the last look; None: no rebalance ended since.
        self._throughout: set[TopicPartition] | None = None
        # The generation the consumer joined already: its start ran the first assignment's
        # listener before any watch existed, and a jump from it must count too.
        self._generation = _generation(consumer)

    @property
    def rebalanced(self) -> bool:
        """A rebalance has ended since the last look: what the loop holds may be stale."""
        return self._throughout is not None

    def reassigned(self) -> None:
        """A rebalance has ended (from the listener's ``on_partitions_assigned``)."""
        generation = _generation(self._consumer)
        skipped = (
            generation is not None
            and self._generation is not None
            and generation > self._generation + 1
        )
        self._generation = generation
        # A generation completed without this process (its join was retried without a
        # revoke, or it was expelled): any partition may have had another owner in it.
        self._throughout = set() if skipped else self.owned()

    def owned(self) -> set[TopicPartition]:
        """The partitions owned now that had no other owner since the last look: the
        only ones whose commit point this process may move."""
        assigned: set[TopicPartition] = set(self._consumer.assignment())
        return assigned if self._throughout is None else assigned & self._throughout

    def look(self) -> set[TopicPartition]:
        """``owned``, from a turn of the loop, right after a fetch and before its records
        are taken: what the loop holds of any other partition is dropped (it was fetched
        before the partition moved, and is read again from the commit point), and the
        next look starts afresh."""
        kept = self.owned()
        self._throughout = None
        return kept


def _generation(consumer: AIOKafkaConsumer) -> int | None:
    """The group generation the consumer last joined (None: not a group member). Read
    from the client's coordinator: the client offers no public view of it."""
    generation = getattr(getattr(consumer, "_coordinator", None), "generation", None)
    return generation if isinstance(generation, int) else None
