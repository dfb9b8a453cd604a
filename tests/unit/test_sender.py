"""The sender against real receivers: what it sends, what it keeps of the answer, and how
a delivery it cannot send safely ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from services.dispatcher.routing import SigningKey, WebhookRoute
from services.dispatcher.sender import (
    USER_AGENT,
    DeliveryConnector,
    Outcome,
    Sender,
    without_url_secrets,
)
from services.shared import Delivery, bound_port, load_settings, start_site
from tests.samples import sample_event, sample_route

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Endpoint:
    url: str
    received: list[CIMultiDictProxy[str]] = field(default_factory=list)


async def _ok(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Endpoint]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Endpoint:
        endpoint = Endpoint("")

        async def recording(request: web.Request) -> web.StreamResponse:
            endpoint.received.append(request.headers)
            await request.read()
            return await handler(request)

        app = web.Application()
        app.router.add_post("/{tail:.*}", recording)
        runner = await start_site(app, "127.0.0.1", 0)
        runners.append(runner)
        endpoint.url = f"http://127.0.0.1:{bound_port(runner)}/hook"
        return endpoint

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=DeliveryConnector(), cookie_jar=aiohttp.DummyCookieJar()
    ) as made:
        yield made


async def _send(
    session: aiohttp.ClientSession, route: WebhookRoute, body_limit: int = 4096
) -> Outcome:
    settings = load_settings(
        allow_private_urls=True, delivery_timeout_seconds=5, response_body_limit_bytes=body_limit
    )
    delivery = Delivery(id="msg_1", webhook_id=route.id, attempt=1, event=sample_event())
    return await Sender(session, settings).send(route, delivery)


async def test_stored_headers_named_like_hookwires_own_are_not_sent(
    serve: Callable[[Handler], Awaitable[Endpoint]], session: aiohttp.ClientSession
) -> None:
    """A stored header the api would refuse (a row edited by hand, an older release) is
    left out whatever its case: the receiver gets hookwire's own, once each."""
    endpoint = await serve(_ok)
    stored = (
        ("Content-Type", "text/plain"),
        ("WEBHOOK-SIGNATURE", "v1,forged"),
        ("Webhook-Id", "msg_forged"),
        ("User-Agent", "impostor"),
        ("Host", "elsewhere.example"),
        ("X-Tenant", "acme"),
    )
    outcome = await _send(session, sample_route(url=endpoint.url, headers=stored))
    assert outcome.outcome == "delivered", outcome.error
    (headers,) = endpoint.received
    assert headers.getall("content-type") == ["application/json"]
    assert headers.getall("user-agent") == [USER_AGENT]
    assert headers.getall("webhook-id") == ["msg_1"]
    (signature,) = headers.getall("webhook-signature")
    assert signature.startswith("v1,")
    assert "forged" not in signature
    assert headers.getall("host") == [endpoint.url.split("/")[2]]
    assert headers.getall("x-tenant") == ["acme"]


@pytest.mark.parametrize(
    "stored",
    [("X-Tenant", "acme\r\nX-Injected: 1"), ("X-Tenant", "a\nb"), ("X-Bad\r\nName", "v")],
)
async def test_a_stored_header_with_a_line_break_fails_the_attempt(
    serve: Callable[[Handler], Awaitable[Endpoint]],
    session: aiohttp.ClientSession,
    stored: tuple[str, str],
) -> None:
    """aiohttp refuses such a header with a ValueError; the sender, which never raises,
    makes it a failed attempt that names the header, and nothing is sent."""
    endpoint = await serve(_ok)
    outcome = await _send(session, sample_route(url=endpoint.url, headers=(stored,)))
    assert (outcome.outcome, outcome.error_class) == ("failed", "invalid_header")
    assert outcome.error is not None
    assert repr(stored[0]) in outcome.error
    assert endpoint.received == []


@pytest.mark.parametrize(
    "keys",
    [(), (SigningKey(b"k", datetime(2020, 1, 1, tzinfo=UTC)),)],
    ids=["no secret", "only an expired secret"],
)
async def test_a_webhook_with_no_signing_secret_in_force_is_never_sent_unsigned(
    serve: Callable[[Handler], Awaitable[Endpoint]],
    session: aiohttp.ClientSession,
    keys: tuple[SigningKey, ...],
) -> None:
    """Rather than a request with an empty webhook-signature, a failed attempt."""
    endpoint = await serve(_ok)
    outcome = await _send(session, sample_route(url=endpoint.url, signing_keys=keys))
    assert (outcome.outcome, outcome.error_class) == ("failed", "unsigned")
    assert outcome.error == "not sent: the webhook has no signing secret in force"
    assert endpoint.received == []


