"""The offset tracker's commit points: the same as the lowest unfinished offset of each
partition (one past the last read when none is), however records are added, finished and
forgotten, and found without looking at every unfinished offset."""

from __future__ import annotations

import random

import pytest
from aiokafka import TopicPartition

from services.dispatcher import offsets as offsets_module
from services.dispatcher.offsets import OffsetTracker

PARTITIONS = [TopicPartition("t.retry.0", n) for n in range(3)]


class _Reference:
    """The commit points by their definition, recomputed from scratch each time."""

    def __init__(self) -> None:
        self.open: dict[TopicPartition, dict[int, int]] = {}
        self.next: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    def add(self, partition: TopicPartition, offset: int, size: int) -> None:
        self.open.setdefault(partition, {})[offset] = size
        self.next[partition] = max(self.next.get(partition, 0), offset + 1)

    def done(self, partition: TopicPartition, offset: int) -> None:
        self.open.get(partition, {}).pop(offset, None)

    def retain(self, keep: set[TopicPartition]) -> set[TopicPartition]:
        dropped = set(self.next) - keep
        for table in (self.open, self.next, self.committed):
            for partition in set(table) - keep:
                del table[partition]
        return dropped

    def point(self, partition: TopicPartition) -> int | None:
        if partition not in self.next:
            return None
        offsets = self.open.get(partition)
        return min(offsets) if offsets else self.next[partition]

    def to_commit(self) -> dict[TopicPartition, int]:
        points = {}
        for partition in self.next:
            point = self.point(partition)
            assert point is not None
            if self.committed.get(partition) != point:
                points[partition] = point
        return points


@pytest.mark.parametrize("slack", [0, 64])
def test_commit_points_match_their_definition_over_random_operations(
    slack: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No slack: the heap of a partition is rebuilt as often as it can be.
    monkeypatch.setattr(offsets_module, "_COMPACT_SLACK", slack)
    rng = random.Random(20261207 + slack)
    tracker, reference = OffsetTracker(), _Reference()
    for _ in range(6000):
        partition = rng.choice(PARTITIONS)
        following = reference.next.get(partition, 0)
        opened = sorted(reference.open.get(partition, {}))
        roll = rng.random()
        if roll < 0.45:
            # Mostly read in order, with gaps (compacted or moved records); now and then
            # one read again, or an offset below the last read.
            if rng.random() < 0.9:
                offset = following + rng.randrange(3)
            else:
                offset = rng.randrange(following + 1)
            size = rng.randrange(100)
            tracker.add(partition, offset, size)
            reference.add(partition, offset, size)
        elif roll < 0.9:
            # Mostly one still open, oldest first more often than not (retries due in
            # order), or a far-off one finishing; now and then one not open at all.
            if opened and rng.random() < 0.95:
                offset = opened[0] if rng.random() < 0.4 else rng.choice(opened)
            else:
                offset = rng.randrange(following + 2)
            tracker.done(partition, offset)
            reference.done(partition, offset)
        elif roll < 0.93:
            keep = {p for p in PARTITIONS if rng.random() < 0.7}
            assert tracker.retain(keep) == reference.retain(keep)
        else:
            points = tracker.to_commit()
            # A commit may fail: then nothing is noted as committed.
            if rng.random() < 0.8:
                tracker.committed(points)
                reference.committed.update(points)
        assert tracker.to_commit() == reference.to_commit()
        for each in PARTITIONS:
            assert tracker.point(each) == reference.point(each)
        assert tracker.open_counts() == {p: len(o) for p, o in reference.open.items()}
        assert tracker.open_bytes() == {p: sum(o.values()) for p, o in reference.open.items()}
        assert len(tracker) == sum(len(o) for o in reference.open.values())
    # Finished offsets left in a partition's heap stay bounded by the open ones.
    for partition, lowest in tracker._lowest.items():
        assert len(lowest) <= 2 * len(reference.open[partition]) + slack + 1


class _Offset(int):
    """An offset that counts the comparisons made with it."""

    compared = 0

    def __lt__(self, other: int) -> bool:
        _Offset.compared += 1
        return int(self) < int(other)

    def __gt__(self, other: int) -> bool:
        _Offset.compared += 1
        return int(self) > int(other)

    def __le__(self, other: int) -> bool:
        _Offset.compared += 1
        return int(self) <= int(other)

    def __ge__(self, other: int) -> bool:
        _Offset.compared += 1
        return int(self) >= int(other)


def test_a_turns_commit_point_does_not_look_at_every_open_offset() -> None:
    """100,000 retries waiting (the default ``HOOKWIRE_RETRY_PENDING_MAX``): each turn the
    oldest is forwarded, a new one is read, and the commit point is asked for. Before, each
    commit point took the minimum of all 100,000 offsets."""
    tracker = OffsetTracker()
    partition = PARTITIONS[0]
    pending = 100_000
    for offset in range(pending):
        tracker.add(partition, _Offset(offset))
    assert tracker.to_commit() == {partition: 0}
    turns = 1000
    _Offset.compared = 0
    for turn in range(turns):
        tracker.done(partition, turn)
        tracker.add(partition, _Offset(pending + turn))
        assert tracker.to_commit() == {partition: turn + 1}
    # A heap's pop and push: a few dozen comparisons at 100,000 (log2 is 17).
    assert _Offset.compared / turns < 100, f"{_Offset.compared / turns:.0f} a turn"


def test_finished_offsets_above_a_far_off_one_do_not_pile_up() -> None:
    """One record holds the commit point while 300,000 behind it come and go."""
    tracker = OffsetTracker()
    partition = PARTITIONS[0]
    tracker.add(partition, 0)
    for offset in range(1, 300_001):
        tracker.add(partition, offset)
        tracker.done(partition, offset)
        if offset % 1000 == 0:
            assert tracker.to_commit() == {partition: 0}
    assert len(tracker._lowest[partition]) <= 2 + offsets_module._COMPACT_SLACK + 1
    tracker.done(partition, 0)
    assert tracker.to_commit() == {partition: 300_001}
