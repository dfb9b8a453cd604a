"""The durable timer behind retries: ``retry.<tier>`` topics read ahead into a heap.

A failed delivery is written to a retry topic with its ``not_before`` time; this loop holds
the raw records in memory, ordered by due time, and forwards each to ``deliveries`` when it
is due. An offset is committed only once every record before it was forwarded, so a restart
re-reads what was still waiting (the timer survives restarts; a forwarded record read again
is forwarded again, which the stable delivery id makes harmless). Records wait apart from
the delivery lanes, so a retry never holds up any endpoint's first attempts.
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
        self._heap: list[tuple[int, str, int, int, bytes | None, bytes]] = []
        self._tracker = OffsetTracker()
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
                self._tracker.done(TopicPartition(topic, partition), offset)
        if failed:
            error = next(iter(failed.values()))
            self._log.warning("retry_forward_failed", error=str(error), records=len(failed))
            await asyncio.sleep(1.0)

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
