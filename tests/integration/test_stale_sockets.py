"""A dropped connection is sent again at once only when it was a stale keep-alive socket:
a pooled connection that failed at once. One the receiver dropped otherwise (a new
connection, or a pooled one after a while) may carry a request it is acting on; it is a
failed attempt, on the schedule, not a second copy within the attempt."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import Stack
from tests.integration.test_retries import (
    CREATED,
    _delivery,
    _eventually,
    _read_request,
    _webhook_ids,
)

_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


async def _serve(
    answer: Any,
) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/hook"


async def test_a_pooled_connection_dropped_at_once_gets_one_quick_retry(stack: Stack) -> None:
    """The first delivery is answered on a keep-alive connection; the second, sent on that
    pooled connection, is read and the socket closed unanswered (a keep-alive connection
    the server closed as the request came). The same attempt sends again, on a new
    connection, and it counts as one delivered attempt."""
    requests: list[tuple[int, str]] = []
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        connection = connections
        served = 0
        try:
            while True:
                head = await _read_request(reader)
                [webhook_id] = _webhook_ids([head])
                requests.append((connection, webhook_id))
                served += 1
                if served == 2 and connection == 1:
                    break  # the stale socket: read, then closed unanswered
                writer.write(_OK)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server, url = await _serve(answer)
    try:
        await stack.create_webhook(url, CREATED)
        await stack.create_object()
        await _eventually(lambda: len(requests) >= 1)
        await stack.create_object()
        await _eventually(lambda: len(requests) >= 3)
        first, dropped, again = requests[:3]
        assert (first[0], dropped[0]) == (1, 1), "the second went on the pooled connection"
        assert again == (2, dropped[1]), "the same delivery, at once, on a new connection"

        async def logged() -> dict[str, Any] | None:
            found = await _delivery(stack, dropped[1])
            return found if found and found["state"] == "delivered" else None

        delivery = await _eventually(logged)
        assert [a["attempt"] for a in delivery["attempts"]] == [1], "one attempt, not two"
        await asyncio.sleep(0.5)
        assert len(requests) == 3
    finally:
        server.close()
        await server.wait_closed()


async def test_a_new_connection_dropped_at_once_is_not_sent_again_at_once(stack: Stack) -> None:
    """The receiver reads the request on a new connection and drops it a moment later
    (a crash while handling it, say): no second copy within the attempt, which fails and
    waits for the schedule (a receiver got each attempt twice)."""
    requests: list[float] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        requests.append(time.monotonic())
        await asyncio.sleep(0.3)
        writer.close()

    server, url = await _serve(answer)
    try:
        await stack.create_webhook(url, CREATED)
        await stack.create_object()
        await _eventually(lambda: len(requests) >= 1)
        await asyncio.sleep(2.0)
        assert len(requests) == 1, "sent again at once"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_pooled_connection_dropped_after_a_while_is_not_sent_again_at_once(
    stack: Stack,
) -> None:
    """On a pooled connection, the receiver reads the second request, works on it for a
    second and a half, then drops the connection: it may have acted on it, so no
    immediate second copy goes out."""
    requests: list[int] = []
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        connection = connections
        try:
            await _read_request(reader)
            requests.append(connection)
            writer.write(_OK)
            await writer.drain()
            await _read_request(reader)
            requests.append(connection)
            await asyncio.sleep(1.5)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server, url = await _serve(answer)
    try:
        await stack.create_webhook(url, CREATED)
        await stack.create_object()
        await _eventually(lambda: len(requests) >= 1)
        await stack.create_object()
        await _eventually(lambda: len(requests) >= 2)
        await asyncio.sleep(2.5)
        assert requests == [1, 1], "sent again at once (or not on the pooled connection)"
    finally:
        server.close()
        await server.wait_closed()
