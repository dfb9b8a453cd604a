"""The dispatcher process: a router loop, a delivery loop and a change listener.

Both loops follow the same discipline: fetch a batch, make every outcome durable in Kafka
(deliveries, attempts, dead letters acknowledged with acks=all), and only then commit the
batch's offsets. A crash at any point re-processes the batch; ids make that harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    READINESS_KEY,
    Attempt,
    Change,
    ChangeFollower,
    DeadLetter,
    Delivery,
    DependencyUnavailable,
    Event,
    InvalidRecord,
    Metrics,
    Settings,
    bound_port,
    build_app,
    check_ready,
    decode,
    get_logger,
    make_consumer,
    make_producer,
    send_all,
    start_client,
    start_site,
    stop_client,
    topics_for,
    utcnow,
)

from .routing import fan_out
from .sender import Sender
from .table import WebhookTable

_COMMIT_TIMEOUT_SECONDS = 10.0
_RESYNC_SECONDS = 60.0
_CHANGE_REPLAY_MARGIN_MS = 5_000
Records = list[tuple[str, bytes | None, bytes]]


class DispatcherService:
    name = "dispatcher"

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.topics = topics_for(settings)
        self.table = WebhookTable(engine)
        self.metrics = Metrics("dispatcher")
        self._log = get_logger("dispatcher")
        self._deliveries = self.metrics.counter(
            "deliveries_total", "Delivery attempts", ("outcome",)
        )
        self._attempt_seconds = self.metrics.histogram(
            "delivery_attempt_seconds", "Time from request start to response"
        )
        self._routed = self.metrics.counter("events_routed_total", "Events routed")
        self._matched = self.metrics.histogram(
            "webhooks_matched", "Webhooks matched per event", buckets=(0, 1, 2, 5, 10, 50, 100)
        )
        self._dead_letters = self.metrics.counter(
            "dead_letters_total", "Records sent to the dead-letter topic", ("reason",)
        )
        self._inflight = self.metrics.gauge("inflight_deliveries", "Deliveries being sent")
        self._webhooks = self.metrics.gauge("webhooks_loaded", "Webhooks in the routing table")
        self._producer: AIOKafkaProducer | None = None
        self._consumers: list[AIOKafkaConsumer] = []
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._follower = ChangeFollower(settings, self._apply_change)
        self._runner: web.AppRunner | None = None
        self._loaded_at_ms = 0
        self.port: int | None = None

    async def start(self) -> None:
        await check_ready(self.engine)
        await self.table.load_all()
        self._loaded_at_ms = int(utcnow().timestamp() * 1000)
        self._webhooks.set(len(self.table))
        self._producer = make_producer(self.settings)
        await start_client(self._producer, self.settings)
        group = f"{self.settings.topic_prefix}dispatcher"
        router = make_consumer(self.settings, self.topics.events, group_id=f"{group}.router")
        deliverer = make_consumer(
            self.settings, self.topics.deliveries, group_id=f"{group}.delivery"
        )
        self._consumers = [router, deliverer]
        # Group joins are slow on some brokers; joining both groups at once halves start-up.
        await asyncio.gather(*(start_client(c, self.settings) for c in self._consumers))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0)
        )
        sender = Sender(self._session, self.settings)
        self._tasks = [
            asyncio.create_task(self._consume(router, self._route_batch), name="router"),
            asyncio.create_task(
                self._consume(deliverer, lambda batch: self._deliver_batch(batch, sender)),
                name="deliverer",
            ),
            asyncio.create_task(self._resync_forever(), name="resync"),
        ]
        # Changes older than the table load (less a margin for clock skew between producers)
        # are already reflected in it.
        await self._follower.start(newer_than_ms=self._loaded_at_ms - _CHANGE_REPLAY_MARGIN_MS)
        app = build_app("dispatcher", self.metrics)
        app[READINESS_KEY].append(self._ready)
        self._runner = await start_site(app, self.settings.host, self.settings.dispatcher_port)
        self.port = bound_port(self._runner)

    async def _ready(self) -> None:
        await check_ready(self.engine)
        stopped = [task.get_name() for task in self._tasks if task.done()]
        if not self._follower.running:
            stopped.append("changes")
        if stopped:
            raise DependencyUnavailable(f"loops stopped: {', '.join(stopped)}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._follower.stop()
        for consumer in self._consumers:
            await stop_client(consumer)
        if self._producer is not None:
            await stop_client(self._producer)
        if self._session is not None:
            await self._session.close()

    async def _consume(
        self,
        consumer: AIOKafkaConsumer,
        handle: Callable[[list[ConsumerRecord]], Awaitable[None]],
    ) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            records = [record for batch in batches.values() for record in batch]
            if not records:
                continue
            try:
                await handle(records)
                await asyncio.wait_for(consumer.commit(), _COMMIT_TIMEOUT_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Nothing was committed: go back and process the batch again.
                self._log.exception("batch_failed", topic=records[0].topic)
                await self._rewind(consumer)
                await asyncio.sleep(1.0)

    async def _rewind(self, consumer: AIOKafkaConsumer) -> None:
        for partition in consumer.assignment():
            committed = await consumer.committed(partition)
            if committed is None:
                await consumer.seek_to_beginning(partition)
            else:
                consumer.seek(partition, committed)

    def _dead_letter(self, record: ConsumerRecord, reason: str) -> tuple[str, bytes | None, bytes]:
        self._dead_letters.labels("invalid_record").inc()
        self._log.warning("record_dead_lettered", topic=record.topic, reason=reason)
        value = record.value or b""
        letter = DeadLetter(
            reason=reason,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            payload=value.decode("utf-8", errors="replace"),
            at=utcnow(),
        )
        return (self.topics.dead_letter, record.key, letter.to_bytes())

    async def _route_batch(self, records: list[ConsumerRecord]) -> None:
        assert self._producer is not None
        out: Records = []
        for record in records:
            try:
                event = decode(Event, record.value)
            except InvalidRecord as exc:
                out.append(self._dead_letter(record, exc.message))
                continue
            deliveries = fan_out(event, self.table.for_team(event.team_id))
            self._routed.inc()
            self._matched.observe(len(deliveries))
            out.extend(
                (self.topics.deliveries, d.webhook_id.encode(), d.to_bytes()) for d in deliveries
            )
        await send_all(self._producer, out)

    async def _deliver_one(self, delivery: Delivery, sender: Sender) -> Attempt:
        route = self.table.get(delivery.webhook_id)
        attempted_at = utcnow()
        if route is None or not route.active:
            self._deliveries.labels("skipped").inc()
            return Attempt(
                delivery_id=delivery.id,
                event_id=delivery.event.id,
                webhook_id=delivery.webhook_id,
                team_id=delivery.event.team_id,
                attempt=delivery.attempt,
                attempted_at=attempted_at,
                outcome="skipped",
                error="webhook is inactive or deleted",
                final=True,
            )
        self._inflight.inc()
        try:
            outcome = await sender.send(route, delivery)
        finally:
            self._inflight.dec()
        self._deliveries.labels(outcome.outcome).inc()
        self._attempt_seconds.observe(outcome.latency_ms / 1000)
        self._log.info(
            "delivery_attempted",
            delivery_id=delivery.id,
            webhook_id=route.id,
            event_id=delivery.event.id,
            outcome=outcome.outcome,
            status=outcome.status_code,
            ms=outcome.latency_ms,
            error=outcome.error,
        )
        return Attempt(
            delivery_id=delivery.id,
            event_id=delivery.event.id,
            webhook_id=route.id,
            team_id=route.team_id,
            attempt=delivery.attempt,
            attempted_at=attempted_at,
            outcome=outcome.outcome,
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            error=outcome.error,
            final=True,
        )

    async def _deliver_batch(self, records: list[ConsumerRecord], sender: Sender) -> None:
        assert self._producer is not None
        out: Records = []
        pending = []
        for record in records:
            try:
                pending.append(self._deliver_one(decode(Delivery, record.value), sender))
            except InvalidRecord as exc:
                out.append(self._dead_letter(record, exc.message))
        for attempt in await asyncio.gather(*pending):
            out.append((self.topics.attempts, attempt.webhook_id.encode(), attempt.to_bytes()))
        await send_all(self._producer, out)

    async def _apply_change(self, change: Change) -> None:
        if change.entity == "webhook":
            await self._refresh(change.entity_id)

    async def _refresh(self, webhook_id: str) -> None:
        try:
            await self.table.refresh(webhook_id)
        except Exception:
            self._log.exception("webhook_refresh_failed", webhook_id=webhook_id)
        self._webhooks.set(len(self.table))

    async def _resync_forever(self) -> None:
        # A safety net for a change record that was never published.
        while True:
            await asyncio.sleep(_RESYNC_SECONDS)
            try:
                await self.table.load_all()
                self._webhooks.set(len(self.table))
            except Exception:
                self._log.exception("webhook_resync_failed")
