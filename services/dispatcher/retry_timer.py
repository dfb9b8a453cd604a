"""The durable timer behind retries: ``retry.<tier>`` topics read ahead into a heap.

A failed delivery is written to a retry topic with its ``not_before`` time; this loop holds
the raw records in memory, ordered by due time, and forwards each to ``deliveries`` when it
is due. An offset is committed only once every record before it was forwarded, so a restart
re-reads what was still waiting (the timer survives restarts; a forwarded record read again
is forwarded again). A record due long after the ones written behind it is moved to the
end of its partition once enough of those were forwarded, so the commit point does not stay
behind it for hours. Records wait apart from the delivery lanes, so a retry never holds up
any endpoint's first attempts.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from datetime import datetime

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
_MOVE_CHECK_EVERY_SECONDS = 5.0

# (due at ms, topic, partition, offset, key, value)
_Waiting = tuple[int, str, int, int, bytes | None, bytes]


def due_at_ms(record: ConsumerRecord) -> int:
    """When a waiting record is due; a record without a readable time is due now."""
    try:
        value = orjson.loads(record.value or b"")["not_before"]
        return int(datetime.fromisoformat(value).timestamp() * 1000)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0


class RetryTimer:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        topics: Topics,
        *,
        pending_max: int,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._topics = topics
        self._pending_max = pending_max
        self._heap: list[_Waiting] = []
        self._tracker = OffsetTracker()
        # Per partition, the highest offset forwarded: the waiting records below it hold
        # the commit point back.
        self._forwarded_upto: dict[TopicPartition, int] = {}
        self._next_move_check = 0.0
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
                wait_ms = max(0, min(wait_ms, self._heap[0][0] - _wall_ms()))
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
                    entry = (
                        due_at_ms(record),
                        record.topic,
                        record.partition,
                        record.offset,
                        record.key,
                        record.value or b"",
                    )
                    heapq.heappush(self._heap, entry)

    def _forget_revoked(self) -> None:
        assigned = self._consumer.assignment()
        self._tracker.retain(assigned)
        for partition in [p for p in self._forwarded_upto if p not in assigned]:
            del self._forwarded_upto[partition]
        owned = {(p.topic, p.partition) for p in assigned}
        if any((entry[1], entry[2]) not in owned for entry in self._heap):
            self._heap = [entry for entry in self._heap if (entry[1], entry[2]) in owned]
            heapq.heapify(self._heap)

    async def _forward_due(self) -> None:
        now = _wall_ms()
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap))
        if not due:
            return
        out: list[OutRecord] = [(self._topics.deliveries, key, value) for *_, key, value in due]
        failed = await send_each(self._producer, out)
        for index, entry in enumerate(due):
            if index in failed:
                # Only what the broker did not take waits for another try: the rest is
                # on its way to an endpoint and must not go twice.
                heapq.heappush(self._heap, entry)
            else:
                _, topic, partition, offset, *_ = entry
                forwarded = TopicPartition(topic, partition)
                self._tracker.done(forwarded, offset)
                upto = self._forwarded_upto.get(forwarded, -1)
                self._forwarded_upto[forwarded] = max(upto, offset)
        if failed:
            error = next(iter(failed.values()))
            self._log.warning("retry_forward_failed", error=str(error), records=len(failed))
            await asyncio.sleep(1.0)

    async def _move_blockers(self) -> None:
        """Write again, at the end of their partition, the far-off records that hold its
        commit point behind records already forwarded.

        Left there, a restart or a rebalance would forward those records again: each
        would be attempted a second time and, failing, start a second chain of retries
        (a 10-hour retry, its jitter ±2 hours, is overtaken by the retries written in
        those hours; a circuit's deferrals, by the 5-second retries). A record moves with
        every waiting record of its key in that partition, in order, so one webhook's
        deferred first attempts keep their order; and only once the records forwarded
        past the commit point outnumber those that would move.
        """
        now = time.monotonic()
        if now < self._next_move_check:
            return
        self._next_move_check = now + _MOVE_CHECK_EVERY_SECONDS
        waiting: dict[TopicPartition, list[_Waiting]] = {}
        for entry in self._heap:
            waiting.setdefault(TopicPartition(entry[1], entry[2]), []).append(entry)
        far = _wall_ms() + _MOVE_WHEN_DUE_AFTER_MS
        for partition, entries in waiting.items():
            upto = self._forwarded_upto.get(partition)
            behind = self._tracker.finished_beyond_point(partition)
            if upto is None or not behind:
                continue
            keys = {entry[4] for entry in entries if entry[3] < upto}
            moving = sorted((entry for entry in entries if entry[4] in keys), key=_offset)
            if not moving or len(moving) > behind or any(entry[0] < far for entry in moving):
                continue
            await self._move(partition, moving)

    async def _move(self, partition: TopicPartition, moving: list[_Waiting]) -> None:
        failed = await send_each(
            self._producer, [(partition.topic, key, value) for *_, key, value in moving]
        )
        moved = {entry[3] for index, entry in enumerate(moving) if index not in failed}
        for offset in moved:
            # The copy is read back as a new record; the original is finished.
            self._tracker.done(partition, offset)
        self._heap = [
            entry
            for entry in self._heap
            if not (entry[3] in moved and (entry[1], entry[2]) == partition)
        ]
        heapq.heapify(self._heap)
        self._log.info(
            "retries_moved", topic=partition.topic, partition=partition.partition, moved=len(moved)
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


def _offset(entry: _Waiting) -> int:
    return entry[3]


def _wall_ms() -> int:
    return int(time.time() * 1000)
