"""Holding back a consumer while too much of what it read waits in memory."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


def record_bytes(record: ConsumerRecord[bytes, bytes]) -> int:
    """What a raw record held in memory weighs, near enough: its key and value."""
    return len(record.value or b"") + len(record.key or b"")


def in_records(
    counts: Mapping[TopicPartition, int],
    sizes: Mapping[TopicPartition, int],
    limit: int,
    byte_limit: int | None,
) -> dict[TopicPartition, int]:
    """What waits per partition, in records, a partition's bytes counted as records too:
    ``byte_limit`` bytes weigh as much as ``limit`` records. Records of a few kilobytes
    are counted as they are; records near the broker's limit (900 KB) fill the bytes
    first, and memory stays bounded by both."""
    if byte_limit is None:
        return dict(counts)
    return {
        partition: max(count, -(-sizes.get(partition, 0) * limit // byte_limit))
        for partition, count in counts.items()
    }


class FetchGate:
    """Pauses the partitions that hold too much, resumes them once they do not.

    A paused consumer keeps its group membership and heartbeats; it only stops fetching
    the paused partitions.
    """

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._held: set[TopicPartition] = set()

    def holds(self, partition: TopicPartition) -> bool:
        """Whether the partition is paused by this gate."""
        return partition in self._held

    def hold_shares(
        self,
        waiting: Mapping[TopicPartition, int],
        limit: int,
        also: Collection[TopicPartition] = (),
    ) -> int:
        """Keep what waits within ``limit``, split evenly between the assigned partitions.

        Pauses the partitions holding their share (one partition's slow records then stop
        only that partition), or every partition once the total reaches ``limit``. Returns
        how many records the next fetch may bring: no more than the room left, so the total
        never passes ``limit``, and no more than a share, so no partition below its share
        can take the whole room in one fetch. The partitions in ``also`` are paused too.
        """
        assignment = self._consumer.assignment()
        share = max(1, limit // max(1, len(assignment)))
        total = sum(waiting.values())
        if total >= limit:
            self._hold_only(set(assignment))
        else:
            self._hold_only({p for p in assignment if waiting.get(p, 0) >= share} | set(also))
        # At least one: with everything held the fetch returns nothing anyway.
        return max(1, min(limit - total, share))

    def hold_with_reserve(self, waiting: Mapping[TopicPartition, int], limit: int) -> int:
        """Keep what waits within ``limit``, half of it a reserve split between the partitions.

        Each partition may always hold its part of the reserve. Room the others are not
        using goes to whichever partition reads it, so one busy partition can hold about
        half of ``limit``; once the room left is what the others are owed, the partitions
        past their part are paused and the others still read theirs. Every partition is
        paused at ``limit``. Returns how many records the next fetch may bring.
        """
        assignment = self._consumer.assignment()
        part = max(1, limit // (2 * max(1, len(assignment))))
        total = sum(waiting.values())
        owed = sum(max(0, part - waiting.get(p, 0)) for p in assignment)
        if total >= limit:
            self._hold_only(set(assignment))
        elif limit - total <= owed:
            self._hold_only({p for p in assignment if waiting.get(p, 0) >= part})
        else:
            self._hold_only(set())
        return max(1, min(limit - total, part))

    def _hold_only(self, partitions: set[TopicPartition]) -> None:
        assignment = self._consumer.assignment()
        held = partitions & assignment
        if held:
            # Every time, not once: a rebalance hands partitions back unpaused, even the
            # same ones, and a held partition must not be read into memory.
            self._consumer.pause(*held)
        released = (self._held - held) & assignment
        if released:
            self._consumer.resume(*released)
        self._held = held
