"""Fixtures: a real embedded broker per session, a migrated database per test, the three
services running for real on free ports, and HTTP receivers that record what they get."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import traceback
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web, web_app
from aiokafka import AIOKafkaClient
from aiokafka import client as aiokafka_client
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import AIOKafkaConnection
from sqlalchemy import func, select, text

from services.api import deliveries
from services.api.app import ApiService
from services.api.errors import PublishUnavailable
from services.auth.admin import bootstrap_dev, create_token
from services.auth.app import AuthService
from services.devstack import in_process_services
from services.dispatcher.app import DispatcherService
from services.shared import (
    EVENT_TYPES,
    EmbeddedBroker,
    Service,
    Settings,
    access_tokens,
    bound_port,
    create_engine,
    ensure_topics,
    load_settings,
    make_consumer,
    make_producer,
    migrate,
    start_client,
    start_site,
    stop_client,
    tables,
    topics_for,
)

POSTGRES_DSN = os.environ.get("HOOKWIRE_TEST_POSTGRES_DSN")
ACCESS_TOKEN_KEY = access_tokens.generate_private_key_pem()
DATABASES = ["sqlite"] + (["postgres"] if POSTGRES_DSN else [])


class _KafkaConnections:
    """Every Kafka connection opened during the test running, with where its client was
    made and where it was opened.

    A connection left open outlives its test's event loop and is found by the garbage
    collector at some later point, in whichever test happens to run then. Checked when
    each test ends, on its own loop, it is closed there and named with where it came
    from."""

    def __init__(self) -> None:
        self.opened: weakref.WeakKeyDictionary[AIOKafkaConnection, str] = (
            weakref.WeakKeyDictionary()
        )
        self.clients: weakref.WeakKeyDictionary[AIOKafkaClient, str] = weakref.WeakKeyDictionary()
        # Closed by the broker's end but never by the client: reported at the end of the
        # run, as pytest reports a socket found unclosed (pyproject.toml).
        self.half_closed: list[str] = []

    def install(self) -> None:
        AIOKafkaConnection.__init__ = self._noting(AIOKafkaConnection.__init__, self.opened)  # type: ignore[method-assign]
        AIOKafkaClient.__init__ = self._noting(AIOKafkaClient.__init__, self.clients)  # type: ignore[method-assign]

    @staticmethod
    def _noting(real_init: Callable[..., None], notes: Any) -> Callable[..., None]:
        def init_and_note(made: Any, *args: Any, **kwargs: Any) -> None:
            real_init(made, *args, **kwargs)
            notes[made] = _where()

        return init_and_note

    def close_left_open(self, test: str) -> list[str]:
        """Close what the test left open; describe each that was still connected."""
        connected = []
        try:
            for conn, opened_at in list(self.opened.items()):
                if conn._reader is None:  # close() drops it
                    continue
                # A connection's close callback is its client's; a bootstrap one has none.
                owner = getattr(conn._on_close_cb, "__self__", None)
                made_at = self.clients.get(owner) if owner is not None else None
                described = (
                    f"{test}: its client made at:\n{made_at or '(none: a bootstrap connection)'}"
                    f"\nopened at:\n{opened_at}"
                )
                if conn.connected() or conn._loop.is_closed():
                    connected.append(described)
                else:
                    self.half_closed.append(described)
                if not conn._loop.is_closed():
                    conn.close()
        finally:
            self.opened.clear()
            self.clients.clear()
        return connected


def _where() -> str:
    """The frames of this project and of aiokafka that led here."""
    frames = [
        frame
        for frame in traceback.extract_stack()[:-2]
        if any(part in frame.filename for part in ("/services/", "/tests/", "/aiokafka/"))
    ]
    return "".join(traceback.format_list(frames))


_KAFKA_CONNECTIONS = _KafkaConnections()


def pytest_configure(config: pytest.Config) -> None:
    _KAFKA_CONNECTIONS.install()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for described in _KAFKA_CONNECTIONS.half_closed:
        terminalreporter.write_line(f"Kafka connection closed by the broker only: {described}")


@pytest.fixture(autouse=True)
async def _no_kafka_connection_left_open(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Torn down after the test's other fixtures, on the test's own event loop."""
    yield
    left = _KAFKA_CONNECTIONS.close_left_open(request.node.nodeid)
    if left:
        pytest.fail(f"{len(left)} Kafka connection(s) left open; the first, {left[0]}")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    embedded = EmbeddedBroker()
    embedded.start()
    try:
        asyncio.run(embedded.wait_ready())
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture(autouse=True)
def _release_finished_apps() -> Iterator[None]:
    """aiohttp caches each handler's middleware chain in a module-wide LRU of 1,024
    entries; the bound handlers in it kept every finished test's services alive, with
    their Kafka clients and the metadata of every topic they had seen (4 GB by the end of
    the suite, and multi-second garbage collections that broke timing in later tests)."""
    yield
    web_app._cached_build_middleware.cache_clear()


