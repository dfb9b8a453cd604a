"""Which offsets are safe to commit when records finish out of order.

A partition's commit point is its lowest unfinished offset (or one past the last record
seen when all are finished), so a crash re-reads every record whose outcome was not yet
durable and never skips one.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._open: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def __len__(self) -> int:
        return sum(len(offsets) for offsets in self._open.values())

    def open_counts(self) -> dict[TopicPartition, int]:
        """Unfinished records per partition."""
        return {partition: len(offsets) for partition, offsets in self._open.items()}

    def add(self, partition: TopicPartition, offset: int) -> None:
        self._open.setdefault(partition, set()).add(offset)
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def done(self, partition: TopicPartition, offset: int) -> None:
        offsets = self._open.get(partition)
        if offsets is not None:
            offsets.discard(offset)

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
        for table in (self._open, self._next, self._committed):
            for partition in [p for p in table if p not in keep]:
                del table[partition]
        return dropped

    def point(self, partition: TopicPartition) -> int | None:
        """Where a restart would resume this partition now."""
        if partition not in self._next:
            return None
        offsets = self._open.get(partition)
        return min(offsets) if offsets else self._next[partition]

    def lag(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
        """Per partition the consumer owns: records in the log not yet finished here
        (records read and held, a retry waiting for its time, count as behind)."""
        behind = {}
        # No await between reading the assignment and asking about its partitions: a
        # rebalance cannot slip in between.
        for partition in consumer.assignment():
            highwater = consumer.highwater(partition)
            if highwater is None:
                continue  # not fetched yet: nothing known
            point = self.point(partition)
            # Fetched and nothing read from it: it was read up to its end.
            behind[partition] = 0 if point is None else max(0, highwater - point)
        return behind

    def to_commit(self) -> dict[TopicPartition, int]:
        """Commit points that moved since the last call to ``committed``."""
        points = {}
        for partition, following in self._next.items():
            offsets = self._open.get(partition)
            point = min(offsets) if offsets else following
            if self._committed.get(partition) != point:
                points[partition] = point
        return points

    def committed(self, points: dict[TopicPartition, int]) -> None:
        self._committed.update(points)
