"""The durable timer behind retries: ``retry.<tier>`` topics read ahead into a heap.

A failed delivery is written to a retry topic with its ``not_before`` time; this loop holds
the raw records in memory, ordered by due time, and forwards each to ``deliveries`` when it
is due. An offset is committed only once every record before it was forwarded, so a restart
re-reads what was still waiting (the timer survives restarts; a forwarded record read again
is forwarded again). A record due long after the ones written behind it is moved to the
end of its partition once enough of those were forwarded, so the commit point does not stay
behind it for hours (a retry), or for the minutes a circuit stays open (a first attempt put
off, moved with the rest of its webhook's). Records wait apart from the delivery lanes,
so a retry never holds up any endpoint's first attempts.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.shared import (
    FATAL_KAFKA_ERRORS,
    NOT_BEFORE_AHEAD_MAX,
    OutRecord,
    SetAside,
    Topics,
    commit_offsets,
    commit_when_free,
    error_text,
    finish_despite_cancel,
    get_logger,
    send_each,
    set_aside_too_large,
)

from .flow import FetchGate, in_records, record_bytes
from .offsets import AssignmentWatch, OffsetTracker

_IDLE_WAIT_MS = 500
_HANDING_OVER_WAIT_MS = 100
_FETCH_RECORDS = 1000
# Only a record due further off than this is worth moving: a nearer one clears by itself.
_MOVE_WHEN_DUE_AFTER_US = 30_000_000
# A retry overtaken all the time is written again at most this often: what a restart may
# forward a second time is the last minute's forwards, not the last hours'.
MOVE_EVERY_SECONDS = 60.0
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_AHEAD_MAX_US = NOT_BEFORE_AHEAD_MAX // _MICROSECOND


class Waiting(NamedTuple):
    """A retry record held until it is due; ordered by due time, then by its place."""

    # Microseconds: first attempts put off to one time are a microsecond apart, in order.
    due_us: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    # Put off behind an open circuit or a failed lookup: its order among its webhook's
    # first attempts is kept (retries keep none).
    first_attempt: bool

    def record(self) -> ConsumerRecord:
        """As read, for a dead letter of it."""
        return ConsumerRecord(
            self.topic,
            self.partition,
            self.offset,
            0,
            0,
            self.key,
            self.value,
            None,
            -1 if self.key is None else len(self.key),
            len(self.value),
            [],
        )

    @property
    def movable(self) -> bool:
        """Has a key to place a copy by, at the end of its partition."""
        return self.key is not None

    @classmethod
    def of(cls, record: ConsumerRecord) -> Waiting:
        """A record without a readable time is due now."""
        due_us, attempt = 0, 1
        try:
            delivery = orjson.loads(record.value or b"")
            due_us = (datetime.fromisoformat(delivery["not_before"]) - EPOCH) // _MICROSECOND
            attempt = int(delivery["attempt"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
        return cls(
            due_us,
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value or b"",
            first_attempt=attempt == 1,
        )


def to_move(
    waiting: list[Waiting], forwarded_upto: int, far_us: int, *, first_attempts: bool = True
) -> list[Waiting]:
    """Of one partition's waiting records, those worth writing again at its end, in the
    order to write them.

    A record waiting below ``forwarded_upto``, the highest offset forwarded, holds the
    commit point behind records already forwarded. Moved are the movable ones due after
    ``far_us`` (a nearer one clears by itself) below the first record that stays, and
    only when at least as many forwarded records are then passed as are written again.
    A webhook's put-off first attempts move all together or not at all, and only when the
    commit point then passes every one of them (and not at all without
    ``first_attempts``): an original left above it would be read again, after a restart,
    before the others' copies.
    """
    if not waiting:
        return []
    point = min(entry.offset for entry in waiting)

    def may_go(entry: Waiting) -> bool:
        return (
            entry.movable and entry.due_us > far_us and (first_attempts or not entry.first_attempt)
        )

    groups: dict[bytes | None, list[Waiting]] = {}
    for entry in waiting:
        if entry.first_attempt:
            groups.setdefault(entry.key, []).append(entry)
    going = {
        key
        for key, members in groups.items()
        if all(may_go(member) for member in members)
        and min(member.offset for member in members) < forwarded_upto
    }
    # With none staying, none was read past the last waiting or forwarded one.
    past_all = max(forwarded_upto, max(entry.offset for entry in waiting)) + 1
    while True:
        candidates = {
            entry.offset
            for entry in waiting
            if (
                entry.key in going
                if entry.first_attempt
                else entry.offset < forwarded_upto and may_go(entry)
            )
        }
        new_point = min(
            (entry.offset for entry in waiting if entry.offset not in candidates),
            default=past_all,
        )
        split = {key for key in going if max(m.offset for m in groups[key]) >= new_point}
        if not split:
            break
        going -= split
    moving = [entry for entry in waiting if entry.offset in candidates and entry.offset < new_point]
    passed = new_point - point - len(moving)
    if not moving or passed < len(moving):
        return []
    # Written in the order they wake: copies read back wake in it whatever else is read.
    return sorted(moving)


class RetryTimer:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        topics: Topics,
        *,
        pending_max: int,
        pending_max_bytes: int | None = None,
        move_every_seconds: float = MOVE_EVERY_SECONDS,
        on_set_aside: Callable[[ConsumerRecord, str], None] = lambda record, reason: None,
    ) -> None:
        self._consumer = consumer
        self._on_set_aside = on_set_aside
        self._producer = producer
        self._topics = topics
        self._pending_max = pending_max
        self._pending_max_bytes = pending_max_bytes
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
        # Held while records are forwarded or moved and until the commit that follows: a
        # rebalance waits for it, then commits (``hand_over``).
        self._turn = asyncio.Lock()
        # From a hand-over until the new assignment: the partitions may be moving, so
        # nothing is forwarded or moved (their next owner would do it again).
        self._handing_over = False
        self._assignments = AssignmentWatch(consumer)
        self._log = get_logger("dispatcher")

    def lag(self) -> dict[TopicPartition, int]:
        """Per owned partition: retries in the log not yet forwarded (waiting ones too)."""
        return self._tracker.lag(self._consumer)

    @property
    def pending(self) -> int:
        return len(self._heap)

    async def run(self) -> None:
        try:
            await self._forward_forever()
        finally:
            # What was forwarded is committed, even when the stop cut the turn's commit
            # short: a restart would forward it again.
            await finish_despite_cancel(self._commit())

    async def _forward_forever(self) -> None:
        while True:
            refused = False
            async with self._turn:
                # After a rebalance, not before the next fetch has shown which partitions
                # stayed: one moved away and back may have been forwarded meanwhile.
                if not (self._handing_over or self._assignments.rebalanced):
                    refused = await self._forward_due()
                # Again: a rebalance may have ended while the forward was being sent.
                if not (self._handing_over or self._assignments.rebalanced):
                    await self._move_blockers()
                await self._commit()
            if refused:
                # Outside the turn: a hand-over waiting for it must not wait this out.
                await asyncio.sleep(1.0)
            fetch_size = self._apply_backpressure()
            wait_ms = _IDLE_WAIT_MS
            if self._handing_over:
                # Nothing is forwarded until the rebalance ends: a due record must not
                # make the loop spin meanwhile.
                wait_ms = _HANDING_OVER_WAIT_MS
            elif self._heap:
                # Rounded up: a record due in under a millisecond is not waited for with
                # fetches that return at once, again and again.
                due_in_ms = -(-(self._heap[0].due_us - _wall_us()) // 1000)
                wait_ms = max(0, min(wait_ms, due_in_ms))
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=wait_ms, max_records=min(_FETCH_RECORDS, fetch_size)
                )
            except FATAL_KAFKA_ERRORS:
                raise
            except KafkaError as exc:
                # Nothing was taken: the turn goes on, so that a rebalance that ended is
                # still seen and forwarding resumes while fetches fail.
                self._log.warning("retry_fetch_failed", error=error_text(exc))
                await asyncio.sleep(1.0)
                batches = {}
            self._forget_revoked()
            # Once per fetch: a batch is read in microseconds, and the bound is days.
            too_far_us = _wall_us() + _AHEAD_MAX_US
            for partition, records in batches.items():
                for record in records:
                    # Waiting, or forwarded but not yet committed: read again after a
                    # rebalance that gave the partition back, and not taken twice.
                    if self._tracker.seen(partition, record.offset):
                        continue
                    self._tracker.add(partition, record.offset, record_bytes(record))
                    entry = Waiting.of(record)
                    if entry.due_us > too_far_us:
                        # Written by hand: no wait of ours is that long. Forwarded now,
                        # for the delivery handler to dead-letter with the reason.
                        entry = entry._replace(due_us=0)
                    if entry.value in self._waiting_values:
                        # The same delivery, attempt and time: one copy of a moved retry.
                        self._tracker.done(partition, record.offset)
                        continue
                    self._waiting_values.add(entry.value)
                    heapq.heappush(self._heap, entry)

    async def hand_over(self, within: float) -> None:
        """Before a rebalance moves partitions: let the records being forwarded or moved
        go, then commit everything forwarded, within ``within`` seconds, so their next
        owner does not forward them again (decision 56)."""
        self._handing_over = True
        await commit_when_free(self._turn, self._commit, within)

    def reassigned(self) -> None:
        """The rebalance is over: forwarding goes on (the records of partitions that
        moved are dropped after the next fetch, before the turn after it)."""
        self._handing_over = False
        self._assignments.reassigned()

    def _forget_revoked(self) -> None:
        # A partition moved away and back since the last look counts as lost too: its
        # other owner may have forwarded and committed what waits here.
        assigned = self._assignments.look()
        for partition in [p for p in self._forwarded_upto if p not in assigned]:
            del self._forwarded_upto[partition]
        # Every waiting record was added to the tracker first: only a partition it forgets
        # now can have records to drop, and the heap is looked through only then, not at
        # every turn (it holds up to ``pending_max`` records).
        if not self._tracker.retain(assigned):
            return
        owned = {(p.topic, p.partition) for p in assigned}
        kept = [e for e in self._heap if (e.topic, e.partition) in owned]
        if len(kept) < len(self._heap):
            heapq.heapify(kept)
            self._heap = kept
            self._waiting_values = {entry.value for entry in self._heap}

    async def _forward_due(self) -> bool:
        """Forward what is due; True when the broker refused some of it."""
        now = _wall_us()
        due = []
        while self._heap and self._heap[0].due_us <= now:
            due.append(heapq.heappop(self._heap))
        if not due:
            return False
        out: list[OutRecord] = [(self._topics.deliveries, e.key, e.value) for e in due]
        failed = await send_each(self._producer, out)
        if failed:
            # One the broker will never take would hold its partition's commit point, and
            # be tried every second, for ever: it goes to the dead letters instead.
            set_aside: list[SetAside] = []
            sources = [entry.record() for entry in due]
            failed = await set_aside_too_large(
                lambda records: send_each(self._producer, records),
                self._topics,
                out,
                sources,
                failed,
                set_aside,
            )
            for record, reason in set_aside:
                self._on_set_aside(record, reason)
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
        return bool(failed)

    async def _move_blockers(self) -> None:
        """Write again, at the end of their partition, the far-off records that hold its
        commit point behind records already forwarded (``to_move``).

        Left there, a restart or a rebalance would forward those records again: each
        would be attempted a second time and, failing, start a second chain of retries
        (a 10-hour retry, its jitter ±2 hours, is overtaken by the retries written in
        those hours; an hour-long Retry-After, by the 5-second retries; first attempts
        put off for 10 minutes behind an open circuit, by everything in those minutes).
        A copy is placed by its key, like the original; the original then counts as
        finished. Put-off first attempts keep their order: each wakes at its own
        microsecond, and a webhook's move together, in that order, and only from a
        partition read to its end and not paused, so their copies are read back (within
        a fetch) long before they are due.
        """
        now = time.monotonic()
        if now < self._next_move_check:
            return
        self._next_move_check = now + self._move_every
        waiting: dict[TopicPartition, list[Waiting]] = {}
        for entry in self._heap:
            waiting.setdefault(TopicPartition(entry.topic, entry.partition), []).append(entry)
        far = _wall_us() + _MOVE_WHEN_DUE_AFTER_US
        moving: list[Waiting] = []
        # Partitions another process has just taken are not written to: it reads them
        # from the last commit, and would find both copies.
        for partition in self._consumer.assignment():
            upto = self._forwarded_upto.get(partition)
            if upto is not None and partition in waiting:
                moving += to_move(
                    waiting[partition], upto, far, first_attempts=self._read_through(partition)
                )
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

    def _read_through(self, partition: TopicPartition) -> bool:
        """Whether every record the partition held at the last fetch is in memory, and it
        is not paused: put-off first attempts moved now are read back before they are
        due, never after one of their webhook's later first attempts."""
        highwater = self._consumer.highwater(partition)
        return (
            highwater is not None
            and self._tracker.read_upto(partition) >= highwater
            and not self._gate.holds(partition)
        )

    async def _commit(self) -> None:
        assigned = self._assignments.owned()
        points = {p: o for p, o in self._tracker.to_commit().items() if p in assigned}
        if not points:
            return
        if await commit_offsets(self._consumer, points):
            self._tracker.committed(points)

    def _apply_backpressure(self) -> int:
        # Far-off retries of one failing endpoint (a circuit open for minutes, the 10-hour
        # tiers) could fill the heap; with every partition paused then, another endpoint's
        # 5-second retry would wait unread for hours. A reserve keeps room for the others.
        waiting = in_records(
            self._tracker.open_counts(),
            self._tracker.open_bytes(),
            self._pending_max,
            self._pending_max_bytes,
        )
        return self._gate.hold_with_reserve(waiting, self._pending_max)


def _wall_us() -> int:
    return time.time_ns() // 1000
