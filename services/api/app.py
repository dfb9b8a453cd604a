"""The api service's application and lifecycle."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from importlib.metadata import version

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from services.shared import (
    READINESS_KEY,
    Change,
    ChangeFollower,
    ChangeNotifier,
    DependencyUnavailable,
    Loops,
    Metrics,
    OpenApi,
    Settings,
    bound_port,
    build_app,
    cancel_and_wait,
    check_listenable,
    check_ready,
    get_logger,
    make_producer,
    require_topics,
    start_client,
    start_site,
    stop_client,
    stop_site,
    topics_for,
    utcnow,
    watch_topics,
)

from . import deliveries, delivery_log, events, objects, webhook_lifecycle, webhooks
from .attempt_recorder import AttemptRecorder
from .authn import TokenGate
from .context import CONTEXT, ApiContext
from .errors import AuthUnavailable
from .outbox import Outbox
from .resend_budget import ResendBudget

_PRUNE_SECONDS = 60.0


class ApiService:
    name = "api"

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self._credential = settings.require_secret("service_credential")
        self.metrics = Metrics("api")
        self._producer: AIOKafkaProducer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self._follower: ChangeFollower | None = None
        self._outbox: Outbox | None = None
        self.loops = Loops(self.name)
        self._relay: asyncio.Task[None] | None = None
        self._ended_keys: asyncio.Task[None] | None = None
        self._pruning: asyncio.Task[None] | None = None
        self._topic_watch: asyncio.Task[None] | None = None
        self._topics_needed: list[str] = []
        self.recorder: AttemptRecorder | None = None
        self._recording: asyncio.Task[None] | None = None
        self.port: int | None = None

    def build_app(
        self, producer: AIOKafkaProducer, session: aiohttp.ClientSession
    ) -> web.Application:
        app = build_app(
            "api",
            self.metrics,
            max_body_bytes=self.settings.max_body_bytes,
            loops=self.loops,
            trusted_proxies=self.settings.trusted_proxies,
        )
        app[CONTEXT] = ApiContext(
            settings=self.settings,
            engine=self.engine,
            gate=TokenGate(
                session,
                self.settings.effective_auth_url,
                self._credential,
                self.settings.auth_cache_ttl_seconds,
                self.metrics,
            ),
            outbox=self.outbox_for(producer),
            topics=topics_for(self.settings),
            changes=ChangeNotifier(producer, topics_for(self.settings)),
            metrics=self.metrics,
            resends=ResendBudget(self.settings.resends_per_team_per_hour, deliveries.MAX_REPLAY),
        )

        async def database_ready() -> None:
            await check_ready(self.engine)

        async def delivery_log_running() -> None:
            if self._recording is not None and self._recording.done():
                raise DependencyUnavailable("the delivery log consumer stopped")

        app[READINESS_KEY].extend([database_ready, delivery_log_running])
        spec = OpenApi(
            "hookwire api",
            version("hookwire"),
            "Webhooks, objects and events",
            tokens_checked_remotely=True,
        )
        webhooks.add_routes(app, spec)
        objects.add_routes(app, spec)
        events.add_routes(app, spec)
        webhook_lifecycle.add_routes(app, spec)
        deliveries.add_routes(app, spec)
        spec.serve(app)
        return app

    def outbox_for(self, producer: AIOKafkaProducer) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox(
                self.engine,
                producer,
                self.metrics,
                self.settings.publish_timeout_seconds,
                dead_letter_topic=topics_for(self.settings).dead_letter,
            )
        return self._outbox

    async def start(self) -> None:
        await check_ready(self.engine)
        check_listenable(self.settings.host, self.settings.api_port, "HOOKWIRE_API_PORT")
        self._producer = make_producer(
            self.settings, request_timeout_ms=int(self.settings.publish_timeout_seconds * 1000)
        )
        await start_client(self._producer, self.settings)
        topics = topics_for(self.settings)
        self._topics_needed = [
            topics.events,
            topics.changes,
            topics.attempts,
            topics.deliveries,
            topics.audit,
            topics.dead_letter,
        ]
        await require_topics(self._producer, self.settings, self._topics_needed)
        # The auth service is infrastructure, looked up like the broker and the database:
        # through the system's resolver (hosts file, NSS), not the webhooks' c-ares one.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=aiohttp.ThreadedResolver()),
            timeout=aiohttp.ClientTimeout(total=5),
        )
        app = self.app = self.build_app(self._producer, self._session)
        gate = app[CONTEXT].gate
        # Every api process reads every change, so a revoked token is refused everywhere
        # within the broker's fetch latency rather than the cache TTL.
        self._follower = ChangeFollower(
            self.settings,
            lambda change: self._apply_change(gate, change),
            loops=self.loops,
            metrics=self.metrics,
        )
        await self._follower.start()
        start = self.loops.start
        self._relay = start(self.outbox_for(self._producer).relay_forever(), name="outbox-relay")
        self._ended_keys = start(self._sync_ended_keys_forever(gate), name="ended-keys")
        self._pruning = start(self._prune_forever(), name="pruning")
        self._topic_watch = start(
            watch_topics(self._producer, self.settings, self._topics_needed, self.metrics),
            name="topics",
        )
        # Joining a consumer group can take seconds; the api serves requests meanwhile.
        if self.settings.record_attempts:
            self.recorder = AttemptRecorder(
                self.settings,
                self.engine,
                self._producer,
                self.metrics,
                self.outbox_for(self._producer),
            )
            self._recording = start(self.recorder.run(), name="delivery-log")
        self._runner = await start_site(
            app, self.settings.host, self.settings.api_port, port_setting="HOOKWIRE_API_PORT"
        )
        self.port = bound_port(self._runner)

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(_PRUNE_SECONDS)
            try:
                async with self.engine.begin() as conn:
                    await events.prune_idempotency_keys(conn, utcnow())
            except Exception:
                get_logger("api").exception("idempotency_prune_failed")
            retention = timedelta(days=self.settings.delivery_log_retention_days)
            try:
                pruned = await delivery_log.prune(self.engine, utcnow() - retention)
            except Exception:
                get_logger("api").exception("delivery_log_prune_failed")
            else:
                if pruned:
                    get_logger("api").info("delivery_log_pruned", deliveries=pruned)

    async def _sync_ended_keys_forever(self, gate: TokenGate) -> None:
        while True:
            try:
                await gate.sync_ended_keys()
            except AuthUnavailable as exc:
                get_logger("api").warning("ended_keys_sync_failed", error=exc.message)
            await asyncio.sleep(self.settings.ended_keys_sync_seconds)

    @staticmethod
    def _apply_change(gate: TokenGate, change: Change) -> None:
        if change.entity == "token":
            gate.forget_token(change.entity_id)
            gate.note_token_state(change.entity_id, change.state)
        elif change.entity in ("user", "membership", "permission_group", "team"):
            gate.forget_all()

    async def stop(self) -> None:
        # Requests first: the ones still arriving and in flight are served by a whole
        # process, its change follower and relay included.
        if self._runner is not None:
            await stop_site(self._runner, self.settings.stop_delay_seconds)
        self.loops.stopping()
        for task in (
            self._relay,
            self._recording,
            self._ended_keys,
            self._pruning,
            self._topic_watch,
        ):
            await cancel_and_wait(task)
        if self.recorder is not None:
            await self.recorder.close()
        if self._follower is not None:
            await self._follower.stop()
        if self._outbox is not None:
            await self._outbox.close()
        if self._session is not None:
            await self._session.close()
        if self._producer is not None:
            await stop_client(self._producer)
