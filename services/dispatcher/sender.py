"""Sending one delivery as a signed POST and classifying what happened."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest, ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt
from yarl import URL

from services.shared import (
    REFUSED,
    Delivery,
    Settings,
    is_reserved_header,
    literal_refusal,
    redacted,
)

from .errors import Unsigned
from .routing import WebhookRoute
from .signing import signature_header

# How soon a dropped connection counts as a stale keep-alive socket worth one more try.
_STALE_SOCKET_SECONDS = 1.0
# Set, in a delivery's own task, when its request opened a new connection: only a pooled
# one can be a stale keep-alive socket. A new one dropped was dropped by the receiver,
# which may be acting on the request: sent again at once, it would get it twice.
_NEW_CONNECTION: ContextVar[bool] = ContextVar("new_connection", default=False)


class DeliveryConnector(aiohttp.TCPConnector):
    """The dispatcher's connector.

    It notes a request that opened a new connection. aiohttp tells that only through
    trace hooks, which measured here cost 10 to 25 µs on every request (a tenth of a
    delivery); this costs nothing on a pooled one.

    It keeps at most ``idle_max`` keep-alive sockets idle, closing a released one beyond
    that: aiohttp bounds only the connections in use, and deliveries to many distinct
    hosts within the keep-alive time would otherwise leave a socket open for each and run
    the process out of files. The count follows the pool's own queues as aiohttp takes
    from them and adds to them, and is read afresh whenever aiohttp sweeps them."""

    def __init__(self, *, idle_max: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._idle_max = idle_max
        self._idle = 0

    @property
    def idle(self) -> int:
        """Keep-alive sockets idle in the pool now."""
        return self._idle

    def _pooled(self, key: ConnectionKey) -> int:
        return len(self._conns.get(key) or ())

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        before = self._pooled(key)
        try:
            return await super()._get(key, traces)
        finally:
            self._idle -= before - self._pooled(key)

    def _release(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        full = self._idle_max is not None and self._idle >= self._idle_max
        before = self._pooled(key)
        super()._release(key, protocol, should_close=should_close or full)
        self._idle += self._pooled(key) - before

    def _cleanup(self) -> None:
        super()._cleanup()
        self._idle = sum(len(pool) for pool in self._conns.values())

    def _close(self, *, abort_ssl: bool = False) -> list[Awaitable[object]]:
        closing = super()._close(abort_ssl=abort_ssl)
        self._idle = 0
        return closing

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's own signature
    ) -> ResponseHandler:
        # Awaited in the request's own task: the mark is that task's, read after the
        # request as it fails.
        _NEW_CONNECTION.set(True)
        return await super()._create_connection(req, traces, timeout)


USER_AGENT = f"hookwire/{version('hookwire')} (+webhooks)"
# What aiohttp refuses to write in a header, with a ValueError rather than a ClientError.
_UNWRITABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Outcome:
    outcome: Literal["delivered", "failed"]
    status_code: int | None
    latency_ms: float
    error: str | None
    error_class: str | None = None
    request_headers: dict[str, str] | None = None
    response_body: str | None = None
    # The receiver's Retry-After header, as sent.
    retry_after: str | None = None

    @property
    def requested(self) -> bool:
        """Whether a request was made (its headers built and sent, or tried)."""
        return self.request_headers is not None


def signed_headers(
    route: WebhookRoute, delivery: Delivery, body: bytes, timestamp: int
) -> dict[str, str]:
    # The api refuses these; a row may hold one anyway, and hookwire's own must win
    # whatever the case of the stored name.
    headers = {name: value for name, value in route.headers if not is_reserved_header(name)}
    headers.update(
        {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(
                route.signing_keys_at(datetime.fromtimestamp(timestamp, UTC)),
                delivery.id,
                timestamp,
                body,
            ),
        }
    )
    return headers


def payload(delivery: Delivery) -> bytes:
    return delivery.event.to_bytes()


def _unwritable(headers: Iterable[tuple[str, str]]) -> str | None:
    for name, value in headers:
        if _UNWRITABLE.search(name) or _UNWRITABLE.search(value):
            return f"not sent: header {name!r} holds a control character (CR, LF, NUL...)"
    return None


def _bare(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "[webhook url]"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def without_url_secrets(text: str, url: str) -> str:
    """``text`` with the webhook URL's credentials, query and fragment cut out (a
    receiver's token often rides in the query), wherever the URL appears: as stored, or
    as aiohttp shows it (normalised, without its credentials or its fragment)."""
    shown = {url}
    try:
        parsed = URL(url)
    except ValueError:
        pass
    else:
        for parsed_form in (parsed, parsed.with_user(None)):
            shown |= {str(parsed_form), str(parsed_form.with_fragment(None))}
    # Longest first: the URL without its fragment is the start of the URL with it.
    for form in sorted(shown, key=len, reverse=True):
        text = text.replace(form, _bare(form))
    return text


async def _body_start(content: aiohttp.StreamReader, limit: int) -> bytes:
    # ``read`` returns what is buffered, often the first chunk of a chunked answer.
    got = b""
    try:
        while len(got) < limit:
            chunk = await content.read(limit - len(got))
            if not chunk:
                break
            got += chunk
    except (TimeoutError, aiohttp.ClientError):
        # The status is the receiver's answer; a body that stalls or breaks off after it
        # (a wrong Content-Length, a chunk never sent) does not undo a 2xx, which would
        # otherwise be delivered again.
        pass
    return got


def _transient(exc: BaseException) -> bool:
    # A keep-alive socket the server closed between requests: worth one immediate retry.
    # A refused or unresolvable connection is not transient in that sense.
    return isinstance(exc, aiohttp.ServerDisconnectedError) or (
        isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
    )


class Sender:
    """Signs and POSTs one delivery; never raises, every ending is an ``Outcome``."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        self._session = session
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(total=settings.delivery_timeout_seconds)

    async def _post_once(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        within: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, bytes, str | None]:
        async with self._session.post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=within or self._timeout,
        ) as response:
            answer = await _body_start(response.content, self._settings.response_body_limit_bytes)
            return response.status, answer, response.headers.get("retry-after")

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, str | None]:
        # Setting up a tenacity loop costs as much as signing a request, so the first try
        # runs bare and tenacity takes over only after a transient fault.
        started = time.monotonic()
        _NEW_CONNECTION.set(False)
        try:
            return await self._post_once(url, body, headers)
        except aiohttp.ClientError as exc:
            # A stale keep-alive socket is a pooled one, and fails at once. A new
            # connection dropped, or a pooled one dropped later, may have carried a request
            # the receiver is handling: that is a failed attempt, on the schedule, rather
            # than an immediate second copy.
            if (
                not _transient(exc)
                or _NEW_CONNECTION.get()
                or time.monotonic() - started > _STALE_SOCKET_SECONDS
            ):
                raise
        # The second try gets what is left of the attempt's timeout, not a fresh one.
        left = self._settings.delivery_timeout_seconds - (time.monotonic() - started)
        timeout = aiohttp.ClientTimeout(total=max(left, 0.001))
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(1), retry=retry_if_exception(_transient), reraise=True
        ):
            with attempt:
                return await self._post_once(url, body, headers, timeout)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def send(self, route: WebhookRoute, delivery: Delivery) -> Outcome:
        started = time.perf_counter()

        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000, 3)

        refusal = literal_refusal(route.url, private_allowed=self._settings.allow_private_urls)
        if refusal is not None:
            return Outcome("failed", None, elapsed(), refusal, "refused")
        # Hookwire's own header values are known to be clean: only the stored ones are read.
        fault = _unwritable((n, v) for n, v in route.headers if not is_reserved_header(n))
        if fault is not None:
            return Outcome("failed", None, elapsed(), fault, "invalid_header")
        body = payload(delivery)
        try:
            headers = signed_headers(route, delivery, body, int(time.time()))
        except Unsigned as exc:
            return Outcome("failed", None, elapsed(), f"not sent: {exc.message}", "unsigned")
        shown = redacted(headers)
        try:
            status, answer, retry_after = await self._post(route.url, body, headers)
        except TimeoutError:
            return Outcome("failed", None, elapsed(), "timeout", "timeout", shown)
        except aiohttp.ClientError as exc:
            # Stored in the delivery log and logged: no receiver's token may ride along.
            text = without_url_secrets(str(exc), route.url)
            if REFUSED in text:
                refusal = text[text.index(REFUSED) :].rstrip("]")
                return Outcome("failed", None, elapsed(), refusal, "refused", shown)
            error = f"{type(exc).__name__}: {text}"
            return Outcome("failed", None, elapsed(), error, "connection", shown)
        text = answer.decode("utf-8", errors="replace")
        if 200 <= status < 300:
            return Outcome("delivered", status, elapsed(), None, None, shown, text)
        # aiohttp reads a status line of 000 to 099 too; the attempt record keeps HTTP
        # statuses (100 to 999), so such an answer is a failure named by its text alone.
        code = status if 100 <= status <= 999 else None
        return Outcome(
            "failed", code, elapsed(), f"HTTP {status:03d}", "http_status", shown, text, retry_after
        )