async def drop_topics(bootstrap: str, prefix: str) -> None:
    """Delete the topics a test made. The broker keeps every record in memory, and every
    Kafka client that starts reads the metadata of every topic: left in place, a whole
    run's topics made each later start slower."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        names = [name for name in await admin.list_topics() if name.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    except Exception as exc:
        print(f"could not delete topics {prefix}*: {exc!r}")
    finally:
        await admin.close()


async def _reset_postgres(dsn: str) -> None:
    engine = create_engine(dsn)
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


@pytest.fixture(params=DATABASES)
async def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "postgres":
        assert POSTGRES_DSN is not None
        await _reset_postgres(POSTGRES_DSN)
        return POSTGRES_DSN
    return f"sqlite+aiosqlite:///{tmp_path / 'hookwire.db'}"


def _settings(broker: EmbeddedBroker, database_url: str, tmp_path: Any) -> Settings:
    """Each test gets its own topics (a fresh prefix) on the shared broker."""
    return load_settings(
        data_dir=tmp_path,
        database_url=database_url,
        kafka_bootstrap=broker.bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        kafka_partitions=2,
        kafka_session_timeout_ms=3000,
        kafka_heartbeat_interval_ms=300,
        api_port=0,
        auth_port=0,
        dispatcher_port=0,
        service_credential="test-service-credential",
        token_pepper="test-pepper",
        access_token_private_key=ACCESS_TOKEN_KEY,
        allow_private_urls=True,
        delivery_timeout_seconds=5,
        # Long enough that no automatic retry lands inside a test that does not ask for one.
        retry_schedule_seconds=(600,),
        log_format="json",
    )


@pytest.fixture
async def settings(
    broker: EmbeddedBroker, database_url: str, tmp_path: Any
) -> AsyncIterator[Settings]:
    made = _settings(broker, database_url, tmp_path)
    yield made
    await drop_topics(broker.bootstrap, made.topic_prefix)


def metadata_as_kafka_answers(monkeypatch: pytest.MonkeyPatch, absent_topic: str) -> None:
    """On Kafka a client's first metadata request (for an empty list of topics) names no
    topic; the embedded broker's answer names them all. Asking instead for a topic that
    does not exist, a client starting from now on learns of no topic, as on Kafka."""
    real_request = aiokafka_client.MetadataRequest

    def as_kafka_answers(topics: list[str] | None = None, *args: Any) -> Any:
        return real_request([absent_topic] if topics == [] else topics, *args)

    monkeypatch.setattr(aiokafka_client, "MetadataRequest", as_kafka_answers)


@dataclass
class Calls:
    """How many times a patched call has been made so far."""

    count: int = 0


def fail_nth_call(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, nth: int, error: Exception
) -> Calls:
    """The ``nth`` call of the coroutine ``owner.name`` raises ``error``; every other call
    goes through to it. This is how a test stages a fault part-way through a sequence."""
    calls = Calls()
    real = getattr(owner, name)

    async def nth_fails(*args: Any, **kwargs: Any) -> Any:
        calls.count += 1
        if calls.count == nth:
            raise error
        return await real(*args, **kwargs)

    monkeypatch.setattr(owner, name, nth_fails)
    return calls


def refuse_second_replay_chunk(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """The event stream takes a re-send's first chunk and refuses the second (and no
    other); returns the real publisher, to put back."""
    real_publish = deliveries._publish
    fail_nth_call(
        monkeypatch, deliveries, "_publish", 2, PublishUnavailable("event stream is unavailable")
    )
    return real_publish


def corrupt(token: str) -> str:
    """The token with its last character changed, so its checksum no longer matches."""
    return token[:-1] + ("0" if token[-1] != "0" else "1")


@dataclass
class Stack:
    settings: Settings
    auth: AuthService
    api: ApiService
    dispatcher_or_none: DispatcherService | None
    team_id: str
    user_id: str
    token: str
    session: aiohttp.ClientSession

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api.port}"

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.auth.port}"

    @property
    def dispatcher(self) -> DispatcherService:
        assert self.dispatcher_or_none is not None, "this stack runs no dispatcher"
        return self.dispatcher_or_none

    @property
    def dispatcher_url(self) -> str:
        return f"http://127.0.0.1:{self.dispatcher.port}"

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token}"}

    async def auth_call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """Call the auth service's public API; returns (status, JSON body or None)."""
        async with self.session.request(
            method, f"{self.auth_url}{path}", headers=self.headers(token), **kwargs
        ) as response:
            body = await response.json() if response.status != 204 else None
            return response.status, body

    async def auth_list(self, path: str = "/v1/tokens") -> list[dict[str, Any]]:
        """The ``data`` of one of the auth service's lists (the caller's keys by default)."""
        status, listed = await self.auth_call("GET", path)
        assert status == 200, listed
        return list(listed["data"])

    async def create_key(self, name: str, permissions: list[str]) -> dict[str, Any]:
        """A key made through the auth service, as every view shows it (its secret, shown
        once, set aside)."""
        status, created = await self.auth_call(
            "POST", "/v1/tokens", json={"name": name, "permissions": permissions}
        )
        assert status == 201, created
        created.pop("token")
        return dict(created)

    async def introspect_call(
        self, payload: Any, credential: str | None = "test-service-credential"
    ) -> tuple[int, Any]:
        """POST ``payload`` to the auth service's introspection endpoint, with the service
        credential given (none when ``None``); returns (status, JSON body)."""
        headers = {"authorization": f"Bearer {credential}"} if credential else {}
        async with self.session.post(
            f"{self.auth_url}/v1/introspect", json=payload, headers=headers
        ) as response:
            return response.status, await response.json()

    async def introspect(self, token: str) -> dict[str, Any]:
        _, answer = await self.introspect_call({"token": token})
        return dict(answer)

    async def new_token(self, permissions: list[str], name: str | None = None) -> str:
        engine = self.api.engine
        _, token = await create_token(
            engine,
            pepper="test-pepper",
            user_id=self.user_id,
            name=name or uuid.uuid4().hex,
            permissions=permissions,
        )
        return token

    async def create_webhook(
        self, url: str, topics: list[str] | None = None, *, routed: bool = True, **fields: Any
    ) -> dict[str, Any]:
        """Create a webhook to ``url`` (all event types by default); with ``routed``, wait
        until the in-process dispatcher routes to it. Returns the api's answer."""
        async with self.session.post(
            f"{self.api_url}/v1/teams/{self.team_id}/webhooks",
            headers=self.headers(),
            json={"name": "test", "url": url, "topics": topics or list(EVENT_TYPES), **fields},
        ) as response:
            webhook: dict[str, Any] = await response.json()
            assert response.status == 201, webhook
        if routed:
            await self.wait_for_webhook(webhook["id"])
        return webhook

    async def subscribe(self, url: str, topics: list[str] | None = None) -> str:
        """Create a webhook and wait until the dispatcher routes to it; returns its id."""
        return str((await self.create_webhook(url, topics))["id"])

    async def create_object(self, data: dict[str, Any] | None = None, kind: str = "contact") -> str:
        """Create an object through the api (publishing ``object.created``); returns its id."""
        async with self.session.post(
            f"{self.api_url}/v1/teams/{self.team_id}/objects/{kind}",
            headers=self.headers(),
            json={"n": 1} if data is None else data,
        ) as response:
            assert response.status == 201
            return str((await response.json())["id"])

    async def wait_for_webhook(self, webhook_id: str, within: float = 15.0) -> None:
        """The dispatcher picks up new webhooks from change records, within a second."""
        deadline = asyncio.get_running_loop().time() + within
        while self.dispatcher.table.get(webhook_id) is None:
            assert asyncio.get_running_loop().time() < deadline, "webhook never reached table"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_stack(settings: Settings, *, with_dispatcher: bool) -> AsyncIterator[Stack]:
    await migrate(settings.effective_database_url)
    await ensure_topics(settings)
    engine = create_engine(settings.effective_database_url)
    try:
        owner = await bootstrap_dev(
            engine,
            "test-pepper",
            email="owner@example.com",
            display_name="Owner",
            team="acme",
            key_name="all",
        )
        async with (
            in_process_services(
                settings, engine, with_dispatcher=with_dispatcher, stop=_stop_within
            ) as services,
            aiohttp.ClientSession() as session,
        ):
            yield Stack(
                settings,
                services.auth,
                services.api,
                services.dispatcher,
                owner["team_id"],
                owner["user_id"],
                owner["token"],
                session,
            )
    finally:
        await engine.dispose()


