"""One delivery record in, its durable outcome out.

Every ending is written to Kafka before the record counts as finished: the attempt, and
then either nothing more (delivered), the next try on a retry topic, or a dead letter; a
410 or an endpoint failing for too long adds a request to disable the webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.shared import (
    RETRY_TIERS,
    Attempt,
    BatchingSender,
    DeadLetter,
    Delivery,
    InvalidRecord,
    Metrics,
    OutRecord,
    SetAside,
    Settings,
    Topics,
    cancel_and_wait,
    dead_letter_record,
    decode,
    get_logger,
    partition_of,
    send_each,
    set_aside_too_large,
    too_large,
    utcnow,
)

from .errors import WebhookUnconfirmed, Withdrawn
from .lanes import Pace
from .policy import BACK_OFF_STATUSES, GONE, CircuitBreaker, RetryPolicy, parse_retry_after
from .routing import WebhookRoute
from .sender import Outcome, Sender
from .table import WebhookTable

_PUBLISH_BACKOFF_MAX_SECONDS = 10.0
_CONFIRM_EVERY_SECONDS = 1.0
# A delivery whose webhook could not be looked up (the database is away) waits this long
# on the retry schedule instead of being skipped for good.
_UNCONFIRMED_WAIT_SECONDS = 5.0
# Beyond a probe's timeout, until its outcome is recorded: a 410's read of the webhook's
# URL (3 s at most) and the loop's own delays.
_PROBE_MARGIN_SECONDS = 5.0
_WEBHOOKS_REMEMBERED = 10_000
# How long a delivery waits for the answer to its webhook's probe before it is put off
# for the circuit's whole wait: most endpoints answer within it. Below the share of a
# rebalance's hand-over (2.4 s) that in-flight deliveries get to finish.
_PROBE_WAIT_SECONDS = 1.5
# Deliveries a manual re-send delivered, kept so that their retries still to come are not
# sent again: a replay of a webhook's failed deliveries re-sends up to 10,000 at once, and
# a team may re-send 20,000 an hour. About 10 MB at the bound; one forgotten is sent
# twice, which at-least-once delivery allows.
_RESENDS_REMEMBERED = 100_000
# A delivery reaches the handler only once due (the retry timer forwards it then), and
# clocks apart are not a day apart: one due later was written by hand, or forwarded at once
# by the timer as due further ahead than any wait (NOT_BEFORE_AHEAD_MAX). Sent now, it would
# skip the wait it asks for.
_DUE_AHEAD_MAX = timedelta(days=1)
# Woken put-offs come back through the retry timer and ``deliveries``; a new event routed
# meanwhile still waits behind them.
_WOKEN_RETURN = timedelta(seconds=10)
# A hold taken over is kept at least this long after it was read, however past its time:
# at a deploy or a crash the retry partitions change hands too, and their put-offs wait
# unforwarded until the retry group has rebalanced.
_TAKEN_OVER_KEPT = timedelta(seconds=30)
# A put-off read back that was due longer ago than this was forwarded long since (the retry
# timer forwards what is due within a second); taken over, it would only send its webhook's
# new events round the retry topic after every takeover, for as long as a dead endpoint
# holds the retry partition's commit point (decision 53).
_TAKEN_OVER_STALE = timedelta(minutes=5)
_MICROSECOND = timedelta(microseconds=1)
# The reopening of a hold taken over from another process: none of this process's.
_TAKEN_OVER = -2.0
# What the delivery log says of a put-off (error, error_class).
_CIRCUIT_OPEN = ("put off: the endpoint's circuit is open", "circuit_open")
# Not a failing endpoint: a busy one that said when to come back.
_PAUSED = ("put off: the endpoint asked to wait (Retry-After)", "retry_after")
_HELD = ("put off behind the webhook's paused or earlier put-off deliveries", "held")
_UNCONFIRMED = ("put off: the webhook could not be looked up", "lookup_failed")
# A put-off whose retry record the broker refused for its size: it ends, unsent.
_RETRY_REFUSED = "retry_refused"


@dataclass
class _Hold:
    """The time a webhook's first attempts are put off to. Each wakes a microsecond after
    the one put off before it (``count`` so far): the retry timer wakes records by their
    time, so their order holds wherever in a retry partition one is moved (decision 53)."""

    # The circuit reopening it waits for; -1 for a failed lookup's wait.
    reopening: float
    until: datetime
    count: int = 0
    # In force at least until then, however past its time (a hold taken over).
    floor: datetime | None = None

    @property
    def ends(self) -> datetime:
        """When a delivery put off to it now would wake: after every one so far."""
        return self.until + self.count * _MICROSECOND

    @property
    def kept_until(self) -> datetime:
        """Deliveries routed before then wait behind it: they may be ahead of its woken
        put-offs in ``deliveries``, however late they are handled."""
        kept = self.ends + _WOKEN_RETURN
        return kept if self.floor is None else max(kept, self.floor)

    def in_force(self, routed_at: datetime) -> bool:
        return self.kept_until > routed_at


# Shown at 0 from the start (the alert on dead letters needs a series to rise from).
DEAD_LETTER_REASONS = (
    "invalid_record",
    "attempts_exhausted",
    "gone",
    "handler_failed",
    "too_large",
)


class DeliveryMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.deliveries = metrics.counter(
            "deliveries_total", "Delivery outcomes, a put-off at each", ("outcome",)
        )
        self.attempt_seconds = metrics.histogram(
            "delivery_attempt_seconds", "Time from request start to response"
        )
        self.retries = metrics.counter(
            "retries_scheduled_total",
            "Failed deliveries scheduled again",
            ("tier",),
            from_zero=tuple(str(tier) for tier in range(1, RETRY_TIERS + 1)),
        )
        self.dead_letters = metrics.counter(
            "dead_letters_total",
            "Records sent to the dead-letter topic",
            ("reason",),
            from_zero=DEAD_LETTER_REASONS,
        )
        self.inflight = metrics.gauge("inflight_deliveries", "Deliveries being sent")
        self.circuits_open = metrics.gauge("circuits_open", "Endpoints whose circuit is open")
        self.disabled = metrics.counter(
            "webhooks_disabled_total",
            "Webhooks the dispatcher asked to disable",
            ("reason",),
            from_zero=("gone",),
        )
        # Every delivery counts one of these; looking a labelled child up each time costs
        # three times the increment.
        self.outcomes = {
            outcome: self.deliveries.labels(outcome)
            for outcome in ("delivered", "failed", "skipped", "deferred")
        }


def _written_at(record: ConsumerRecord) -> datetime:
    """When the record was written, by its Kafka timestamp (now when it has none)."""
    written_ms: int = record.timestamp
    if written_ms > 0:
        return datetime.fromtimestamp(written_ms / 1000, UTC)
    return utcnow()


def _about(delivery: Delivery) -> dict[str, Any]:
    """What an attempt of ``delivery`` made now says of it, whatever its outcome."""
    return {
        "delivery_id": delivery.id,
        "event_id": delivery.event.id,
        "webhook_id": delivery.webhook_id,
        "team_id": delivery.event.team_id,
        "attempt": delivery.attempt,
        "attempted_at": utcnow(),
        "kind": delivery.kind,
        "event": delivery.event,
    }


def invalid_record(
    metrics: DeliveryMetrics, topics: Topics, record: ConsumerRecord, reason: str
) -> OutRecord:
    """A record outside its contract: counted, logged, and kept on the dead-letter topic."""
    note_invalid_record(metrics, record, reason)
    return dead_letter_record(topics, record, reason)


def note_invalid_record(
    metrics: DeliveryMetrics, record: ConsumerRecord, reason: str, label: str = "invalid_record"
) -> None:
    """Count and log a record set aside on the dead-letter topic."""
    metrics.dead_letters.labels(label).inc()
    # Where it came from, as the dead letter records it: an operator finds it from the line.
    get_logger("dispatcher").warning(
        "record_dead_lettered",
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        reason=reason,
    )


class DeliveryHandler:
    def __init__(
        self,
        *,
        settings: Settings,
        table: WebhookTable,
        sender: Sender,
        outcomes: BatchingSender,
        topics: Topics,
        metrics: DeliveryMetrics,
        rng: random.Random | None = None,
        assigned: Callable[[], Collection[TopicPartition]] | None = None,
    ) -> None:
        self._table = table
        self._sender = sender
        self._sender_of_outcomes = outcomes
        self._topics = topics
        self._metrics = metrics
        self._policy = RetryPolicy.from_settings(settings)
        self._circuit = CircuitBreaker(
            settings.circuit_failure_threshold,
            settings.circuit_open_seconds,
            settings.circuit_open_max_seconds,
            # A probe answers within its timeout (a quick second try included), or fails.
            probe_for=settings.delivery_timeout_seconds + _PROBE_MARGIN_SECONDS,
        )
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not a secret
        # The deliveries partitions this process owns now (None: all it is handed).
        self._assigned = assigned
        # Bound once: the lazy logger binds anew on every call, six times the cost of a
        # filtered-out call on a bound one, and this one is called for every delivery.
        self._log = get_logger("dispatcher").bind()
        self._confirmed_at: dict[str, float] = {}
        # One database read per webhook at a time; deliveries arriving meanwhile share it.
        self._confirming: dict[str, asyncio.Task[None]] = {}
        self._learning: dict[str, asyncio.Task[None]] = {}
        # A failed read is not tried again for a second either: a database that refuses
        # connections is not asked once per delivery.
        self._unconfirmed_at: dict[str, float] = {}
        # Per webhook: the reopening its deliveries are deferred to, and the time they wake.
        self._holds: dict[str, _Hold] = {}
        # Oldest first: the first one goes when the bound is reached.
        self._resent_delivered: dict[str, None] = {}
        self._inflight = 0
        # Per webhook whose circuit's probe is on its way: done once its outcome is
        # recorded. The webhook's deliveries arriving meanwhile wait for it (bounded)
        # rather than being put off for the circuit's whole wait by a probe that succeeds.
        self._probes: dict[str, asyncio.Future[None]] = {}
        # Read when scraped rather than updated for every delivery (counting open circuits
        # walks every endpoint).
        metrics.inflight.set_function(lambda: self._inflight)
        metrics.circuits_open.set_function(lambda: self._circuit.open_count(time.monotonic()))

    def forget_endpoint(self, webhook_id: str) -> None:
        """The webhook is gone or inactive: no circuit state is kept for it. Its hold
        stays until it lapses (pruned once no longer in force): reactivated, its new
        events still wait behind the first attempts put off before."""
        self._circuit.forget(webhook_id)

    def endpoint_moved(self, webhook_id: str) -> None:
        """The webhook points elsewhere now: what the old URL did (an open circuit, a
        Retry-After pause) says nothing of the new one. Its hold stays: the first attempts
        put off to it keep their place ahead of the new events."""
        self._circuit.forget(webhook_id)

    def forget_endpoints_not(self, active: Callable[[str], bool]) -> None:
        """Forget the endpoints of webhooks no longer ``active`` (a whole reload found them
        gone or inactive, their change record lost on the way)."""
        for webhook_id in self._circuit.endpoints():
            if not active(webhook_id):
                self.forget_endpoint(webhook_id)

    def forget_partitions(self, lost: set[int], partitions: int) -> None:
        """Deliveries of these partitions are another process's now, and so are their
        endpoints' circuits: kept here, they would be counted open by both processes,
        and by this one for ever."""
        for webhook_id in {*self._circuit.endpoints(), *self._holds}:
            if partition_of(webhook_id.encode(), partitions) in lost:
                self._circuit.forget(webhook_id)
                self._holds.pop(webhook_id, None)

    def take_over_holds(self, last_put_off: Mapping[str, datetime]) -> None:
        """First attempts another process put off, read back from the retry topic when
        their partition came here (``last_put_off``: per webhook, when the last of them
        wakes): new events for those webhooks wait behind them, as they would have there."""
        now = utcnow()
        floor = now + _TAKEN_OVER_KEPT
        for webhook_id, wakes in last_put_off.items():
            if wakes < now - _TAKEN_OVER_STALE:
                continue
            current = self._holds.get(webhook_id)
            if current is None or current.ends <= wakes:
                self._holds[webhook_id] = _Hold(_TAKEN_OVER, wakes + _MICROSECOND, floor=floor)
        if len(self._holds) > _WEBHOOKS_REMEMBERED:
            self._prune_holds()

    async def publish(self, source: ConsumerRecord, records: list[OutRecord]) -> None:
        """Until Kafka takes the outcome of ``source`` the record is not finished; keep
        trying, with only the records it did not take: the retry record of an attempt
        whose own record was taken must not be written twice (two chains of retries).
        One the broker will never take (too large for a topic configured smaller) would
        hold the partition's commit point for good: it is set aside as a dead letter of
        the delivery, as the router and the retry timer do."""
        backoff = 0.5
        while records:
            refused = await self._sender_of_outcomes.send_each(records)
            for error in refused.values():
                if not isinstance(error, KafkaError):
                    # The sender has stopped: the delivery ends unfinished, to be sent
                    # again by the partition's next reader.
                    raise error
            # Those replaced by a dead letter of the delivery (not those taken alone).
            replaced: set[int] = set()
            if any(too_large(error) for error in refused.values()):
                set_aside: list[SetAside] = []
                # Each step alone, in a batch of its own: in a round with others, a
                # batch refused for its size would take their records down with it.
                refused = await set_aside_too_large(
                    functools.partial(send_each, self._sender_of_outcomes.producer),
                    self._topics,
                    records,
                    [source] * len(records),
                    refused,
                    set_aside,
                    replaced,
                )
                for record, reason in set_aside:
                    note_invalid_record(self._metrics, record, reason, label="too_large")
            if refused:
                error = refused[min(refused)]
                self._log.warning("outcome_publish_failed", error=str(error), records=len(refused))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _PUBLISH_BACKOFF_MAX_SECONDS)
            following = [records[index] for index in sorted(refused)]
            if any(self._topics.is_retry(records[index][0]) for index in replaced):
                following = self._with_final_attempt(records, refused, replaced, following)
            records = following

    def _with_final_attempt(
        self,
        records: list[OutRecord],
        refused: Mapping[int, BaseException],
        replaced: set[int],
        following: list[OutRecord],
    ) -> list[OutRecord]:
        """The delivery's retry was set aside (a dead letter now): its attempt record says
        a retry is scheduled, and the delivery log would show it retrying for good. The
        attempt goes again as the last one, in place of the one not yet taken; an attempt
        set aside with it is named by the same dead letter and would be refused again."""
        for index, (topic, key, value) in enumerate(records):
            if topic != self._topics.attempts or index in replaced:
                continue
            attempt = decode(Attempt, value)
            ends = {
                "final": True,
                "next_retry_at": None,
                "error": f"{attempt.error or attempt.outcome}; its retry was refused by "
                "the broker for its size (see the dead letter)",
            }
            if attempt.outcome == "deferred":
                # A put-off ends here too, unsent (a deferred record is never final): a
                # failure of the delivery, not of its endpoint, which was not asked.
                ends |= {"outcome": "failed", "error_class": _RETRY_REFUSED}
            final = attempt.model_copy(update=ends)
            corrected = (topic, key, final.to_bytes())
            if index in refused:
                following = [corrected if r is records[index] else r for r in following]
            else:
                following.append(corrected)
        return following

    async def outcome_records(
        self, record: ConsumerRecord, pace: Pace | None = None
    ) -> list[OutRecord]:
        try:
            return await self._outcome_records(record, pace)
        except (asyncio.CancelledError, Withdrawn):
            raise
        except Exception as exc:
            # A bug, not bad input. Kept unfinished, the record would hold its partition's
            # commits back for good and fail again after every restart; as a dead letter it
            # is kept, with the reason, and everything behind it goes on.
            self._log.exception("delivery_handler_failed", offset=record.offset)
            self._metrics.dead_letters.labels("handler_failed").inc()
            reason = f"handler_failed: {type(exc).__name__}: {exc}"
            return [dead_letter_record(self._topics, record, reason)]

    async def _outcome_records(self, record: ConsumerRecord, pace: Pace | None) -> list[OutRecord]:
        try:
            delivery = decode(Delivery, record.value)
        except InvalidRecord as exc:
            return [invalid_record(self._metrics, self._topics, record, exc.message)]
        if delivery.not_before is not None and delivery.not_before > utcnow() + _DUE_AHEAD_MAX:
            reason = (
                f"not_before {delivery.not_before.isoformat()} is more than a day ahead:"
                " a delivery is read here once due"
            )
            return [invalid_record(self._metrics, self._topics, record, reason)]
        if self._resent(delivery):
            return [self._skipped(delivery, "delivered by a manual re-send", "resent")]
        known = self._table.get(delivery.webhook_id)
        if known is not None and known.team_id != delivery.event.team_id:
            # Before the rate wait: a record that will not be sent takes no slot.
            return [self._another_teams(delivery, record)]
        if delivery.kind == "event":
            await self._behind_probe(delivery.webhook_id)
        try:
            route = await self._route_when_due(delivery, record, pace, known)
        except WebhookUnconfirmed:
            return self._waiting(delivery, _UNCONFIRMED_WAIT_SECONDS)
        if route is not None and route.team_id != delivery.event.team_id:
            return [self._another_teams(delivery, record)]
        if self._resent(delivery):
            # Delivered by a re-send while this one waited for its rate slot or a lookup.
            return [self._skipped(delivery, "delivered by a manual re-send", "resent")]
        if route is None or not route.active:
            return [self._skipped(delivery, "webhook is inactive or deleted", "inactive")]
        about = _about(delivery)
        hold = self._held(delivery, record)
        if hold is not None:
            return self._put_off(delivery, hold, _HELD)
        if delivery.kind == "event" and route.id in self._probes:
            # A probe that began while this one waited for its rate or sending slot.
            await self._behind_probe(route.id)
        probing = delivery.kind == "event" and self._circuit.is_open(route.id)
        if delivery.kind == "event" and not self._circuit.allows(route.id, time.monotonic()):
            return self._deferred(delivery, self._circuit.reopens_at(route.id))
        probe = self._probe_starts(route.id) if probing else None
        try:
            clock = time.monotonic()
            self._inflight += 1
            try:
                outcome = await self._sender.send(route, delivery)
            finally:
                self._inflight -= 1
            # The table may not have heard yet of an edit that moved the webhook, and the
            # old receiver answering 410 is just what a move looks like: that stops nothing
            # (the delivery fails and its retry goes to the new URL).
            moved = await self._moved_since(route) if outcome.status_code == GONE else None
            gone = outcome.status_code == GONE and moved is False
            records = self._after(
                route,
                delivery,
                record,
                about,
                outcome,
                started=clock,
                gone=gone,
                left=moved is True,
            )
        finally:
            if probe is not None:
                self._probe_ends(route.id, probe)
        current = self._table.get(route.id)
        if moved and route.id not in self._learning and current and current.url == route.url:
            # The table learns the new URL now, not at the change record (which may be
            # lost): the retry goes there, and the table tells the circuit (a 410 to a
            # URL the table has left already changes nothing). In the background: a whole
            # load may hold the table for a minute, and this delivery's slot with it.
            learning = asyncio.create_task(self._learn(route.id))
            self._learning[route.id] = learning
        return records

    def _probe_starts(self, webhook_id: str) -> asyncio.Future[None]:
        probe = self._probes[webhook_id] = asyncio.get_running_loop().create_future()
        return probe

    def _probe_ends(self, webhook_id: str, probe: asyncio.Future[None]) -> None:
        """The probe's outcome is recorded (or it ended without one): its waiters go on."""
        if not probe.done():
            probe.set_result(None)
        if self._probes.get(webhook_id) is probe:
            del self._probes[webhook_id]

    async def _behind_probe(self, webhook_id: str) -> None:
        """Wait, a little, for the answer to the webhook's probe on its way: the deliveries
        woken with it (put off while the circuit was open) would otherwise be put off
        again for the circuit's whole wait, even when the probe comes back delivered a
        moment later. Past the wait they are put off as before."""
        probe = self._probes.get(webhook_id)
        if probe is not None and not probe.done():
            with contextlib.suppress(TimeoutError):
                # Shielded: one waiter giving up must not end the others' wait.
                await asyncio.wait_for(asyncio.shield(probe), _PROBE_WAIT_SECONDS)

    def _skipped(self, delivery: Delivery, why: str, error_class: str) -> OutRecord:
        self._metrics.outcomes["skipped"].inc()
        about = _about(delivery)
        skipped = Attempt(
            **about, outcome="skipped", error=why, error_class=error_class, final=True
        )
        return self._attempt_record(skipped)

    def _resent(self, delivery: Delivery) -> bool:
        """A retry (or a put-off first attempt) of an event a re-send delivered since."""
        return delivery.kind == "event" and delivery.id in self._resent_delivered

    def _another_teams(self, delivery: Delivery, record: ConsumerRecord) -> OutRecord:
        # Written by hand: the router pairs an event only with its own team's webhooks.
        # Sent, one team's event would reach another team's endpoint.
        reason = f"the event is team {delivery.event.team_id}'s, its webhook another team's"
        return invalid_record(self._metrics, self._topics, record, reason)

    def _note_resent(self, delivery_id: str) -> None:
        self._resent_delivered.pop(delivery_id, None)
        if len(self._resent_delivered) >= _RESENDS_REMEMBERED:
            del self._resent_delivered[next(iter(self._resent_delivered))]
        self._resent_delivered[delivery_id] = None

    async def _learn(self, webhook_id: str) -> None:
        try:
            await self._table.refresh(webhook_id)
        except Exception:
            self._log.exception("webhook_refresh_failed", webhook_ids=[webhook_id])
        else:
            current = self._table.get(webhook_id)
            if current is None or not current.active:
                # Deleted rather than moved: no URL change to tell the circuit of.
                self.forget_endpoint(webhook_id)
        finally:
            self._learning.pop(webhook_id, None)

    async def close(self) -> None:
        """The reads still running in the background end before the database goes."""
        for task in [*self._learning.values(), *self._confirming.values()]:
            await cancel_and_wait(task)

    async def _moved_since(self, route: WebhookRoute) -> bool | None:
        """Whether the webhook points elsewhere than ``route`` now (deleted: it does), as
        the database has it; None when it could not be read (the next 410 asks again)."""
        # A read of its own, begun after this answer: one begun before it (for another 410)
        # may predate an edit that this request, sent after it, went out despite.
        try:
            return await self._table.url_now(route.id) != route.url
        except Exception:
            self._log.exception("webhook_confirm_failed", webhook_id=route.id)
            return None

    async def _route_when_due(
        self,
        delivery: Delivery,
        record: ConsumerRecord,
        pace: Pace | None,
        route: WebhookRoute | None,
    ) -> WebhookRoute | None:
        """The webhook to send to once the endpoint's rate allows, from ``route`` as the
        table has it now; None when it is gone or inactive. A delivery that will not be
        sent (inactive webhook, open circuit) takes no rate slot: a deactivated webhook's
        backlog clears at once, not at its rate."""
        if route is None or not route.active:
            route = await self._confirmed(delivery.webhook_id)
        if route is None or not route.active or pace is None:
            return route
        if self._held(delivery, record) is not None or (
            delivery.kind == "event"
            and not self._circuit.allows(route.id, time.monotonic(), peek=True)
        ):
            return route  # deferred by the caller, without waiting for a slot
        while not await pace(route.rate_limit):
            # The webhook changed during the wait: its new rate decides the slot, and a
            # webhook deactivated meanwhile gets nothing.
            route = self._table.get(delivery.webhook_id)
            if route is None or not route.active:
                return route
        # The wait may have been long: a webhook deactivated meanwhile gets nothing.
        return self._table.get(delivery.webhook_id)

    async def _confirmed(self, webhook_id: str) -> WebhookRoute | None:
        """The webhook as the database has it, when the table says it is gone or inactive.

        The table learns of changes a moment after they commit; a delivery written straight
        to ``deliveries`` (a test event right after creating the webhook, a replay right
        after reactivating it) or routed by a process that learned sooner can arrive
        first, and must not be skipped for good. Asked at most once a second per webhook,
        so a deactivated webhook's backlog does not become a read per delivery: the
        deliveries that arrive while a read is on its way wait for that read, and for a
        second after it the answer stands. Raises ``WebhookUnconfirmed`` when the read fails."""
        reading = self._confirming.get(webhook_id)
        if reading is None:
            now = time.monotonic()
            failed = self._unconfirmed_at.get(webhook_id, -_CONFIRM_EVERY_SECONDS)
            if now - failed < _CONFIRM_EVERY_SECONDS:
                raise WebhookUnconfirmed(f"webhook {webhook_id} could not be looked up")
            last = self._confirmed_at.get(webhook_id, -_CONFIRM_EVERY_SECONDS)
            if now - last < _CONFIRM_EVERY_SECONDS:
                return self._table.get(webhook_id)
            reading = asyncio.create_task(self._confirm(webhook_id))
            self._confirming[webhook_id] = reading
        try:
            # Shielded: a waiter cancelled (a stop) must not cancel the others' read.
            await asyncio.shield(reading)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise WebhookUnconfirmed(f"webhook {webhook_id} could not be looked up") from exc
        return self._table.get(webhook_id)

    async def _confirm(self, webhook_id: str) -> None:
        try:
            await self._table.refresh(webhook_id)
        except Exception:
            self._log.exception("webhook_confirm_failed", webhook_id=webhook_id)
            if len(self._unconfirmed_at) >= _WEBHOOKS_REMEMBERED:
                self._unconfirmed_at.clear()
            self._unconfirmed_at[webhook_id] = time.monotonic()
            raise
        else:
            self._unconfirmed_at.pop(webhook_id, None)
            if len(self._confirmed_at) >= _WEBHOOKS_REMEMBERED:
                self._confirmed_at.clear()
            self._confirmed_at[webhook_id] = time.monotonic()
        finally:
            self._confirming.pop(webhook_id, None)

    def _after(
        self,
        route: WebhookRoute,
        delivery: Delivery,
        record: ConsumerRecord,
        about: dict[str, Any],
        outcome: Outcome,
        *,
        started: float,
        gone: bool,
        left: bool,
    ) -> list[OutRecord]:
        delivered = outcome.outcome == "delivered"
        if delivered and delivery.kind == "manual":
            self._note_resent(delivery.id)
        # Read once, for the pause it asks of the endpoint and for this delivery's retry.
        retry_after = None
        if outcome.status_code in BACK_OFF_STATUSES:
            retry_after = parse_retry_after(outcome.retry_after, utcnow())
        current = self._table.get(route.id)
        fresh = current and current.active and current.url == route.url and not left
        if self._owns(record) and fresh:
            # An answer from a URL the webhook has left since (``left``: the table may not
            # know it yet) says nothing of the new one.
            # A delivery whose partition moved while it was in flight would leave a circuit
            # here for an endpoint whose deliveries another process now sends (counted
            # open by both, and by this one until the webhook next changes).
            now = time.monotonic()
            pause = None if retry_after is None else min(retry_after, self._policy.retry_after_max)
            if pause:
                # A throttled endpoint is asked nothing more until then, not only this
                # delivery: the others would each use an attempt on more 429s.
                self._circuit.pause(
                    route.id, now, pause, started=started, ends_turn=delivery.kind == "event"
                )
            elif delivered or delivery.kind == "event":
                # A re-send or a test failing says little of the live traffic (a receiver
                # refusing old or test payloads), and must not end a probe's turn.
                self._circuit.record(route.id, delivered, now, started=started)
        self._metrics.outcomes[outcome.outcome].inc()
        if outcome.requested:
            # One refused before any request (a private address, a bad stored header, no
            # secret) took no time worth the name: it would pull the latency down.
            self._metrics.attempt_seconds.observe(outcome.latency_ms / 1000)
        self._log.info(
            "delivery_attempted",
            delivery_id=delivery.id,
            webhook_id=route.id,
            event_id=delivery.event.id,
            attempt=delivery.attempt,
            outcome=outcome.outcome,
            status=outcome.status_code,
            ms=outcome.latency_ms,
            error=outcome.error,
        )
        follow_up: list[OutRecord] = []
        next_retry_at: datetime | None = None
        disable_reason = None
        if not delivered:
            # An endpoint failing for days is disabled by the delivery log's writer, which
            # keeps that clock with the webhook.
            if gone:
                disable_reason = "the endpoint answered 410 Gone"
            if disable_reason is None and delivery.kind == "event":
                # From the attempt's end: a 15 s timeout must not eat a 5 s delay, nor a
                # slow 503 its Retry-After.
                next_retry_at = self._schedule(delivery, utcnow(), retry_after)
            if next_retry_at is not None:
                retry = delivery.model_copy(
                    update={"attempt": delivery.attempt + 1, "not_before": next_retry_at}
                )
                tier = self._policy.tier(delivery.attempt)
                self._metrics.retries.labels(str(tier)).inc()
                follow_up.append((self._topics.retry(tier), route.id.encode(), retry.to_bytes()))
            elif delivery.kind == "event":
                reason = "gone" if gone else "attempts_exhausted"
                follow_up.append(self._dead_letter(delivery, record, reason, outcome))
            if disable_reason is not None:
                self._disable(route, disable_reason, about["attempted_at"])
        attempt = Attempt(
            **about,
            outcome=outcome.outcome,
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            error=outcome.error,
            error_class=outcome.error_class,
            final=next_retry_at is None,
            next_retry_at=next_retry_at,
            request_headers=outcome.request_headers or {},
            response_body=outcome.response_body,
            disable_reason=disable_reason,
        )
        return [self._attempt_record(attempt), *follow_up]

    def _owns(self, record: ConsumerRecord) -> bool:
        if self._assigned is None:
            return True
        return TopicPartition(record.topic, record.partition) in self._assigned()

    def _schedule(
        self, delivery: Delivery, now: datetime, retry_after: float | None
    ) -> datetime | None:
        delay = self._policy.delay_after(delivery.attempt, self._rng, retry_after)
        return None if delay is None else now + timedelta(seconds=delay)

    def _held(self, delivery: Delivery, record: ConsumerRecord) -> _Hold | None:
        """The hold a delivery is put off to whatever its circuit says.

        A newly routed event waits behind a hold while the first attempts put off to it
        may not have come back: the circuit can close before they do (a manual retry
        that succeeds, a probe), and the event sent at once would overtake them. A
        delivery coming back from a retry topic waits only behind a hold made after it
        woke and still ahead (the circuit opened again, a lookup failed), which those
        woken before it may have joined; a woken put-off is never held by its own hold."""
        if delivery.kind != "event":
            return None
        hold = self._holds.get(delivery.webhook_id)
        if hold is None:
            return None
        if delivery.not_before is None:
            return hold if hold.in_force(_written_at(record)) else None
        if (
            hold.reopening != _TAKEN_OVER
            and hold.until > delivery.not_before
            and hold.until > utcnow()
        ):
            return hold
        return None

    def _hold(self, webhook_id: str, reopening: float, until: datetime) -> _Hold:
        """The hold to put a delivery off to: the webhook's current one while ahead, even
        when ``until`` is later, else a new one from ``until``. A new hold made while the
        current one is ahead would order its put-offs behind those put off to it since:
        the current one's, woken, are held by it (or deferred to it) after them. Joining
        wakes a delivery before the circuit reopens or the lookup is tried again; it is
        put off once more, and the first of the current hold's back makes the next one."""
        hold = self._holds.get(webhook_id)
        now = utcnow()
        if hold is not None:
            if hold.until > now:
                return hold
            # A later hold starts after every delivery of this one has woken.
            until = max(until, hold.ends)
        elif len(self._holds) >= _WEBHOOKS_REMEMBERED:
            self._prune_holds()
        # A floor carries over: the put-offs taken over may still be unforwarded.
        floor = None if hold is None else hold.floor
        hold = self._holds[webhook_id] = _Hold(reopening, until, floor=floor)
        return hold

    def _prune_holds(self) -> None:
        # Holds no longer in force order nothing new any more; past the bound, those kept
        # longest are worth most.
        now = utcnow()
        kept = [(w, h) for w, h in self._holds.items() if h.in_force(now)]
        if len(kept) >= _WEBHOOKS_REMEMBERED:
            kept.sort(key=lambda held: held[1].kept_until)
            kept = kept[-(_WEBHOOKS_REMEMBERED // 2) :]
        self._holds = dict(kept)

    def _waiting(self, delivery: Delivery, seconds: float) -> list[OutRecord]:
        # Events arriving before it wakes (the webhook's change record may come in
        # meanwhile) wait behind it, as behind a circuit's deferrals.
        until = utcnow() + timedelta(seconds=seconds)
        hold = self._hold(delivery.webhook_id, -1.0, until)
        return self._put_off(delivery, hold, _UNCONFIRMED)

    def _deferred(self, delivery: Delivery, reopens_at: float) -> list[OutRecord]:
        # Every delivery deferred until the same reopening joins one hold (not a time read
        # from the clock each time): they wake a microsecond apart, in their order.
        wait = max(reopens_at - time.monotonic(), 0.0) + 0.05
        until = utcnow() + timedelta(seconds=wait)
        hold = self._hold(delivery.webhook_id, reopens_at, until)
        paused = self._circuit.paused(delivery.webhook_id, time.monotonic())
        return self._put_off(delivery, hold, _PAUSED if paused else _CIRCUIT_OPEN)

    def _put_off(self, delivery: Delivery, hold: _Hold, why: tuple[str, str]) -> list[OutRecord]:
        """The delivery on a retry topic until the hold wakes it, and a record for the
        delivery log: without it a first attempt would be missing from the log (and a
        retry would show a time already past) for as long as the hold lasts."""
        wakes = hold.ends
        hold.count += 1
        # Not attempted, so the attempt number stays.
        put_off = delivery.model_copy(update={"not_before": wakes})
        self._metrics.outcomes["deferred"].inc()
        tier = self._policy.tier(delivery.attempt)
        error, error_class = why
        deferred = Attempt(
            **_about(delivery),
            outcome="deferred",
            error=error,
            error_class=error_class,
            final=False,
            next_retry_at=wakes,
        )
        return [
            (self._topics.retry(tier), delivery.webhook_id.encode(), put_off.to_bytes()),
            self._attempt_record(deferred),
        ]

    def _dead_letter(
        self, delivery: Delivery, record: ConsumerRecord, reason: str, outcome: Outcome
    ) -> OutRecord:
        self._metrics.dead_letters.labels(reason).inc()
        letter = DeadLetter(
            reason=f"{reason}: attempt {delivery.attempt} ended with {outcome.error}",
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            payload=delivery.to_bytes().decode(),
            at=utcnow(),
        )
        return (self._topics.dead_letter, delivery.webhook_id.encode(), letter.to_bytes())

    def _disable(self, route: WebhookRoute, reason: str, attempted_at: datetime) -> None:
        self._log.warning("webhook_disable_requested", webhook_id=route.id, reason=reason)
        self._metrics.disabled.labels("gone").inc()
        # Stop at once here; the delivery log's writer makes it lasting and audited.
        self._table.deactivate(route.id, attempted_at)
        self._circuit.forget(route.id)

    def _attempt_record(self, attempt: Attempt) -> OutRecord:
        return (self._topics.attempts, attempt.webhook_id.encode(), attempt.to_bytes())
