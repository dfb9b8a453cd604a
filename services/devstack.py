"""``hookwire dev``: the whole system on embedded defaults, in one process.

It starts the embedded broker (unless HOOKWIRE_KAFKA_BOOTSTRAP points elsewhere), applies
migrations, bootstraps a dev user, team and token, and runs the three services plus a
sample receiver that shows what a webhook endpoint gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import socket
import stat
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.app import ApiService
from services.api.attempt_recorder import delivery_log_group
from services.auth.admin import bootstrap_dev
from services.auth.app import AuthService
from services.dispatcher.app import DispatcherService
from services.shared import (
    ConfigurationError,
    DependencyUnavailable,
    EmbeddedBroker,
    Loops,
    Service,
    ServiceFailed,
    Settings,
    access_tokens,
    bound_port,
    cancel_and_wait,
    create_engine,
    ensure_topics,
    error_text,
    get_logger,
    json_response,
    make_consumer,
    migrate,
    partitions_of,
    port_problem,
    redacted,
    run_until_signalled,
    start_client,
    start_site,
    stop_client,
    topics_for,
)


def _write_private(path: Path, payload: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as handle:
        handle.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def dev_secrets(data_dir: Path) -> dict[str, str]:
    """Secrets generated once per checkout, so tokens keep working across restarts."""
    path = data_dir / "secrets.json"
    stored: dict[str, str] = orjson.loads(path.read_bytes()) if path.exists() else {}
    wanted = {
        "service_credential": lambda: secrets.token_urlsafe(32),
        "token_pepper": lambda: secrets.token_urlsafe(32),
        "access_token_private_key": access_tokens.generate_private_key_pem,
    }
    missing = {name: make() for name, make in wanted.items() if name not in stored}
    if missing:
        stored.update(missing)
        _write_private(path, stored)
    return stored


class SampleReceiver:
    """A webhook endpoint for trying hookwire out: it keeps the last 100 requests."""

    name = "sample-receiver"

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.received: deque[dict[str, Any]] = deque(maxlen=100)
        self._runner: web.AppRunner | None = None
        self.loops = Loops(self.name)

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None  # shown as it came, below
        self.received.append(
            {
                "path": request.path,
                # A webhook's own credential headers are masked, as the api shows them:
                # this page answers anyone who can reach it.
                # hookwire's own (the signature included) are what the example shows.
                "headers": redacted(
                    {k.lower(): v for k, v in request.headers.items()}, keep_reserved=True
                ),
                "body": parsed,
                # As it came: what the signature covers (the parsed body is for reading).
                "raw_body": body.decode("utf-8", errors="replace"),
            }
        )
        return web.Response(status=204)

    async def _list(self, _: web.Request) -> web.Response:
        return json_response(list(self.received))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/received", self._list)
        app.router.add_post("/{tail:.*}", self._receive)
        self._runner = await start_site(
            app, self.host, self.port, port_setting="HOOKWIRE_DEV_RECEIVER_PORT"
        )
        self.port = bound_port(self._runner)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


_BROKER_WATCH_SECONDS = 0.5


class BrokerWatch:
    """Stops the dev stack, failing, when its embedded broker exits under it (killed,
    crashed): the services would otherwise go on retrying a broker that is gone, saying
    nothing. Its loop ending is what stops the stack, as any failed loop does."""

    name = "embedded-broker"

    def __init__(self, broker: EmbeddedBroker) -> None:
        self._broker = broker
        self.loops = Loops(self.name)
        self._watching: asyncio.Task[None] | None = None
        self.exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self.exit_code is None

    async def start(self) -> None:
        self._watching = self.loops.start(self._watch(), name="embedded-broker-watch")

    async def _watch(self) -> None:
        # Polled: the process is Popen's (a child watcher of the loop's would reap it).
        while True:
            code = self._broker.exit_code
            if code is not None:
                break
            await asyncio.sleep(_BROKER_WATCH_SECONDS)
        self.exit_code = code
        # Popen's negative code is the signal that ended it (-9: kill -9, the OOM killer).
        killed_by = signal.Signals(-code).name if -code in signal.valid_signals() else None
        get_logger("dev").error("embedded_broker_exited", exit_code=code, signal=killed_by)

    async def stop(self) -> None:
        self.loops.stopping()
        await cancel_and_wait(self._watching)


# How long the dev stack's api may take at its stop to write the attempts the dispatcher
# published while it drained: seconds are plenty (a batch or two), and a broker or database
# that does not answer must not hold the stop.
_CATCH_UP_SECONDS = 5.0
_CATCH_UP_POLL_SECONDS = 0.1
_CATCH_UP_STOP_SECONDS = 2.0


async def _ends(
    reader: AIOKafkaConsumer, partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """Each partition's end, from a fetch's high-water marks: the embedded broker's
    end_offsets() is wrong after a batch."""
    while True:
        await reader.getmany(*partitions, timeout_ms=100, max_records=1)
        marks = {partition: reader.highwater(partition) for partition in partitions}
        if None not in marks.values():
            return marks


async def _delivery_log_caught_up(settings: Settings) -> None:
    """Wait, for at most ``_CATCH_UP_SECONDS``, until the api's delivery-log group has
    committed up to the end of the attempts topic: its rows are written before its
    offsets are committed."""
    log = get_logger("api")
    topic = topics_for(settings).attempts
    # The group AttemptRecorder joins; this consumer does not join it (it is assigned its
    # partitions, and never commits), it only asks what the group has committed.
    reader = make_consumer(settings, group_id=delivery_log_group(settings))
    behind: list[TopicPartition] = []
    try:
        async with asyncio.timeout(_CATCH_UP_SECONDS):
            await start_client(reader, settings)
            partitions = await partitions_of(reader, topic)
            reader.assign(partitions)
            ends = await _ends(reader, partitions)
            while True:
                behind = [p for p in partitions if (await reader.committed(p) or 0) < ends[p]]
                if not behind:
                    return
                await asyncio.sleep(_CATCH_UP_POLL_SECONDS)
    except TimeoutError:
        log.warning(
            "delivery_log_not_caught_up", within_seconds=_CATCH_UP_SECONDS, behind=len(behind)
        )
    except (KafkaError, DependencyUnavailable) as exc:
        log.warning("delivery_log_not_caught_up", error=error_text(exc))
    finally:
        await stop_client(reader, within=_CATCH_UP_STOP_SECONDS)


class DevApiService(ApiService):
    """The dev stack's api: before it stops, its delivery log takes in the attempts the
    dispatcher (stopped just before it) published while draining. The embedded broker
    keeps them in memory only: one not read before the stop was lost with it, where on a
    real Kafka the next api process reads it."""

    def __init__(self, settings: Settings, engine: AsyncEngine, broker: BrokerWatch) -> None:
        super().__init__(settings, engine)
        self._broker = broker

    async def stop(self) -> None:
        if self.recorder is not None and self._broker.running:
            await _delivery_log_caught_up(self.settings)
        await super().stop()


@dataclass(frozen=True)
class InProcessServices:
    auth: AuthService
    api: ApiService
    dispatcher: DispatcherService | None


async def _stop(service: Service) -> None:
    await service.stop()


@contextlib.asynccontextmanager
async def in_process_services(
    settings: Settings,
    engine: AsyncEngine,
    *,
    with_dispatcher: bool,
    stop: Callable[[Service], Awaitable[None]] = _stop,
) -> AsyncIterator[InProcessServices]:
    """Auth, the api asking it, and a dispatcher if wanted, started in this process (on
    port 0 they take free ports); on exit each started one is stopped through ``stop``, the
    last started first, also when a later one failed to start."""
    async with contextlib.AsyncExitStack() as started:
        auth = AuthService(settings, engine)
        started.push_async_callback(stop, auth)
        await auth.start()
        api_settings = settings.model_copy(update={"auth_url": f"http://127.0.0.1:{auth.port}"})
        api = ApiService(api_settings, engine)
        started.push_async_callback(stop, api)
        await api.start()
        dispatcher = None
        if with_dispatcher:
            dispatcher = DispatcherService(settings, engine)
            started.push_async_callback(stop, dispatcher)
            await dispatcher.start()
        yield InProcessServices(auth, api, dispatcher)


def banner(info: dict[str, str], receiver_url: str, saved_to: Path) -> str:
    token, team, api = info["token"], info["team_id"], info["api_url"]
    return f"""