_STOP_LIMIT_SECONDS = 45.0


async def _stop_within(service: Service) -> None:
    """A stop that hangs fails its test naming the service, with every task's stack
    printed: a bare pytest timeout shows only the event loop waiting."""
    try:
        await asyncio.wait_for(service.stop(), _STOP_LIMIT_SECONDS)
    except TimeoutError:
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stdout)
        pytest.fail(f"{service.name} did not stop within {_STOP_LIMIT_SECONDS} s")


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    """All three services on the parametrized database."""
    async with running_stack(settings, with_dispatcher=True) as running:
        yield running


@pytest.fixture
async def api_stack(settings: Settings) -> AsyncIterator[Stack]:
    """Auth and api only, for request-handling tests that never reach the dispatcher."""
    # No delivery-log consumer: nothing here produces attempts, and a consumer still
    # joining its group takes ~2 s to stop on the embedded broker.
    quiet = settings.model_copy(update={"record_attempts": False})
    async with running_stack(quiet, with_dispatcher=False) as running:
        yield running


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


@dataclass
class Receiver:
    """A real webhook endpoint; ``statuses`` scripts its answers, then it answers 200."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    delay_seconds: float = 0.0
    # When given, each request is answered only once the test opens it.
    gate: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # Requests received and not yet answered.
    open_calls: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(
            Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        self.arrived.set()
        self.open_calls += 1
        try:
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.open_calls -= 1
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok")

    async def wait_for(self, count: int, within: float = 10.0) -> list[Received]:
        async with asyncio.timeout(within):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.received


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recorder = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", recorder.handle)
    runner = await start_site(app, "127.0.0.1", 0)
    recorder.url = f"http://127.0.0.1:{bound_port(runner)}/hook"
    try:
        yield recorder
    finally:
        await runner.cleanup()


async def topic_records(settings: Settings, topic: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` records of a topic, waiting up to 10 s for them."""
    consumer = make_consumer(settings, topic, group_id=None)
    await start_client(consumer, settings)
    found: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(10):
            while len(found) < count:
                batches = await consumer.getmany(timeout_ms=200)
                found += [orjson.loads(r.value) for b in batches.values() for r in b]
    finally:
        await stop_client(consumer)
    return found


