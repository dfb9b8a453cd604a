"""A fast webhook receiver for the dispatch benchmark, run in its own process.

    python -m bench.receiver PORT

``POST /ok/...`` answers 200 and records when the request arrived and, when the event's
``data.sent_at`` is set, how long after its publication; ``POST /fail/...`` answers 500.
``GET /stats`` returns what was recorded and ``POST /reset`` forgets it.

It speaks just enough HTTP/1.1 for the clients it serves (keep-alive, ``content-length``
bodies) on a bare asyncio protocol. A web framework costs several times more per request,
and on a 2-core machine every microsecond the receiver spends is taken from the dispatchers
being measured; the figures should describe them, not the receiver.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

from services.shared import run

_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_FAILED = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_STAMP = b'"sent_at":'


class Recorder:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.received: list[float] = []
        self.latencies_ms: list[float] = []
        self.ids: set[bytes] = set()
        self.failed = 0

    def ok(self, webhook_id: bytes, body: bytes) -> None:
        now = time.time()
        self.received.append(now)
        self.ids.add(webhook_id)
        if _STAMP in body:
            sent_at = orjson.loads(body).get("data", {}).get("sent_at")
            if sent_at is not None:
                self.latencies_ms.append((now - sent_at) * 1000)

    def stats(self) -> bytes:
        body = orjson.dumps(
            {
                "count": len(self.received),
                "distinct": len(self.ids),
                "failed": self.failed,
                "first": self.received[0] if self.received else None,
                "last": self.received[-1] if self.received else None,
                "latencies_ms": self.latencies_ms,
            }
        )
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        return head + str(len(body)).encode() + b"\r\n\r\n" + body


class _Connection(asyncio.Protocol):
    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        answers = []
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self._buffer[:end]
            headers = _headers(head)
            try:
                length = int(headers.get(b"content-length", b"0"))
            except ValueError:
                self._transport.write(_BAD)
                self._transport.close()
                return
            if len(self._buffer) < end + 4 + length:
                break
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            method, path, *_ = (*head.split(b" ", 2), b"", b"")
            answers.append(self._answer(method, path, headers, body))
        if answers:
            self._transport.write(b"".join(answers))

    def _answer(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> bytes:
        if method == b"POST" and path.startswith(b"/ok/"):
            self._recorder.ok(headers.get(b"webhook-id", b""), body)
            return _OK
        if method == b"POST" and path.startswith(b"/fail/"):
            self._recorder.failed += 1
            return _FAILED
        if method == b"GET" and path in (b"/stats", b"/healthz"):
            return self._recorder.stats()
        if method == b"POST" and path == b"/reset":
            self._recorder.reset()
            return _OK
        return _NOT_FOUND


def _headers(head: bytes) -> dict[bytes, bytes]:
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return headers


async def serve(port: int) -> None:
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(recorder), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    # The same event loop as the services (uvloop when installed); stopped with SIGTERM.
    run(serve(int(sys.argv[1])))
