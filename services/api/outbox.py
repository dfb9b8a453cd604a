"""The outbox: records to publish are written in the same transaction as the change.

A handler stages its event with the change, commits, then publishes at once and removes the
row once Kafka acknowledged it. If the process dies in between, the relay publishes what is
left, so a committed change always gets exactly its event (at least once, same event id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from prometheus_client import Counter
from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.shared import (
    MAX_EVENT_BYTES,
    MAX_RECORD_BYTES,
    BatchingSender,
    DeadLetter,
    Delivery,
    DependencyUnavailable,
    Event,
    Metrics,
    OutcomeUnknown,
    OutRecord,
    PayloadTooLarge,
    Record,
    SentUnacknowledged,
    as_utc,
    error_text,
    get_logger,
    new_id,
    tables,
    utcnow,
)

from .errors import PublishOutcomeUnknown, PublishUnavailable

T = TypeVar("T")
_outbox = tables.outbox
_RELAY_BATCH = 500
# The advisory lock relay claims take on PostgreSQL (any number no other lock uses).
_CLAIM_LOCK = 0x686F6F6B
# The finest step both databases keep in a stored time.
_TICK = timedelta(microseconds=1)


def _check_size(record: Record, size: int) -> None:
    # Refused up front: the stream would refuse it on every try, and a 503 would tell the
    # caller to try again. An event leaves room for the records that will carry it (a
    # delivery, an attempt); a delivery carries an event already held to that, so one
    # re-sent fits whatever its wrapping adds.
    what, limit = (
        ("delivery", MAX_RECORD_BYTES)
        if isinstance(record, Delivery)
        else ("event", MAX_EVENT_BYTES)
    )
    if size > limit:
        raise PayloadTooLarge(
            f"the {what} would be {size} bytes; the event stream takes at most {limit}",
            details={"event_bytes": size, "max_bytes": limit},
        )


def check_event_size(event: Event) -> None:
    """Refuse (413) a new event too large for the records that will carry it, before it
    goes out inside one (a test event, sent straight in its delivery)."""
    _check_size(event, len(event.to_bytes()))


# A relay round stops after this many failed sends in a row: the stream is away, not one
# partition (whose keys are held back while the others' records go on).
_FAILURES_BEFORE_GIVING_UP = 3
# Records no retry will ever get into the stream.
_NEVER_SENDABLE = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTopicError)


class _KeptForRelay(Exception):
    """Ends an undo's transaction without its delete: the staged record stays."""