async def records_in(settings: Settings, topic: str) -> int:
    """How many records the topic holds (the sum of its partitions' end offsets)."""
    consumer = make_consumer(settings, topic, group_id=None)
    await start_client(consumer, settings)
    try:
        # The embedded broker's end_offsets() is wrong after a batch; a fetch's high-water
        # mark is right. Fetched until every partition has reported one.
        async with asyncio.timeout(10):
            while True:
                await consumer.getmany(timeout_ms=200)
                marks = [consumer.highwater(p) for p in consumer.assignment()]
                if marks and None not in marks:
                    return sum(mark or 0 for mark in marks)
    finally:
        await stop_client(consumer)


async def dead_letters(settings: Settings, count: int) -> list[dict[str, Any]]:
    """The first ``count`` records of the dead-letter topic, waiting up to 10 s for them."""
    return await topic_records(settings, topics_for(settings).dead_letter, count)


async def send_records(
    stack: Stack, topic: str, key: bytes, values: Sequence[bytes | None]
) -> None:
    """Write ``values`` to ``topic`` in order under one key (one partition), as an outside
    producer would, with a producer of its own."""
    producer = make_producer(stack.settings)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


@dataclass
class Pause:
    """Holds the first successful call of a patched lookup after its read: ``read`` is set
    once it has read, and it returns only after ``release``. Later calls go straight
    through. This is how a test puts another request's commit between a read and a write."""

    read: asyncio.Event
    release: asyncio.Event


