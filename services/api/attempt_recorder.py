"""Fills the delivery log from the ``attempts`` topic.

Every api process joins one consumer group, so the log is written once per attempt no
matter how many api processes run. A batch's rows commit before its offsets do; a record
that is not an attempt goes to the dead-letter topic, once the rows are in, and the
consumer keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import NamedTuple, get_args

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    Attempt,
    AttemptOutcome,
    ChangeNotifier,
    DependencyUnavailable,
    InvalidRecord,
    Metrics,
    Settings,
    consume_forever,
    dead_letter_record,
    decode,
    get_logger,
    make_consumer,
    send_each,
    set_aside_too_large,
    start_client,
    stop_client,
    subscribe_handing_over,
    topics_for,
)

from . import delivery_log
from .errors import PublishUnavailable
from .outbox import Outbox, dead_letters_counter

_RECONNECT_SECONDS = 2.0
_BAD_VALUE = (TypeError, ValueError, ArithmeticError)


def _refused_by_store(exc: BaseException) -> bool:
    """A record the store will refuse on every try (a value it cannot hold), as opposed to
    the store being away or a fault in the statements themselves."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    if isinstance(exc, DBAPIError):
        # Some drivers report a value they could not send as a generic error of their own;
        # the error beneath it says what it was.
        # A data exception (SQLSTATE class 22: a character the column cannot hold, a number
        # out of its range) fails on every try, whatever the driver calls it.
        if str(getattr(exc.orig, "sqlstate", None) or "").startswith("22"):
            return True
        cause: BaseException | None = exc.orig
        while cause is not None:
            if isinstance(cause, _BAD_VALUE):
                return True
            cause = cause.__cause__
        return False
    if isinstance(exc, StatementError):
        return True  # a value the driver could not take
    return isinstance(exc, _BAD_VALUE)


class _Letter(NamedTuple):
    """A record for the dead-letter topic, why, and how it counts among those consumed."""

    record: ConsumerRecord
    reason: str
    outcome: str  # "invalid" (not an attempt) or "refused" (by the store)


def delivery_log_group(settings: Settings) -> str:
    """The consumer group every api process's delivery log shares."""
    return f"{settings.topic_prefix}api.delivery-log"


def _where(record: ConsumerRecord) -> tuple[str, int, int]:
    return (record.topic, record.partition, record.offset)


