"""``hookwire dev``: the whole system on embedded defaults, in one process.

It starts the embedded broker (unless HOOKWIRE_KAFKA_BOOTSTRAP points elsewhere), applies
migrations, bootstraps a dev user, team and token, and runs the three services plus a
sample receiver that shows what a webhook endpoint gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.app import ApiService
from services.auth.admin import bootstrap_dev
from services.auth.app import AuthService
from services.dispatcher.app import DispatcherService
from services.shared import (
    ConfigurationError,
    EmbeddedBroker,
    Loops,
    Service,
    Settings,
    access_tokens,
    bound_port,
    create_engine,
    ensure_topics,
    json_response,
    migrate,
    redacted,
    run_until_signalled,
    start_site,
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


async def run_dev(settings: Settings) -> None:
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _only_one_in(settings.data_dir):
        await _run_dev(settings)


async def _run_dev(settings: Settings) -> None:
    overrides: dict[str, Any] = {}
    stored = dev_secrets(settings.data_dir)
    for name in ("service_credential", "token_pepper", "access_token_private_key"):
        if getattr(settings, name) is None:
            overrides[name] = stored[name]
    if not settings.kafka_bootstrap:
        broker = EmbeddedBroker(host="127.0.0.1")
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
        }
        saved_to = settings.data_dir / "dev.json"
        _write_private(saved_to, dev_info)
        try:
            await run_until_signalled(
                [
                    # Started first, so stopped last: the dispatcher's drain still reaches it.
                    receiver,
                    AuthService(settings, engine),
                    ApiService(settings, engine),
                    DispatcherService(settings, engine),
                ],
                ready_message=banner(dev_info, f"http://{host}:{receiver.port}", saved_to),
            )
        finally:
            await engine.dispose()
    finally:
        if broker is not None:
            broker.stop()
