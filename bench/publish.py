"""Publishing benchmark: events acknowledged by one api process (acks=all, warm token cache).

Starts the embedded broker and `hookwire auth` + `hookwire api` as their own processes on
SQLite, then drives ``POST /v1/teams/{team}/events`` with ~1 KB events from this process:
throughput of N keep-alive workers, then latency at half the measured rate (open loop).

    python -m bench.publish [--seconds 5] [--workers 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bench.introspect import (
    HOOKWIRE,
    Scenario,
    _log,
    _run,
    _wait_healthy,
    latency_at_rate,
    throughput,
)
from services.shared import EmbeddedBroker, ensure_topics, free_port, load_settings

EVENT_BYTES = 1024


def _event_payloads(count: int) -> list[str]:
    # Scenario feeds one payload per token slot; each slot here is a whole event body.
    return [
        orjson.dumps(
            {
                "type": "object.updated",
                "object_type": "invoice",
                "object_id": f"inv-{n}",
                "data": {"note": "x" * (EVENT_BYTES - 120), "n": n},
            }
        ).decode()
        for n in range(count)
    ]


class EventScenario(Scenario):
    def payloads(self) -> Iterator[bytes]:
        while True:
            for body in self.tokens:
                yield body.encode()


@dataclass
class Target:
    session: aiohttp.ClientSession
    url: str
    headers: dict[str, str]
    scenario: EventScenario


@contextlib.asynccontextmanager
async def _fresh_stack() -> AsyncIterator[Target]:
    """A new embedded broker, database, auth and api, with a warm token cache.

    Each measured phase gets its own, so none inherits the records of the ones before: the
    embedded broker keeps every record in memory, and a producer alone at 2,500/s saw it
    pause ~95 ms once it held ~28,000 of them (docs/performance.md).
    """
    broker = EmbeddedBroker()
    broker.start()
    servers: list[asyncio.subprocess.Process] = []
    try:
        await broker.wait_ready()
        with tempfile.TemporaryDirectory() as data_dir:
            auth_port, api_port = free_port(), free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKWIRE_")}
            env.update(
                HOOKWIRE_DATABASE_URL=f"sqlite+aiosqlite:///{data_dir}/bench.db",
                HOOKWIRE_KAFKA_BOOTSTRAP=broker.bootstrap,
                HOOKWIRE_SERVICE_CREDENTIAL="bench",
                HOOKWIRE_TOKEN_PEPPER="bench",
                HOOKWIRE_AUTH_PORT=str(auth_port),
                HOOKWIRE_API_PORT=str(api_port),
                HOOKWIRE_AUTH_CACHE_TTL_SECONDS="60",
                HOOKWIRE_LOG_LEVEL="warning",
                HOOKWIRE_LOG_FORMAT="json",
            )
            await ensure_topics(load_settings(kafka_bootstrap=broker.bootstrap))
            _run(env, "migrate")
            user = _run(env, "admin", "create-user", "--email", "b@example.com", "--name", "B")
            team = _run(env, "admin", "create-team", "--name", "bench")
            _run(env, "admin", "add-member", "--user", user, "--team", team, "--role", "owner")
            token = _run(env, "admin", "create-token", "--user", user, "--name", "b").split()[1]
            for service in ("auth", "api"):
                servers.append(
                    await asyncio.create_subprocess_exec(
                        HOOKWIRE, service, env=env, stderr=subprocess.DEVNULL
                    )
                )
            scenario = EventScenario(
                "publish",
                _event_payloads(1000),
                lambda answer: str(answer.get("id", "")).startswith("evt_"),
            )
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                await _wait_healthy(session, f"http://127.0.0.1:{api_port}")
                await _wait_healthy(session, f"http://127.0.0.1:{auth_port}")
                url = f"http://127.0.0.1:{api_port}/v1/teams/{team}/events"
                target = Target(session, url, headers, scenario)
                # Connections, the token cache and the producer's metadata get warm.
                await latency_at_rate(
                    session, url, scenario, 500.0, 2.0, status=201, headers=headers
                )
                yield target
    finally:
        for server in servers:
            server.terminate()
            await server.wait()
        broker.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    _log("throughput")
    async with _fresh_stack() as target:
        peak = await throughput(
            target.session,
            target.url,
            target.scenario,
            args.workers,
            args.seconds,
            status=201,
            headers=target.headers,
        )
    latency: dict[str, Any] = {}
    for name, rate in (
        ("at_half_rate", max(10.0, peak["requests_per_second"] / 2)),
        ("at_1000_per_second", 1000.0),
    ):
        _log(f"latency at {rate:.0f}/s")
        async with _fresh_stack() as target:
            latency[name] = await latency_at_rate(
                target.session,
                target.url,
                target.scenario,
                rate,
                args.seconds,
                status=201,
                headers=target.headers,
            )
    return {
        "benchmark": "publish",
        "event_bytes": EVENT_BYTES,
        "workers": args.workers,
        "seconds": args.seconds,
        "throughput": peak,
        **latency,
        "targets": {"events_per_second": 2000, "p99_ms_at_1000_per_second": 25},
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.seconds = 1.0
    print(orjson.dumps(asyncio.run(main(arguments)), option=orjson.OPT_INDENT_2).decode())
