"""The durable timer behind retries: ``retry.<tier>`` topics read ahead into a heap.

A failed delivery is written to a retry topic with its ``not_before`` time; this loop holds
the raw records in memory, ordered by due time, and forwards each to ``deliveries`` when it
is due. An offset is committed only once every record before it was forwarded, so a restart
re-reads what was still waiting (the timer survives restarts; a forwarded record read again
is forwarded again). A retry due long after the ones written behind it is moved to the
end of its partition once enough of those were forwarded, so the commit point does not stay
behind it for hours. Records wait apart from the delivery lanes, so a retry never holds up
any endpoint's first attempts.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from datetime import datetime
from typing import NamedTuple

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.shared import OutRecord, Topics, commit_offsets, get_logger, send_each

from .flow import FetchGate
from .offsets import OffsetTracker

_IDLE_WAIT_MS = 500
_FETCH_RECORDS = 1000
# Only a record due further off than this is worth moving: a nearer one clears by itself.
_MOVE_WHEN_DUE_AFTER_MS = 30_000
# A retry overtaken all the time is written again at most this often: what a restart may
# forward a second time is the last minute's forwards, not the last hours'.
MOVE_EVERY_SECONDS = 60.0


class Waiting(NamedTuple):
    """A retry record held until it is due; ordered by due time, then by its place."""

    due_ms: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    # A retry (not a first attempt put off by an open circuit or a failed lookup, whose
    # order among its webhook's deliveries is kept) with a key to place its copy by.
    movable: bool

    @classmethod
    def of(cls, record: ConsumerRecord) -> Waiting:
        """A record without a readable time is due now."""
        due_ms, attempt = 0, 1
        try:
            delivery = orjson.loads(record.value or b"")
            due_ms = int(datetime.fromisoformat(delivery["not_before"]).timestamp() * 1000)
            attempt = int(delivery["attempt"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
        return cls(
            due_ms,
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value or b"",
            movable=attempt > 1 and record.key is not None,
        )


def to_move(waiting: list[Waiting], forwarded_upto: int, far_ms: int) -> list[Waiting]:
    """Of one partition's waiting records, those worth writing again at its end.

    A record waiting below ``forwarded_upto``, the highest offset forwarded, holds the
    commit point behind records already forwarded. Moved are the movable ones due after
    ``far_ms`` (a nearer one clears by itself) below the first record that stays, and
    only when at least as many forwarded records are then passed as are written again.
    """
    if not waiting:
        return []
    point = min(entry.offset for entry in waiting)
    candidates = {
        entry.offset
        for entry in waiting
        if entry.offset < forwarded_upto and entry.movable and entry.due_ms > far_ms
    }
    # With none staying, none was read past the last forwarded one.
    new_point = min(
        (entry.offset for entry in waiting if entry.offset not in candidates),
        default=forwarded_upto + 1,
    )
    moving = sorted(
        (entry for entry in waiting if entry.offset in candidates and entry.offset < new_point),
        key=lambda entry: entry.offset,
    )
    passed = new_point - point - len(moving)
    return moving if moving and passed >= len(moving) else []


class RetryTimer:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        topics: Topics,
        *,
        pending_max: int,
        move_every_seconds: float = MOVE_EVERY_SECONDS,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._topics = topics
        self._pending_max = pending_max
        self._heap: list[Waiting] = []
        self._tracker = OffsetTracker()
        # Per partition, the highest offset forwarded: the waiting records below it hold
        # the commit point back.
        self._forwarded_upto: dict[TopicPartition, int] = {}
        self._move_every = move_every_seconds
        self._next_move_check = time.monotonic() + move_every_seconds
        # The bytes of every waiting record: a moved retry's original and copy both read
        # (after a crash or a rebalance between the copy and the commit) wait once.
        self._waiting_values: set[bytes] = set()
        self._gate = FetchGate(consumer)
        self._log = get_logger("dispatcher")

    def lag(self) -> dict[TopicPartition, int]:
        """Per owned partition: retries in the log not yet forwarded (waiting ones too)."""
        return self._tracker.lag(self._consumer)

    @property
    def pending(self) -> int:
        return len(self._heap)

    async def run(self) -> None:
        while True:
            await self._forward_due()
            await self._move_blockers()
            await self._commit()
            fetch_size = self._apply_backpressure()
            wait_ms = _IDLE_WAIT_MS
            if self._heap:
                wait_ms = max(0, min(wait_ms, self._heap[0].due_ms - _wall_ms()))
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=wait_ms, max_records=min(_FETCH_RECORDS, fetch_size)
                )
            except KafkaError as exc:
                self._log.warning("retry_fetch_failed", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            self._forget_revoked()
            for partition, records in batches.items():
                for record in records:
                    # Waiting, or forwarded but not yet committed: read again after a
                    # rebalance that gave the partition back, and not taken twice.
                    if self._tracker.seen(partition, record.offset):
                        continue
                    self._tracker.add(partition, record.offset)
                    entry = Waiting.of(record)
                    if entry.value in self._waiting_values:
                        # The same delivery, attempt and time: one copy of a moved retry.
                        self._tracker.done(partition, record.offset)
                        continue
                    self._waiting_values.add(entry.value)
                    heapq.heappush(self._heap, entry)

    def _forget_revoked(self) -> None:
        assigned = self._consumer.assignment()
        self._tracker.retain(assigned)
        for partition in [p for p in self._forwarded_upto if p not in assigned]:
            del self._forwarded_upto[partition]
        owned = {(p.topic, p.partition) for p in assigned}
        if any((entry.topic, entry.partition) not in owned for entry in self._heap):
            self._heap = [e for e in self._heap if (e.topic, e.partition) in owned]
            heapq.heapify(self._heap)
            self._waiting_values = {entry.value for entry in self._heap}

    async def _forward_due(self) -> None:
        now = _wall_ms()
        due = []
        while self._heap and self._heap[0].due_ms <= now:
            due.append(heapq.heappop(self._heap))
        if not due:
            return
        out: list[OutRecord] = [(self._topics.deliveries, e.key, e.value) for e in due]
        failed = await send_each(self._producer, out)
        for index, entry in enumerate(due):
            if index in failed:
                # Only what the broker did not take waits for another try: the rest is
                # on its way to an endpoint and must not go twice.
                heapq.heappush(self._heap, entry)
            else:
                self._waiting_values.discard(entry.value)
                forwarded = TopicPartition(entry.topic, entry.partition)
                self._tracker.done(forwarded, entry.offset)
                upto = self._forwarded_upto.get(forwarded, -1)
                self._forwarded_upto[forwarded] = max(upto, entry.offset)
        if failed:
            error = next(iter(failed.values()))
            self._log.warning("retry_forward_failed", error=str(error), records=len(failed))
            await asyncio.sleep(1.0)

    async def _move_blockers(self) -> None:
        """Write again, at the end of their partition, the far-off retries that hold its
        commit point behind records already forwarded (``to_move``).

        Left there, a restart or a rebalance would forward those records again: each
        would be attempted a second time and, failing, start a second chain of retries
        (a 10-hour retry, its jitter ±2 hours, is overtaken by the retries written in
        those hours; an hour-long Retry-After, by the 5-second retries). A copy is
        placed by its key, like the original; the original then counts as finished.
        """
        now = time.monotonic()
        if now < self._next_move_check:
            return
        self._next_move_check = now + self._move_every
        waiting: dict[TopicPartition, list[Waiting]] = {}
        for entry in self._heap:
            waiting.setdefault(TopicPartition(entry.topic, entry.partition), []).append(entry)
        far = _wall_ms() + _MOVE_WHEN_DUE_AFTER_MS
        moving: list[Waiting] = []
        # Partitions another process has just taken are not written to: it reads them
        # from the last commit, and would find both copies.
        for partition in self._consumer.assignment():
            upto = self._forwarded_upto.get(partition)
            if upto is not None and partition in waiting:
                moving += to_move(waiting[partition], upto, far)
        if not moving:
            return
        failed = await send_each(
            self._producer, [(entry.topic, entry.key, entry.value) for entry in moving]
        )
        moved = [entry for index, entry in enumerate(moving) if index not in failed]
        for entry in moved:
            self._tracker.done(TopicPartition(entry.topic, entry.partition), entry.offset)
            # Its copy, read back, is not a duplicate of it.
            self._waiting_values.discard(entry.value)
        if moved:
            gone = set(moved)
            self._heap = [entry for entry in self._heap if entry not in gone]
            heapq.heapify(self._heap)
            self._log.info(
                "retries_moved",
                moved=len(moved),
                partitions=sorted({f"{e.topic}/{e.partition}" for e in moved}),
            )
        if failed:
            error = next(iter(failed.values()))
            self._log.warning("retry_move_failed", error=str(error), records=len(failed))

    async def _commit(self) -> None:
        assigned = self._consumer.assignment()
        points = {p: o for p, o in self._tracker.to_commit().items() if p in assigned}
        if not points:
            return
        if await commit_offsets(self._consumer, points):
            self._tracker.committed(points)

    def _apply_backpressure(self) -> int:
        # Far-off retries of one failing endpoint (a circuit open for minutes, the 10-hour
        # tiers) could fill the heap; with every partition paused then, another endpoint's
        # 5-second retry would wait unread for hours. A reserve keeps room for the others.
        return self._gate.hold_with_reserve(self._tracker.open_counts(), self._pending_max)


def _wall_ms() -> int:
    return int(time.time() * 1000)