class Outbox:
    def __init__(
        self,
        engine: AsyncEngine,
        producer: AIOKafkaProducer,
        metrics: Metrics,
        publish_timeout: float,
        *,
        dead_letter_topic: str,
    ) -> None:
        self._engine = engine
        self._dead_letter_topic = dead_letter_topic
        self._producer = producer
        # Concurrent requests' events go out together.
        self._sender = BatchingSender(producer)
        self._backlog = metrics.gauge("outbox_backlog", "Staged records not yet acknowledged")
        self._oldest = metrics.gauge(
            "outbox_oldest_seconds", "Age of the oldest staged record not yet acknowledged"
        )
        self._published = metrics.counter(
            "events_published_total", "Events acknowledged by Kafka", ("type",)
        )
        self._failures = metrics.counter(
            "publish_failures_total", "Publishes Kafka did not acknowledge in time"
        )
        self._relayed = metrics.counter(
            "events_relayed_total", "Records their request left behind, published by the relay"
        )
        self._dead_letters = dead_letters_counter(metrics)
        self._kept = metrics.counter(
            "events_left_for_relay_total",
            "Changes answered as made while their event waits for the relay",
        )
        # The producer gives up on a batch after publish_timeout (its request timeout); the
        # wait below is a backstop. Should it run out while the record is on its way, the
        # outcome is unknown and the change is kept for the relay rather than undone. A
        # row older than relay_after was not published by its own request.
        self._wait = publish_timeout + 5
        # A request may wait one publish wait for an earlier record of its key
        # (``_sent_meanwhile``) and then one more for its own publish: its row is not
        # the relay's before both are over.
        self.relay_after = timedelta(seconds=max(30.0, 3 * publish_timeout, 2 * self._wait + 10))
        # A round sends while more than one publish wait of its claim is left.
        self.claim_for = self.relay_after
        self._log = get_logger("api")

    async def stage(
        self,
        conn: AsyncConnection,
        topic: str,
        key: str,
        record: Record,
        *,
        after: datetime | None = None,
    ) -> str:
        """Write the record beside its change; one the stream would never take is refused
        here (413), which rolls the change back with it. Staged ``after`` a record of its
        key still waiting, it is dated after it: the relay sends in that order, and another
        process's clock may run behind."""
        value = record.to_bytes()
        _check_size(record, len(value))
        row_id = new_id("out")
        created_at = utcnow() if after is None else max(utcnow(), after + _TICK)
        await conn.execute(
            insert(_outbox).values(
                id=row_id, topic=topic, key=key, value=value.decode(), created_at=created_at
            )
        )
        return row_id

    async def _waiting(self, conn: AsyncConnection, topic: str, key: str) -> datetime | None:
        """When the newest record of the key still waiting to be published was staged; None
        when none waits."""
        newest = select(func.max(_outbox.c.created_at)).where(
            _outbox.c.topic == topic, _outbox.c.key == key
        )
        staged: datetime | None = (await conn.execute(newest)).scalar()
        return staged

    async def _sent_meanwhile(self, topic: str, key: str, staged_at: datetime) -> bool:
        """Whether the records of the key staged up to ``staged_at`` leave the outbox
        while their own requests may still be publishing them (a publish's wait from the
        last one's staging). Two changes to one object a moment apart are the common case:
        the first one's event is on its way, and the second goes straight after it rather
        than by the relay, half a minute later."""
        loop = asyncio.get_running_loop()
        # Staged by another process, the time is that process's clock: bounded either way.
        age = min(max((utcnow() - staged_at).total_seconds(), 0.0), self._wait)
        deadline = loop.time() + self._wait - age
        older = (
            select(func.count())
            .select_from(_outbox)
            .where(
                _outbox.c.topic == topic, _outbox.c.key == key, _outbox.c.created_at <= staged_at
            )
        )
        pause = 0.005
        while loop.time() < deadline:
            await asyncio.sleep(min(pause, deadline - loop.time()))
            pause = min(pause * 2, 0.2)
            try:
                async with self._engine.connect() as conn:
                    if not (await conn.execute(older)).scalar():
                        return True
            except SQLAlchemyError:
                return False
        return False

    async def publish(self, row_id: str, topic: str, key: str, record: Record) -> None:
        """Publish a staged record now (acks=all); the caller learns if Kafka refused."""
        await self.publish_direct(topic, key, record)
        try:
            async with self._engine.begin() as conn:
                await conn.execute(delete(_outbox).where(_outbox.c.id == row_id))
        except SQLAlchemyError as exc:
            # The change is committed and its record in the stream: a 500 now would have
            # the caller make it again. The row stays; the relay sends it once more, under
            # the same id.
            self._log.warning("outbox_row_left", row_id=row_id, error=error_text(exc))

    async def commit_and_publish(
        self,
        change: Callable[[AsyncConnection], Awaitable[T]],
        undo: Callable[[AsyncConnection], Awaitable[bool]],
        topic: str,
        key: str,
        record: Record,
    ) -> T:
        """Make the change and stage its record in one transaction, then publish.

        If Kafka refuses, the change is undone and the caller gets 503: nothing is left half
        written. If this process dies first, the relay publishes the staged record, so the
        committed change still gets its event. When the change has to stay (the record may
        already be in the stream, or ``undo`` found a later change built on this one), the
        caller gets the change's own answer, not a 503: a retry would make a second object
        or a second send. Its record is left to the relay (at worst the event arrives twice,
        under the same id). So is a record staged while an older one of its key waits:
        published at once, it would overtake that one in the stream.
        """
        async with self._engine.begin() as conn:
            result = await change(conn)
            # Read after the change: a change to the object waits for the one before it
            # to commit (its row lock on PostgreSQL, the one writer on SQLite), so that
            # one's record is seen here unless already published.
            waiting = await self._waiting(conn, topic, key)
            row_id = await self.stage(conn, topic, key, record, after=waiting)
        if waiting is not None and not await self._sent_meanwhile(topic, key, waiting):
            # Published now, this record would go ahead of an older one of its key (a
            # failed publish, a request that died): the relay sends them in their order.
            self._kept.inc()
            self._log.warning("event_left_for_relay", reason="an older record of its key waits")
            return result
        try:
            await self.publish(row_id, topic, key, record)
        except PublishOutcomeUnknown as exc:
            self._left_for_relay(exc, "the record may already be in the stream")
        except PublishUnavailable as exc:
            if await self._undone(row_id, undo):
                raise
            self._left_for_relay(exc, "the change stays: sent by the relay or built upon")
        return result

    async def _undone(
        self, row_id: str, undo: Callable[[AsyncConnection], Awaitable[bool]]
    ) -> bool:
        """Take back the staged record and undo its change; False when the change must
        stay: the relay has taken the record (sent, or on its way), or a later change
        builds on it (then the record stays staged, for the relay)."""
        try:
            async with self._engine.begin() as conn:
                # A row a relay has claimed may be on its way, or in the stream: the
                # change stays.
                taken = await conn.execute(
                    delete(_outbox).where(_outbox.c.id == row_id, _outbox.c.claimed_by.is_(None))
                )
                if taken.rowcount != 1:
                    return False
                if not await undo(conn):
                    raise _KeptForRelay  # rolls the delete back
        except _KeptForRelay:
            return False
        except SQLAlchemyError as exc:
            # Nothing was undone: the change stays committed with its record staged, and
            # the relay publishes it once the stream is back.
            self._log.warning("outbox_undo_failed", row_id=row_id, error=error_text(exc))
            return False
        return True

    def _left_for_relay(self, exc: PublishUnavailable, why: str) -> None:
        self._kept.inc()
        cause = exc.__cause__
        error = exc.message if cause is None else f"{exc.message} ({error_text(cause)})"
        self._log.warning("event_left_for_relay", error=error, reason=why)

    async def publish_direct(self, topic: str, key: str, record: Record) -> None:
        """Publish a record that no database change depends on (acks=all)."""
        await self.publish_all([(topic, key, record)])

    async def publish_all(self, records: Sequence[tuple[str, str, Record]]) -> None:
        """Publish records no database change depends on; return once Kafka acked all."""
        encoded: list[OutRecord] = [
            (topic, key.encode(), record.to_bytes()) for topic, key, record in records
        ]
        for (_, _, record), (_, _, value) in zip(records, encoded, strict=True):
            _check_size(record, len(value))
        try:
            await self._sender.send(encoded, within=self._wait)
        except (OutcomeUnknown, SentUnacknowledged) as exc:
            self._failures.inc()
            # The client learns what happened, not the broker's address (the cause is
            # logged with the answer).
            raise PublishOutcomeUnknown(
                "event stream did not acknowledge in time; the record may have been written"
            ) from exc
        except (KafkaError, DependencyUnavailable, TimeoutError) as exc:
            self._failures.inc()
            raise PublishUnavailable("event stream is unavailable") from exc
        for _, _, record in records:
            self._published.labels(getattr(record, "type", type(record).__name__.lower())).inc()

    async def close(self) -> None:
        await self._sender.close()

    async def backlog(self) -> int:
        return (await self._backlog_and_age())[0]

    async def _backlog_and_age(self) -> tuple[int, float]:
        """Staged records, and how long the oldest has waited (0 with none)."""
        async with self._engine.connect() as conn:
            count, first = (
                await conn.execute(select(func.count(), func.min(_outbox.c.created_at)))
            ).one()
        age = 0.0 if first is None else (utcnow() - as_utc(first)).total_seconds()
        return int(count or 0), max(age, 0.0)

    async def relay_once(self) -> int:
        """Publish rows their requests left behind; returns how many were published."""
        claim, until, rows = await self._claim()
        published = 0
        # A key whose record failed keeps its later records back (their order is the
        # key's); the others go on, unless the stream itself seems away.
        held_keys: set[tuple[str, str]] = set()
        failed: list[str] = []
        failed_in_a_row = 0
        for row in rows:
            if not self._time_for_a_send(until):
                break
            if (row.topic, row.key) in held_keys:
                continue
            try:
                await self._send_within(row.topic, row.value.encode(), row.key.encode())
            except _NEVER_SENDABLE as exc:
                # This record will never go; waiting for it would hold back every record
                # behind it for good. It is kept on the dead-letter topic instead.
                if not self._time_for_a_send(until):
                    break
                if not await self._dead_letter(row, exc):
                    failed.append(row.id)
                    break
            except (KafkaError, TimeoutError) as exc:
                self._log.warning("outbox_relay_failed", error=error_text(exc))
                held_keys.add((row.topic, row.key))
                failed.append(row.id)
                failed_in_a_row += 1
                if failed_in_a_row >= _FAILURES_BEFORE_GIVING_UP:
                    break
                continue
            else:
                published += 1
                failed_in_a_row = 0
                self._relayed.inc()
            async with self._engine.begin() as conn:
                await conn.execute(delete(_outbox).where(_outbox.c.id == row.id))
        if published < len(rows):
            # What this round did not try is free again at once, whichever process runs
            # the next round. What failed is held back a claim's length, and its key's
            # later records with it (``_claim``): tried first again, a few records whose
            # topic or partition is away would end every round before the others. The
            # claim's name stays: a failed send may still have written its record, so
            # the request that staged it must not undo its change.
            async with self._engine.begin() as conn:
                await conn.execute(
                    update(_outbox).where(_outbox.c.claimed_by == claim).values(claimed_until=None)
                )
                if failed:
                    await conn.execute(
                        update(_outbox)
                        .where(_outbox.c.id.in_(failed))
                        .values(claimed_until=utcnow() + self.claim_for)
                    )
        return published

    def _time_for_a_send(self, until: datetime) -> bool:
        # Another relay may take the rows once the claim ends: a send must be over by then.
        return utcnow() + timedelta(seconds=self._wait) <= until

    async def _send_within(self, topic: str, value: bytes, key: bytes) -> None:
        """Send one record, waiting at most one publish wait (the producer's own waits for
        metadata and retries can add up to more); out of time, it may still arrive."""
        await asyncio.wait_for(
            self._producer.send_and_wait(topic, value=value, key=key), self._wait
        )

    async def _claim(self) -> tuple[str, datetime, Sequence[Any]]:
        """Take the oldest rows left behind that no other relay holds, until ``claim_for``
        from now; returns the claim, its end and its rows.

        Every api process runs a relay over the same table; without a claim each would
        publish every row left behind. One UPDATE takes them: PostgreSQL passes over rows
        another transaction is claiming (and re-checks one claimed meanwhile), SQLite runs
        one writer at a time. A relay that dies holding rows leaves them to the others once
        its claim ends. A row keeps the name of the last claim on it: ``_undone`` leaves
        such a row, and its change, alone.
        """
        now = utcnow()
        claim, until = new_id("rly"), now + self.claim_for
        free = or_(_outbox.c.claimed_until.is_(None), _outbox.c.claimed_until < now)
        # A key with a record held elsewhere (another relay's claim, or held back after a
        # failed send) keeps its later records back: sent meanwhile, they would overtake
        # it. Checked in the claiming statement itself, under the claims' lock.
        other = _outbox.alias("other")
        held_elsewhere = (
            select(other.c.id)
            .where(
                other.c.topic == _outbox.c.topic,
                other.c.key == _outbox.c.key,
                other.c.claimed_until >= now,
            )
            .exists()
        )
        oldest = (
            select(_outbox.c.id)
            .where(_outbox.c.created_at < now - self.relay_after, free, ~held_elsewhere)
            .order_by(_outbox.c.created_at)
            .limit(_RELAY_BATCH)
            # PostgreSQL: rows another relay is claiming right now are passed over, so
            # two rounds at once take two batches rather than one waiting for the other.
            .with_for_update(skip_locked=True)
        )
        async with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # One claim at a time, each seeing the claims committed before it: two at
                # once could each take one record of a key the other was taking. (SQLite
                # writes one transaction at a time already.)
                await conn.execute(select(func.pg_advisory_xact_lock(_CLAIM_LOCK)))
            await conn.execute(
                update(_outbox)
                .where(_outbox.c.id.in_(oldest), free)
                .values(claimed_by=claim, claimed_until=until)
            )
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(_outbox)
                    .where(_outbox.c.claimed_by == claim)
                    .order_by(_outbox.c.created_at)
                )
            ).all()
        return claim, until, rows

    async def _dead_letter(self, row: Any, exc: KafkaError) -> bool:
        reason = f"the event stream refuses this record for good: {type(exc).__name__}"
        self._log.error("outbox_record_dead_lettered", row_id=row.id, reason=reason)
        letter = DeadLetter(reason=reason, source_topic=row.topic, payload=row.value, at=utcnow())
        try:
            await self._send_within(self._dead_letter_topic, letter.to_bytes(), row.key.encode())
        except (KafkaError, TimeoutError) as failed:
            self._log.warning("outbox_relay_failed", error=error_text(failed))
            return False
        self._dead_letters.labels("refused_by_broker").inc()
        return True

    async def relay_forever(self, every_seconds: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                relayed = await self.relay_once()
                if relayed:
                    self._log.info("outbox_relayed", records=relayed)
                backlog, oldest = await self._backlog_and_age()
                self._backlog.set(backlog)
                self._oldest.set(oldest)
            except Exception as exc:
                # The round failed (the database or the broker away); the loop goes on.
                self._log.exception(
                    "outbox_relay_round_failed",
                    error=error_text(exc),
                    retry_in_seconds=every_seconds,
                )


def dead_letters_counter(metrics: Metrics) -> Counter:
    """Records the api sends to the dead-letter topic, by why (the alert on dead letters
    watches the api's as well as the dispatcher's)."""
    return metrics.counter(
        "dead_letters_total",
        "Records sent to the dead-letter topic",
        ("reason",),
        from_zero=("invalid_record", "not_storable", "refused_by_broker"),
    )
