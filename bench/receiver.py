"""A fast webhook receiver for the dispatch benchmark, run in its own process.

    python -m bench.receiver PORT

``POST /ok/...`` answers 200 and records when the request arrived and, when the event's
``data.sent_at`` is set, how long after its publication; ``POST /fail/...`` answers 500.
``GET /stats`` returns what was recorded and ``POST /reset`` forgets it.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from aiohttp import web

from services.shared import run

received: list[float] = []
latencies_ms: list[float] = []
ids: set[str] = set()
failed = 0


async def ok(request: web.Request) -> web.Response:
    body = await request.read()
    now = time.time()
    received.append(now)
    ids.add(request.headers.get("webhook-id", ""))
    sent_at = orjson.loads(body).get("data", {}).get("sent_at")
    if sent_at is not None:
        latencies_ms.append((now - sent_at) * 1000)
    return web.Response()


async def fail(request: web.Request) -> web.Response:
    global failed
    await request.read()
    failed += 1
    return web.Response(status=500)


async def stats(_: web.Request) -> web.Response:
    return web.json_response(
        {
            "count": len(received),
            "distinct": len(ids),
            "failed": failed,
            "first": received[0] if received else None,
            "last": received[-1] if received else None,
            "latencies_ms": latencies_ms,
        },
        dumps=lambda value: orjson.dumps(value).decode(),
    )


async def reset(_: web.Request) -> web.Response:
    global failed
    received.clear()
    latencies_ms.clear()
    ids.clear()
    failed = 0
    return web.Response()


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/ok/{tail:.*}", ok)
    app.router.add_post("/fail/{tail:.*}", fail)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_get("/healthz", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    # The same event loop as the services (uvloop when installed); stopped with SIGTERM.
    run(serve(int(sys.argv[1])))
