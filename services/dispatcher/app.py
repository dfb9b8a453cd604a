"""The dispatcher process: a router, per-endpoint delivery lanes, a retry timer, and a
change listener.

Every loop makes each record's outcome durable in Kafka (deliveries, attempts, retries,
dead letters acknowledged with acks=all) before its offset is committed. A crash at any
point re-processes what was not committed; stable delivery ids make that harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import IllegalStateError, KafkaError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    FATAL_KAFKA_ERRORS,
    MAX_EVENT_BYTES,
    READINESS_KEY,
    RETRY_TIERS,
    TEST_EVENT_TYPE,
    BatchingSender,
    Change,
    ChangeFollower,
    DependencyUnavailable,
    Event,
    GuardedResolver,
    HandOver,
    InvalidRecord,
    Loops,
    Metrics,
    OutRecord,
    SetAside,
    Settings,
    asynchronous_resolver,
    bound_port,
    build_app,
    cancel_and_wait,
    check_listenable,
    check_ready,
    consume_forever,
    dead_letter_record,
    decode,
    error_text,
    get_logger,
    make_consumer,
    make_patient_consumer,
    make_producer,
    open_files_limit,
    partition_of,
    require_topics,
    start_all,
    start_client,
    start_site,
    stop_client,
    stop_site,
    subscribe_handing_over,
    topic_layout,
    topics_for,
    utcnow,
    watch_topics,
)

from .errors import Refused
from .handler import DeliveryHandler, DeliveryMetrics, note_invalid_record
from .lanes import Lanes, sending_slots
from .put_offs import read_forwarded, read_put_offs
from .retry_timer import RetryTimer
from .routed import RoutedIdentity, routed_identity, send_routed
from .routing import first_deliveries
from .sender import DeliveryConnector, Sender
from .table import WebhookTable

_RESYNC_SECONDS = 60.0
_RESYNC_RETRY_SECONDS = 1.0
_CATCH_UP_SECONDS = 10.0
_LAG_SECONDS = 1.0
_OUTCOME_LINGER_SECONDS = 0.02
# Partitions gained wait this long at most for the put-offs of their last owner to be read.
_TAKE_OVER_SECONDS = 10.0
# Re-encoded, a JSON document grows at most about 4.5 times (numbers in exponent form).
_MAY_GROW_PAST_LIMIT = MAX_EVENT_BYTES // 5
# A batch's delivery records are sent in parts of about this many bytes (each record's
# value): the records of one fan-out are copies of its event, and a batch can hold 500.
_ROUTED_PART_BYTES = 8 * 1024 * 1024


class DispatcherService:
    name = "dispatcher"

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.topics = topics_for(settings)
        self.table = WebhookTable(engine)
        self.metrics = Metrics("dispatcher")
        self._log = get_logger("dispatcher")
        self.delivery_metrics = DeliveryMetrics(self.metrics)
        self._routed = self.metrics.counter("events_routed_total", "Events routed")
        self._matched = self.metrics.histogram(
            "webhooks_matched", "Webhooks matched per event", buckets=(0, 1, 2, 5, 10, 50, 100)
        )
        self._lag = self.metrics.gauge(
            "consumer_lag", "Records not yet processed", ("topic", "partition")
        )
        self._lag_reported: set[TopicPartition] = set()
        self._backlog = self.metrics.gauge("delivery_backlog", "Deliveries held as raw records")
        self._retry_pending = self.metrics.gauge("retries_pending", "Retries waiting in memory")
        self._webhooks = self.metrics.gauge("webhooks_loaded", "Webhooks in the routing table")
        self._producer: AIOKafkaProducer | None = None
        self._consumers: list[AIOKafkaConsumer] = []
        self._session: aiohttp.ClientSession | None = None
        self._resolver: AbstractResolver | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._hand_overs: list[HandOver] = []
        # The records the broker took from the batch being routed, when it refused others:
        # (source topic, partition, offset, destination topic, key).
        self._routed_before: set[RoutedIdentity] = set()
        self._router_assignment: Callable[[], set[TopicPartition]] = set
        self.loops = Loops(self.name)
        self._outcomes: BatchingSender | None = None
        self._handler: DeliveryHandler | None = None
        self._lanes: Lanes | None = None
        self._timer: RetryTimer | None = None
        # The delivery consumer's rebalance listener (decision 55).
        self._deliverer_hand_over: HandOver | None = None
        self._follower = ChangeFollower(
            settings, handle_many=self._apply_changes, loops=self.loops, metrics=self.metrics
        )
        self._runner: web.AppRunner | None = None
        self._loaded_at_ms = 0
        self._resync_wanted = asyncio.Event()
        self.port: int | None = None

    async def start(self) -> None:
        await check_ready(self.engine)
        check_listenable(
            self.settings.host, self.settings.dispatcher_port, "HOOKWIRE_DISPATCHER_PORT"
        )
        # Taken before the read: a change committed while the load reads may be missing
        # from it, so its record must not count as already reflected.
        self._loaded_at_ms = int(utcnow().timestamp() * 1000)
        await self.table.load_all()
        self._webhooks.set(len(self.table))
        self._producer = make_producer(self.settings)
        await start_client(self._producer, self.settings)
        # Every topic but audit (the api writes the notices of webhooks it disables).
        layout = topic_layout(self.settings)
        needed = [name for name in layout if name != self.topics.audit]
        await require_topics(self._producer, self.settings, needed)
        group = f"{self.settings.topic_prefix}dispatcher"
        # Each group's loop finishes what it has in hand and commits before a rebalance
        # moves its partitions (decisions 55 and 56).
        router = make_consumer(self.settings, group_id=f"{group}.router")
        router_hand_over = subscribe_handing_over(router, self.settings, self.topics.events)
        deliverer = make_consumer(self.settings, group_id=f"{group}.delivery")
        self._deliverer_hand_over = deliverer_hand_over = subscribe_handing_over(
            deliverer, self.settings, self.topics.deliveries
        )
        retries = make_patient_consumer(self.settings, group_id=f"{group}.retry")
        retries_hand_over = subscribe_handing_over(
            retries,
            self.settings,
            *(self.topics.retry(tier) for tier in range(1, RETRY_TIERS + 1)),
        )
        self._consumers = [router, deliverer, retries]
        self._router_assignment = router.assignment
        # Group joins are slow on some brokers; joining all groups at once cuts start-up.
        await start_all(self._consumers, self.settings)
        # The guarded resolver refuses private addresses at connect time (DNS rebinding
        # included); either resolver holds no thread while a name server keeps it waiting.
        self._resolver = resolver = (
            asynchronous_resolver() if self.settings.allow_private_urls else GuardedResolver()
        )
        # Half of what the open-files limit leaves for requests, the other half for the
        # keep-alive sockets idle after them.
        slots = sending_slots(open_files_limit())
        self._session = aiohttp.ClientSession(
            connector=DeliveryConnector(
                limit=0, limit_per_host=0, resolver=resolver, idle_max=slots
            ),
            # A cookie one receiver sets must never ride along to the next delivery: two
            # teams' webhooks can share a host.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # Hundreds of deliveries finish at once; their outcomes go out together. Nothing
        # waits on an outcome but its offset commit (the endpoint's slot is already free),
        # so a short linger costs no delivery time and, at a moderate rate, saves most of a
        # produce request per delivery.
        outcomes = self._outcomes = BatchingSender(
            self._producer, linger_seconds=_OUTCOME_LINGER_SECONDS
        )
        handler = DeliveryHandler(
            settings=self.settings,
            table=self.table,
            sender=Sender(self._session, self.settings),
            outcomes=outcomes,
            topics=self.topics,
            metrics=self.delivery_metrics,
            assigned=deliverer.assignment,
        )
        self._handler = handler
        # However the table learns a new URL (a change record, the reload, a 410's re-read).
        self.table.on_url_changed = handler.endpoint_moved
        self._lanes = Lanes(
            deliverer,
            handler.outcome_records,
            handler.publish,
            per_lane=self.settings.delivery_concurrency_per_endpoint,
            backlog_max=self.settings.delivery_backlog_max,
            backlog_max_bytes=self.settings.delivery_backlog_max_bytes,
            rate=self.settings.delivery_rate_per_endpoint,
            sending_max=slots,
            on_commit=self._observe,
            on_lost=lambda lost: self._forget_partitions(deliverer, lost),
            on_gained=lambda gained: self._take_over(deliverer, retries, gained),
        )
        lanes = self._lanes
        self.table.on_pacing_changed = lambda webhook_id: lanes.wake(webhook_id.encode())
        deliverer_hand_over.before_revoke = self._lanes.hand_over
        deliverer_hand_over.after_assign = self._lanes.reassigned
        self._timer = RetryTimer(
            retries,
            self._producer,
            self.topics,
            pending_max=self.settings.retry_pending_max,
            pending_max_bytes=self.settings.retry_pending_max_bytes,
            on_set_aside=lambda record, reason: note_invalid_record(
                self.delivery_metrics, record, reason, label="too_large"
            ),
        )
        retries_hand_over.before_revoke = self._timer.hand_over
        retries_hand_over.after_assign = self._timer.reassigned
        self._hand_overs = [router_hand_over, retries_hand_over]
        # Changes older than the table load are already reflected in it. The newer ones are
        # applied before the first event is routed: a webhook created while the table
        # loaded must not miss those events.
        await self._follower.start(newer_than_ms=self._loaded_at_ms)
        if not await self._follower.wait_caught_up(_CATCH_UP_SECONDS):
            self._log.warning("changes_not_caught_up", within_seconds=_CATCH_UP_SECONDS)
        start = self.loops.start
        self._tasks = [
            start(
                consume_forever(router, self._route_batch, hand_over=router_hand_over),
                name="router",
            ),
            start(self._lanes.run(), name="deliverer"),
            start(self._timer.run(), name="retry-timer"),
            start(self._resync_forever(), name="resync"),
            start(self._measure_lag_forever(router, deliverer, retries), name="lag"),
            start(watch_topics(self._producer, self.settings, needed, self.metrics), name="topics"),
        ]
        app = build_app("dispatcher", self.metrics, loops=self.loops)
        app[READINESS_KEY].append(self._ready)
        self._runner = await start_site(
            app,
            self.settings.host,
            self.settings.dispatcher_port,
            port_setting="HOOKWIRE_DISPATCHER_PORT",
        )
        self.port = bound_port(self._runner)

    async def _ready(self) -> None:
        await check_ready(self.engine)
        stopped = [task.get_name() for task in self._tasks if task.done()]
        if not self._follower.running:
            stopped.append("changes")
        if stopped:
            raise DependencyUnavailable(f"loops stopped: {', '.join(stopped)}")
        if not self._follower.caught_up:
            # The start went on without it (after its wait): until then the table may
            # miss a webhook changed while it loaded, and a rollout should wait for it.
            raise DependencyUnavailable("changes: not caught up since the start yet")

    async def stop(self) -> None:
        """Stop fetching, give in-flight deliveries the grace period, commit, close."""
        self.loops.stopping()
        if self._lanes is not None:
            self._lanes.stop_starting()
        # The router's batch in hand and the retry timer's forward finish and are
        # committed first: cut short, they would be routed or forwarded again by the next
        # owner (a second chain of retries for every forward in hand).
        await asyncio.gather(*(hand_over.stop() for hand_over in self._hand_overs))
        for task in self._tasks:
            await cancel_and_wait(task)
        if self._lanes is not None:
            await self._lanes.drain(self.settings.shutdown_grace_seconds)
        if self._handler is not None:
            await self._handler.close()
        # Only now: draining deliveries still writes their outcomes.
        if self._outcomes is not None:
            await self._outcomes.close()
        # Only now too: the drain is watched through /metrics (inflight_deliveries).
        if self._runner is not None:
            await stop_site(self._runner)
        await self._follower.stop()
        for consumer in self._consumers:
            await stop_client(consumer)
        if self._producer is not None:
            await stop_client(self._producer)
        if self._session is not None:
            await self._session.close()
        # The connector closes only a resolver it made itself.
        if self._resolver is not None:
            await self._resolver.close()

    async def _take_over(
        self,
        consumer: AIOKafkaConsumer,
        retries: AIOKafkaConsumer,
        gained: set[TopicPartition],
    ) -> dict[TopicPartition, dict[bytes, int]]:
        """New events for webhooks whose first attempts the partitions' last owner put off
        wait behind them here too (decision 54): those still in the retry topic through
        holds, and those already forwarded back to the partitions, not yet sent, by
        waiting in their lane (returned: per partition, per webhook, the offset of the
        last one; decision 61)."""
        partitions = consumer.partitions_for_topic(self.topics.deliveries)
        if self._handler is None or not partitions:
            return {}
        of = len(partitions)
        numbers = {p.partition for p in gained}
        try:
            last_put_off, last_forwarded = await asyncio.gather(
                read_put_offs(
                    self.settings,
                    retries,
                    self.topics.retry(1),
                    numbers,
                    of,
                    within=_TAKE_OVER_SECONDS,
                ),
                read_forwarded(
                    self.settings,
                    consumer,
                    self.topics.deliveries,
                    numbers,
                    of,
                    within=_TAKE_OVER_SECONDS,
                ),
            )
            # A partition lost while it was read is another process's to hold.
            owned = {p.partition for p in consumer.assignment() & gained}
            self._handler.take_over_holds(
                {
                    webhook_id: wakes
                    for webhook_id, wakes in last_put_off.items()
                    if partition_of(webhook_id.encode(), of) in owned
                }
            )
        except Exception:
            # A bug, not the broker (that is logged and read around): the partitions
            # must still be delivered, as before any of this was read.
            self._log.exception("put_offs_not_read")
            return {}
        ahead: dict[TopicPartition, dict[bytes, int]] = {}
        for webhook_id, offset in last_forwarded.items():
            key = webhook_id.encode()
            place = TopicPartition(self.topics.deliveries, partition_of(key, of))
            ahead.setdefault(place, {})[key] = offset
        if last_put_off or last_forwarded:
            self._log.info(
                "put_offs_taken_over",
                webhooks=len(last_put_off.keys() | last_forwarded.keys()),
                forwarded=len(last_forwarded),
            )
        return ahead

    def _forget_partitions(self, consumer: AIOKafkaConsumer, lost: set[TopicPartition]) -> None:
        partitions = consumer.partitions_for_topic(self.topics.deliveries)
        if self._handler is not None and partitions:
            self._handler.forget_partitions({p.partition for p in lost}, len(partitions))

    def _observe(self) -> None:
        if self._lanes is not None:
            for partition, behind in self._lanes.lag().items():
                self._set_lag(partition, behind)
            self._backlog.set(self._lanes.backlog)
        if self._timer is not None:
            self._retry_pending.set(self._timer.pending)

    async def _route_batch(self, records: list[ConsumerRecord]) -> None:
        assert self._producer is not None
        out: list[OutRecord] = []
        # The event record each of ``out`` came from.
        sources: list[ConsumerRecord] = []
        out_bytes = 0
        invalid: list[tuple[ConsumerRecord, str]] = []
        routed = 0
        matched: list[int] = []

        def dead_letter(record: ConsumerRecord, reason: str) -> None:
            nonlocal out_bytes
            letter = dead_letter_record(self.topics, record, reason)
            out.append(letter)
            sources.append(record)
            invalid.append((record, reason))
            out_bytes += len(letter[2])

        for record in records:
            if out_bytes >= _ROUTED_PART_BYTES:
                # Dead letters weigh too: a batch of large bad records is as heavy.
                await self._send_routed(out, sources, more=True)
                out, sources, out_bytes = [], [], 0
            try:
                event = decode(Event, record.value)
            except InvalidRecord as exc:
                dead_letter(record, exc.message)
                continue
            if event.type == TEST_EVENT_TYPE:
                dead_letter(record, f"{TEST_EVENT_TYPE} is sent only by the api's test route")
                continue
            size = len(record.value)
            if size > _MAY_GROW_PAST_LIMIT:
                # As the records that carry it will write it (`1e15` becomes
                # `1000000000000000.0`): only a large event can grow past the limit.
                size = max(size, len(event.to_bytes()))
            if size > MAX_EVENT_BYTES:
                # Its delivery and attempt records must fit the stream too; the api keeps
                # its own events within this, a producer writing here directly may not.
                dead_letter(record, f"the event is {size} bytes, over {MAX_EVENT_BYTES}")
                continue
            routed += 1
            matched.append(0)
            for webhook_id, value in first_deliveries(event, self.table.for_team(event.team_id)):
                out.append((self.topics.deliveries, webhook_id.encode(), value))
                sources.append(record)
                matched[-1] += 1
                out_bytes += len(value)
                if out_bytes >= _ROUTED_PART_BYTES:
                    # Held whole, 500 large events to 20 webhooks took a gigabyte and the
                    # loop for seconds (past the group's session timeout).
                    await self._send_routed(out, sources, more=True)
                    out, sources, out_bytes = [], [], 0
        await self._send_routed(out, sources, more=False)
        if self._routed_before:
            # Only this batch's own: the try after a refusal may bring back only some of
            # the partitions the refused batch came from, and the others' turn comes later.
            # Those of a partition gone are its new owner's to route.
            batch = {(record.topic, record.partition, record.offset) for record in records}
            owned = {(p.topic, p.partition) for p in self._router_assignment()}
            self._routed_before = {
                taken
                for taken in self._routed_before
                if taken[:3] not in batch and taken[:2] in owned
            }
        # Counted once sent: a batch handled again after a failure is not counted twice.
        for record, reason in invalid:
            note_invalid_record(self.delivery_metrics, record, reason)
        self._routed.inc(routed)
        for count in matched:
            self._matched.observe(count)

    async def _send_routed(
        self, out: list[OutRecord], sources: list[ConsumerRecord], *, more: bool
    ) -> None:
        """Send one part of a batch's records; ``more``: other parts of it follow, and a
        refusal of one of those must not send this one again."""
        assert self._producer is not None
        # What the broker took in an earlier try of this batch is not sent again: the
        # batch is handled again after a refusal (which lets the loop poll and a rebalance
        # take the batch lock), and its other records were delivered already. Nor is what
        # came from a partition gone since the batch began (a hand-over cut short while
        # its first parts were sent): its new owner routes it from its last commit, and
        # sent from here too, late, it would follow that owner's newer deliveries.
        owned = {(p.topic, p.partition) for p in self._router_assignment()}
        todo = [
            (record, source)
            for record, source in zip(out, sources, strict=True)
            if (source.topic, source.partition) in owned
            and (
                not self._routed_before
                or routed_identity(record, source) not in self._routed_before
            )
        ]
        if len(todo) != len(out):
            out, sources = [record for record, _ in todo], [source for _, source in todo]
        try:
            set_aside = await send_routed(self._producer, self.topics, out, sources)
        except Refused as refused:
            self._routed_before.update(
                routed_identity(record, source)
                for index, (record, source) in enumerate(zip(out, sources, strict=True))
                if index not in refused.failed
            )
            self._note_set_aside(refused.set_aside)
            for error in refused.failed.values():
                if isinstance(error, FATAL_KAFKA_ERRORS):
                    # Not to be tried again for ever while the process looks well: the
                    # loop ends, and the process with it.
                    raise error from refused
            raise
        if more:
            self._routed_before.update(
                routed_identity(record, source) for record, source in zip(out, sources, strict=True)
            )
        self._note_set_aside(set_aside)

    def _note_set_aside(self, set_aside: list[SetAside]) -> None:
        for record, reason in set_aside:
            note_invalid_record(self.delivery_metrics, record, reason, label="too_large")

    async def _apply_changes(self, changes: list[Change]) -> None:
        webhook_ids = list(
            dict.fromkeys(change.entity_id for change in changes if change.entity == "webhook")
        )
        if webhook_ids:
            await self._refresh(webhook_ids)

    async def _refresh(self, webhook_ids: list[str]) -> None:
        try:
            await self.table.refresh_many(webhook_ids)
            if self._handler is not None:
                for webhook_id in webhook_ids:
                    if not self._is_active(webhook_id):
                        # Its open circuit would stay counted in circuits_open for ever.
                        self._handler.forget_endpoint(webhook_id)
        except Exception:
            self._log.exception("webhook_refresh_failed", webhook_ids=webhook_ids[:20])
            # The change records are behind the follower now; a whole load soon takes
            # their place.
            self._resync_wanted.set()
        self._webhooks.set(len(self.table))

    def _is_active(self, webhook_id: str) -> bool:
        route = self.table.get(webhook_id)
        return route is not None and route.active

    def _set_lag(self, partition: TopicPartition, behind: int) -> None:
        self._lag.labels(partition.topic, str(partition.partition)).set(behind)
        self._lag_reported.add(partition)

    async def _measure_lag_forever(
        self, router: AIOKafkaConsumer, deliverer: AIOKafkaConsumer, retries: AIOKafkaConsumer
    ) -> None:
        """Lag of the router; the delivery lanes and the retry timer know their own, for
        the partitions they have read from (the others' is the router's kind)."""
        while True:
            await asyncio.sleep(_LAG_SECONDS)
            owned: set[TopicPartition] = set()
            for component, consumer in ((self._lanes, deliverer), (self._timer, retries)):
                known = component.lag() if component is not None else {}
                for partition, behind in known.items():
                    self._set_lag(partition, behind)
                owned |= known.keys()
                owned |= await self._lag_by_position(consumer, consumer.assignment() - known.keys())
            owned |= await self._lag_by_position(router, router.assignment())
            # A partition another process took is its to report: a frozen value left here
            # would add phantom lag to every sum.
            for gone in self._lag_reported - owned:
                self._lag.remove(gone.topic, str(gone.partition))
            self._lag_reported &= owned

    async def _lag_by_position(
        self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]
    ) -> set[TopicPartition]:
        """Sets the lag of ``partitions`` from where their consumer reads next; returns
        those it could."""
        measured = set()
        for partition in partitions:
            try:
                # A rebalance can finish while position() waits: the partition may be
                # another process's by the time highwater() is asked (an assertion
                # inside the client), and this loop must outlive that.
                # Bounded: a partition whose position is still being looked up must not
                # stop every other partition's figure.
                position = await asyncio.wait_for(consumer.position(partition), _LAG_SECONDS)
                highwater = consumer.highwater(partition)
            except (KafkaError, AssertionError, IllegalStateError, TimeoutError):
                continue
            if highwater is not None:
                self._set_lag(partition, max(0, highwater - position))
                measured.add(partition)
        return measured

    async def _resync_forever(self) -> None:
        # A safety net for a change record that was never published, and the stand-in for
        # a refresh that failed: that one is tried again every second until a load succeeds.
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync_wanted.wait(), _RESYNC_SECONDS)
            wanted = self._resync_wanted.is_set()
            self._resync_wanted.clear()
            try:
                await self.table.load_all()
                self._webhooks.set(len(self.table))
                if self._handler is not None:
                    self._handler.forget_endpoints_not(self._is_active)
            except Exception as exc:
                self._log.warning("webhook_resync_failed", error=error_text(exc))
                if wanted:
                    await asyncio.sleep(_RESYNC_RETRY_SECONDS)
                    self._resync_wanted.set()