class AttemptRecorder:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        producer: AIOKafkaProducer,
        metrics: Metrics,
        outbox: Outbox,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._producer = producer
        self._outbox = outbox
        self._topics = topics_for(settings)
        self._changes = ChangeNotifier(producer, self._topics)
        self._dead_letters = dead_letters_counter(metrics)
        self._consumed = metrics.counter(
            "attempts_consumed_total",
            "Attempt records read, by outcome; invalid, refused and webhook_gone ones are not"
            " stored",
            ("outcome",),
            from_zero=(*get_args(AttemptOutcome), "invalid", "refused", "webhook_gone"),
        )
        self._disabled = metrics.counter(
            "webhooks_disabled_total",
            "Webhooks disabled on the dispatcher's word (gone) or for failing too long",
            ("reason",),
            from_zero=("gone", "failing"),
        )
        self._log = get_logger("api")
        self._consumer: AIOKafkaConsumer | None = None
        self._writing: asyncio.Future[list[Attempt]] | None = None
        # The records of the batch in hand already dead-lettered: a batch tried again
        # (a dead letter refused, or the database away) does not send them twice.
        self._lettered: set[tuple[str, int, int]] = set()

    async def run(self) -> None:
        """Join the group (retrying while the broker is away), then record forever."""
        while True:
            self._consumer = make_consumer(
                self._settings, group_id=delivery_log_group(self._settings)
            )
            # A rebalance (another api process starting or stopping) lets the batch being
            # written finish and commits, so the next owner does not write it again.
            hand_over = subscribe_handing_over(
                self._consumer, self._settings, self._topics.attempts
            )
            try:
                await start_client(self._consumer, self._settings)
                break
            except DependencyUnavailable as exc:
                self._log.warning("delivery_log_consumer_waiting", error=exc.message)
                await stop_client(self._consumer)
                await asyncio.sleep(_RECONNECT_SECONDS)
        await consume_forever(self._consumer, self.record, hand_over=hand_over)

    async def close(self) -> None:
        """Stop the consumer; call after the task running ``run`` was cancelled."""
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
        if self._consumer is not None:
            await stop_client(self._consumer)

    async def record(self, records: list[ConsumerRecord]) -> None:
        decoded: list[tuple[ConsumerRecord, Attempt]] = []
        letters: list[_Letter] = []
        for record in records:
            try:
                decoded.append((record, decode(Attempt, record.value)))
            except InvalidRecord as exc:
                letters.append(_Letter(record, exc.message, "invalid"))
        try:
            stored = await self._write_through([attempt for _, attempt in decoded])
        except Exception as exc:
            if not _refused_by_store(exc):
                raise
            # One record the store refuses would fail its batch on every try and stop
            # the log for every team: the records go in one at a time instead, and the
            # refused one goes to the dead-letter topic with the reason.
            stored, refused = await self._write_one_by_one(decoded)
            letters += refused
        # Dead letters once the rows are in: a batch tried again while the database is
        # away would send them again every second. Rows written twice change nothing.
        await self._dead_letter(letters)
        # Counted once each: an attempt of a webhook gone is counted as that instead.
        for attempt in stored:
            self._consumed.labels(attempt.outcome).inc()
        self._lettered.clear()

    async def _dead_letter(self, letters: list[_Letter]) -> None:
        """Send the dead letters not yet sent (a batch tried again after only some went)."""
        fresh = [letter for letter in letters if _where(letter.record) not in self._lettered]
        if not fresh:
            return
        out = [dead_letter_record(self._topics, f.record, f.reason) for f in fresh]
        failed = await send_each(self._producer, out)
        # One the broker will never take (a dead-letter topic configured with a smaller
        # record limit than the attempts topic), sent again as it is, would stop the log for
        # every team: it goes alone, then without its payload, as the dispatcher's do. Its
        # reason goes with it, for the operator has nothing else to go on; already a dead
        # letter, none is set aside anew.
        failed = await set_aside_too_large(
            lambda records: send_each(self._producer, records),
            self._topics,
            out,
            [letter.record for letter in fresh],
            failed,
            [],
        )
        for index, letter in enumerate(fresh):
            if index in failed:
                continue
            self._lettered.add(_where(letter.record))
            self._consumed.labels(letter.outcome).inc()
            if letter.outcome == "invalid":
                self._log.warning("attempt_record_invalid", reason=letter.reason)
                self._dead_letters.labels("invalid_record").inc()
            else:
                offset = letter.record.offset
                self._log.warning("attempt_record_refused", reason=letter.reason, offset=offset)
                self._dead_letters.labels("not_storable").inc()
        if failed:
            # Not even without its payload (a topic it will not write to), or the broker
            # away: the batch is tried again, and only these are sent then.
            raise next(iter(failed.values()))

    async def _write_through(self, attempts: list[Attempt]) -> list[Attempt]:
        """Store the attempts; returns those stored (not those of a webhook gone)."""
        # A cancelled transaction on SQLite can keep its write lock until the engine closes,
        # so a stop lets the write finish (close() waits for it) instead of cutting it.
        writing = self._writing = asyncio.ensure_future(self._write(attempts))
        return await asyncio.shield(writing)

    async def _write_one_by_one(
        self, decoded: list[tuple[ConsumerRecord, Attempt]]
    ) -> tuple[list[Attempt], list[_Letter]]:
        """The attempts stored, and a dead letter for each the store refused."""
        stored: list[Attempt] = []
        refused: list[_Letter] = []
        for record, attempt in decoded:
            try:
                stored.extend(await self._write_through([attempt]))
            except Exception as exc:
                if not _refused_by_store(exc):
                    raise
                # The first line: drivers append the statement and its values after it.
                reason = f"not storable: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                refused.append(_Letter(record, reason, "refused"))
        return stored, refused

    async def _write(self, attempts: list[Attempt]) -> list[Attempt]:
        async with self._engine.begin() as conn:
            stored = await delivery_log.record_attempts(conn, attempts)
            orphans = len(attempts) - len(stored)
            # The "no success for days" clock lives with the webhook, not in a dispatcher:
            # it survives restarts and partitions moving between processes.
            # Only what was stored counts: an attempt left out (another team's webhook, or
            # a delivery of another webhook) is no evidence about the webhook it names.
            failing_too_long = await delivery_log.track_failing_endpoints(
                conn,
                stored,
                timedelta(days=self._settings.endpoint_disable_after_days),
                delivery_log.run_gap(self._settings),
            )
            requests = [*stored, *failing_too_long]
            disabled = await delivery_log.disable_webhooks(conn, requests)
            # The owner hears of it on the audit topic: staged with the change, so a crash
            # after the commit leaves the notice to the relay rather than losing it.
            notices = [
                (
                    await self._outbox.stage(
                        conn, self._topics.audit, notice.team_id or "", notice
                    ),
                    notice,
                )
                for _, notice in disabled
            ]
        # Counted as committed: the notices' publishing may wait on the broker.
        if orphans:
            self._consumed.labels("webhook_gone").inc(orphans)
        for attempt, _ in disabled:
            self._log.warning(
                "webhook_disabled", webhook_id=attempt.webhook_id, reason=attempt.disable_reason
            )
            self._disabled.labels("failing" if attempt in failing_too_long else "gone").inc()
        for row_id, notice in notices:
            try:
                await self._outbox.publish(row_id, self._topics.audit, notice.team_id or "", notice)
            except PublishUnavailable as exc:
                self._log.warning("audit_notice_left_for_relay", error=exc.message)
        # Every request, not only those that changed a row: a record read again after a
        # crash between the commit and the notice changes nothing the second time, and its
        # notice would be lost; a repeated notice only makes the dispatchers read the row.
        for webhook_id, team_id in dict.fromkeys(
            (a.webhook_id, a.team_id) for a in requests if a.disable_reason is not None
        ):
            await self._changes.notify("webhook", webhook_id, "updated", team_id)
        return stored