def pause_first_call(
    monkeypatch: pytest.MonkeyPatch,
    owner: Any,
    name: str,
    only: Callable[..., bool] = lambda *args, **kwargs: True,
) -> Pause:
    """``only`` picks the calls that may be held (by their arguments)."""
    pause = Pause(asyncio.Event(), asyncio.Event())
    real = getattr(owner, name)

    async def first_call_waits(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)
        if only(*args, **kwargs) and not pause.read.is_set():
            pause.read.set()
            await pause.release.wait()
        return result

    monkeypatch.setattr(owner, name, first_call_waits)
    return pause


@contextlib.asynccontextmanager
async def stack_on_own_broker(
    settings: Settings, publish_timeout_seconds: float
) -> AsyncIterator[tuple[Stack, EmbeddedBroker]]:
    """A stack (no dispatcher) on a broker of its own, which the test may stop or pause."""
    broker = EmbeddedBroker()
    broker.start()
    await broker.wait_ready()
    try:
        async with running_stack(
            settings.model_copy(
                update={
                    "kafka_bootstrap": broker.bootstrap,
                    "publish_timeout_seconds": publish_timeout_seconds,
                }
            ),
            with_dispatcher=False,
        ) as stack:
            yield stack, broker
    finally:
        broker.stop()


async def audit_count(stack: Stack, action: str, target_id: str) -> int:
    """How many audit records say ``action`` of ``target_id``."""
    async with stack.api.engine.connect() as conn:
        count = (
            await conn.execute(
                select(func.count()).where(
                    tables.audit_log.c.action == action,
                    tables.audit_log.c.target_id == target_id,
                )
            )
        ).scalar()
    return int(count or 0)


def published_events(stack: Stack) -> dict[str, float]:
    """Events Kafka acknowledged to the api, by type (re-sends and test events are
    ``delivery``): counted before the answer goes out, so the count is final once a
    refused request has answered."""
    counts: dict[str, float] = {}
    for metric in stack.api.metrics.registry.collect():
        if metric.name == "hookwire_api_events_published":
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    counts[sample.labels["type"]] = sample.value
    return counts