hookwire is running (Ctrl-C stops it)
  api         {api}
  auth        {info["auth_url"]}
  dispatcher  {info["dispatcher_url"]}/metrics
  kafka       {info["kafka_bootstrap"]}   (events topic: {info["events_topic"]})
  receiver    {receiver_url}/received   (a sample webhook endpoint)
  token       {token}
  team        {team}
  (saved to {saved_to})

Try it:
  TOKEN={token}
  curl -s -X POST {api}/v1/teams/{team}/webhooks \\
    -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \\
    -d '{{"name": "demo", "url": "{receiver_url}/hook", "topics": ["object.created"]}}'
  sleep 1
  curl -s -X POST {api}/v1/teams/{team}/objects/contact \\
    -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \\
    -d '{{"email": "ada@example.com"}}'
  sleep 1
  curl -s {receiver_url}/received
"""


@contextlib.contextmanager
def _only_one_in(data_dir: Path) -> Iterator[None]:
    """Held while the stack runs: a second one on the same directory would replace the
    dev token (the first one's printed token would stop working) before failing on the
    ports the first one holds."""
    with (data_dir / "dev.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                f"another `hookwire dev` (make run) is using {data_dir}: stop it first, or"
                " give this one another HOOKWIRE_DATA_DIR"
            ) from None
        yield


def _check_ports(settings: Settings) -> None:
    """Every port the stack will listen on, checked before anything starts: a second stack
    otherwise failed on the first port taken, and the user found the others one run at a
    time. (One taken between this check and the start still fails the start.)"""
    wanted = {
        "HOOKWIRE_DEV_RECEIVER_PORT": settings.dev_receiver_port,
        "HOOKWIRE_AUTH_PORT": settings.auth_port,
        "HOOKWIRE_API_PORT": settings.api_port,
        "HOOKWIRE_DISPATCHER_PORT": settings.dispatcher_port,
    }
    if not settings.kafka_bootstrap:
        wanted["HOOKWIRE_DEV_BROKER_PORT"] = settings.dev_broker_port
    held: list[socket.socket] = []
    taken: dict[str, str] = {}
    try:
        for setting, port in wanted.items():
            if port == 0:
                continue  # any free port
            # The embedded broker listens on 127.0.0.1 whatever HOOKWIRE_HOST says.
            host = "127.0.0.1" if setting == "HOOKWIRE_DEV_BROKER_PORT" else settings.host
            problem = port_problem(host, port, held)
            if problem is not None:
                taken[setting] = f"{port} ({setting}: {problem.strerror or problem})"
    finally:
        for probe in held:
            probe.close()
    if taken:
        raise ConfigurationError(
            f"cannot listen on {settings.host} port {', '.join(taken.values())}: set"
            f" {', '.join(taken)} to free ports (a second `hookwire dev` needs ports of its"
            " own as well as its own HOOKWIRE_DATA_DIR)"
        )


async def run_dev(settings: Settings) -> None:
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _only_one_in(settings.data_dir):
        _check_ports(settings)
        await _run_dev(settings)


async def _run_dev(settings: Settings) -> None:
    overrides: dict[str, Any] = {}
    stored = dev_secrets(settings.data_dir)
    for name in ("service_credential", "token_pepper", "access_token_private_key"):
        if getattr(settings, name) is None:
            overrides[name] = stored[name]
    if not settings.kafka_bootstrap:
        broker = EmbeddedBroker(port=settings.dev_broker_port or None, host="127.0.0.1")
        broker.start()
        overrides["kafka_bootstrap"] = broker.bootstrap
    else:
        broker = None
    settings = settings.model_validate({**settings.model_dump(), **overrides})
    try:
        if broker is not None:
            await broker.wait_ready()
        await ensure_topics(settings)
        await migrate(
            settings.effective_database_url,
            lock_timeout_seconds=settings.migration_lock_timeout_seconds,
            lock_wait_seconds=settings.migration_lock_wait_seconds,
        )
        engine = create_engine(settings.effective_database_url)
        info = await bootstrap_dev(engine, settings.require_secret("token_pepper"))
        receiver = SampleReceiver(settings.host, settings.dev_receiver_port)
        host = settings.host
        dev_info = {
            "token": info["token"],
            "team_id": info["team_id"],
            "api_url": f"http://{host}:{settings.api_port}",
            "auth_url": f"http://{host}:{settings.auth_port}",
            "dispatcher_url": f"http://{host}:{settings.dispatcher_port}",
            # A producer of the user's writes events straight to the broker (docs/events.md).
            "kafka_bootstrap": str(settings.kafka_bootstrap),
            "events_topic": topics_for(settings).events,
        }
        saved_to = settings.data_dir / "dev.json"
        _write_private(saved_to, dev_info)
        watch = None if broker is None else BrokerWatch(broker)
        # On a Kafka of the user's, what the api did not read is read by the next one.
        api = (
            ApiService(settings, engine)
            if watch is None
            else DevApiService(settings, engine, watch)
        )
        services: list[Service] = [
            # Started first, so stopped last: the dispatcher's drain still reaches it.
            receiver,
            AuthService(settings, engine),
            api,
            DispatcherService(settings, engine),
        ]
        if watch is not None:
            # Stopped last: a broker dying while the others stop fails the run too.
            services.insert(0, watch)
        try:
            await run_until_signalled(
                services,
                ready_message=banner(dev_info, f"http://{host}:{receiver.port}", saved_to),
            )
        except ServiceFailed:
            if watch is None or watch.running:
                raise
            raise ServiceFailed(
                f"the embedded broker exited (code {watch.exit_code}), so everything was"
                " stopped: what it held in memory is gone; start `hookwire dev` again"
            ) from None
        finally:
            await engine.dispose()
    finally:
        if broker is not None:
            broker.stop()