def _chunked(
    chunks: list[bytes], pause: float = 0.05
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(pause)
        await response.write_eof()
        return response

    return answer


async def test_the_stored_body_is_read_across_chunks_up_to_the_limit(
    serve: Callable[[Handler], Awaitable[Endpoint]], session: aiohttp.ClientSession
) -> None:
    """A chunked answer arriving a piece at a time is kept whole, not its first chunk."""
    endpoint = await serve(_chunked([b"first-", b"second-", b"third"]))
    outcome = await _send(session, sample_route(url=endpoint.url))
    assert outcome.response_body == "first-second-third"
    outcome = await _send(session, sample_route(url=endpoint.url), body_limit=10)
    assert outcome.response_body == "first-seco"


async def test_a_body_past_the_limit_is_not_waited_for_and_its_connection_closes(
    serve: Callable[[Handler], Awaitable[Endpoint]], session: aiohttp.ClientSession
) -> None:
    """At the limit the reading stops, with the receiver still sending; the connection
    is closed rather than kept for the next delivery with a body half read in it."""
    closed = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"12345")
                await asyncio.sleep(0.02)
        except ConnectionError:
            closed.set()
        return response

    endpoint = await serve(endless)
    outcome = await _send(session, sample_route(url=endpoint.url), body_limit=12)
    assert (outcome.outcome, outcome.response_body) == ("delivered", "123451234512")
    assert outcome.latency_ms < 2000
    await asyncio.wait_for(closed.wait(), 2)


async def test_a_failed_attempts_error_shows_no_query_or_credentials_of_the_url(
    session: aiohttp.ClientSession,
) -> None:
    """aiohttp names the URL in the error of a malformed answer; a receiver's token in
    its query (or credentials in it) stays out of the delivery log and the logs."""

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 abc\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(malformed, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://user:hunter2@127.0.0.1:{port}/hook?token=secret#anchor"
        outcome = await _send(session, sample_route(url=url))
    finally:
        server.close()
        await server.wait_closed()
    assert (outcome.outcome, outcome.error_class) == ("failed", "connection")
    assert outcome.error is not None
    assert f"http://127.0.0.1:{port}/hook" in outcome.error
    for secret in ("secret", "hunter2", "anchor", "?"):
        assert secret not in outcome.error.split("url=")[-1], outcome.error


@pytest.mark.parametrize(
    ("url", "text", "shown"),
    [
        # As stored (InvalidURL names it so).
        (
            "http://h.example:99999/p?token=secret",
            "http://h.example:99999/p?token=secret",
            "http://h.example:99999/p",
        ),
        # Normalised by yarl, credentials and fragment dropped, as ClientResponseError shows it.
        (
            "https://u:pw@H.example/h%6fok?token=s%65cret#frag",
            "400, message='x', url='https://h.example/hook?token=secret'",
            "400, message='x', url='https://h.example/hook'",
        ),
        ("https://h.example/hook", "url='https://h.example/hook'", "url='https://h.example/hook'"),
    ],
)
def test_the_url_is_stripped_in_each_form_it_is_shown(url: str, text: str, shown: str) -> None:
    """The URL as stored or as aiohttp renders it loses query, fragment and credentials."""
    assert without_url_secrets(text, url) == shown


async def test_keep_alive_sockets_beyond_the_bound_are_closed() -> None:
    """Deliveries to more hosts than the pool may keep leave only ``idle_max`` sockets
    open after them (the others closed as they are released); a host with one kept is
    reused; the keep-alive sweep counts afresh."""
    open_sockets: set[asyncio.StreamWriter] = set()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_sockets.add(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # a GET: no body follows
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            open_sockets.discard(writer)
            writer.close()

    servers = [await asyncio.start_server(answer, "127.0.0.1", 0) for _ in range(4)]
    urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}/" for s in servers]
    connector = DeliveryConnector(idle_max=2, keepalive_timeout=1.5)

    async def settled(count: int) -> None:
        for _ in range(40):  # well within the keep-alive time
            if len(open_sockets) == count:
                return
            await asyncio.sleep(0.02)
        assert len(open_sockets) == count

    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for url in urls:
                async with session.get(url) as response:
                    assert await response.text() == "ok"
            await settled(2)
            assert connector.idle == 2
            async with session.get(urls[0]) as response:  # kept: reused
                await response.read()
            async with session.get(urls[3]) as response:  # not kept: a new one, closed
                await response.read()
            await settled(2)
            assert connector.idle == 2
            await asyncio.sleep(3.2)  # past two sweeps: both closed
            await settled(0)
            assert connector.idle == 0
            async with session.get(urls[1]) as response:
                await response.read()
            assert connector.idle == 1
        assert connector.idle == 0, "a closed connector keeps none"
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
