"""Introspection benchmark: one auth process, driven from this separate client process.

Scenarios: a cached valid token, uncached valid tokens (a pool larger than one pass, with
the auth cache disabled), well-formed unknown tokens, and malformed ones. For each: the
throughput of N concurrent keep-alive workers, and latency percentiles at a fixed offered
rate (open loop, measured from each request's scheduled time). The same client loop against
a bare aiohttp server in the same run gives the ceiling, so results read as ratios on a
noisy shared machine.

    python bench/introspect.py [--seconds 5] [--workers 32] [--rate 1000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from services.auth.tokens import generate_token
from services.shared import EmbeddedBroker, free_port, settle_heap

HOOKWIRE = str(Path(sys.executable).parent / "hookwire")
CREDENTIAL = "bench-service-credential"
BARE_SERVER = textwrap.dedent(
    """
    import sys
    from aiohttp import web
    BODY = b'{"active": true, "token_id": "tok_x", "user_id": "usr_x", "permissions": []}'
    async def answer(request):
        await request.read()
        return web.Response(body=BODY, content_type="application/json")
    app = web.Application()
    app.router.add_post("/v1/introspect", answer)
    app.router.add_get("/healthz", answer)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
    """
)

Check = Callable[[dict[str, Any]], bool]


@dataclass
class Scenario:
    name: str
    tokens: list[str]
    check: Check

    def payloads(self) -> Iterator[bytes]:
        while True:
            for token in self.tokens:
                yield orjson.dumps({"token": token, "client_ip": "127.0.0.1"})


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([HOOKWIRE, *args], env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


async def _wait_healthy(
    session: aiohttp.ClientSession, url: str, path: str = "/healthz", within: float = 10.0
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}{path}") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{url}{path} never answered 200")


async def throughput(
    session: aiohttp.ClientSession,
    url: str,
    scenario: Scenario,
    workers: int,
    seconds: float,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    settle_heap()  # a full collection in the load generator would pause every request
    payloads = scenario.payloads()
    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            async with session.post(
                url, data=next(payloads), headers=headers or _headers()
            ) as response:
                ok = response.status == status and scenario.check(await response.json())
            done += 1
            errors += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    return {"requests_per_second": round(done / elapsed, 1), "requests": done, "wrong": errors}


async def latency_at_rate(
    session: aiohttp.ClientSession,
    url: str,
    scenario: Scenario,
    rate: float,
    seconds: float,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    settle_heap()  # a full collection in the load generator would pause every request
    payloads = scenario.payloads()
    latencies: list[float] = []
    errors = 0
    interval = 1.0 / rate
    start = time.perf_counter()

    async def one(scheduled: float) -> None:
        nonlocal errors
        async with session.post(
            url, data=next(payloads), headers=headers or _headers()
        ) as response:
            ok = response.status == status and scenario.check(await response.json())
        latencies.append(time.perf_counter() - scheduled)
        errors += not ok

    tasks = []
    count = int(rate * seconds)
    for number in range(count):
        scheduled = start + number * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "offered_rate": rate,
        "achieved_rate": round(count / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        "wrong": errors,
    }


def _percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _headers() -> dict[str, str]:
    return {"authorization": f"Bearer {CREDENTIAL}", "content-type": "application/json"}


def _active(answer: dict[str, Any]) -> bool:
    return answer.get("active") is True


def _refused(reason: str) -> Check:
    return lambda answer: answer == {"active": False, "reason": reason}


def _malformed(token: str) -> str:
    return token[:-1] + ("0" if token[-1] != "0" else "1")


def _environment(data_dir: str, bootstrap: str, port: int, cache_seconds: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKWIRE_")}
    env.update(
        HOOKWIRE_DATABASE_URL=f"sqlite+aiosqlite:///{data_dir}/bench.db",
        HOOKWIRE_KAFKA_BOOTSTRAP=bootstrap,
        HOOKWIRE_SERVICE_CREDENTIAL=CREDENTIAL,
        HOOKWIRE_TOKEN_PEPPER="bench-pepper",
        HOOKWIRE_AUTH_PORT=str(port),
        HOOKWIRE_LOG_LEVEL="warning",
        HOOKWIRE_LOG_FORMAT="json",
        HOOKWIRE_TOKEN_CACHE_SECONDS=str(cache_seconds),
    )
    return env


def _create_tokens(env: dict[str, str], count: int) -> list[str]:
    _run(env, "migrate")
    user = _run(env, "admin", "create-user", "--email", "bench@example.com", "--name", "Bench")
    team = _run(env, "admin", "create-team", "--name", "bench")
    _run(env, "admin", "add-member", "--user", user, "--team", team, "--role", "owner")
    return [
        _run(
            env,
            "admin",
            "create-token",
            "--user",
            user,
            "--name",
            f"t{n}",
            "--permission",
            "object:read",
        ).split()[1]
        for n in range(count)
    ]


async def measure(
    url: str, scenarios: list[Scenario], args: argparse.Namespace, rate: float | None = None
) -> dict[str, Any]:
    results = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _wait_healthy(session, url.rsplit("/v1", 1)[0])
        for scenario in scenarios:
            _log(f"  {scenario.name}")
            await throughput(session, url, scenario, args.workers, min(1.0, args.seconds))
            results[scenario.name] = {
                **await throughput(session, url, scenario, args.workers, args.seconds),
                "at_rate": await latency_at_rate(
                    session, url, scenario, rate or args.rate, args.seconds
                ),
            }
    return results


async def bench_auth(
    bootstrap: str,
    args: argparse.Namespace,
    tokens: int,
    cache_seconds: float,
    scenario_names: set[str],
    rate: float | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        env = _environment(data_dir, bootstrap, port, cache_seconds)
        _log(f"creating {tokens} tokens")
        valid = _create_tokens(env, tokens)
        unknown = [generate_token() for _ in range(200)]
        every = [
            Scenario("cached_valid", valid[:1], _active),
            Scenario("uncached_valid", valid, _active),
            Scenario("unknown", unknown, _refused("unknown")),
            Scenario("malformed", [_malformed(t) for t in unknown], _refused("malformed")),
        ]
        server = await asyncio.create_subprocess_exec(
            HOOKWIRE, "auth", env=env, stderr=subprocess.DEVNULL
        )
        try:
            url = f"http://127.0.0.1:{port}/v1/introspect"
            chosen = [s for s in every if s.name in scenario_names]
            return await measure(url, chosen, args, rate)
        finally:
            server.terminate()
            await server.wait()


async def bench_bare(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", BARE_SERVER, str(port))
    try:
        scenario = Scenario("bare_http", ["x"], _active)
        url = f"http://127.0.0.1:{port}/v1/introspect"
        return (await measure(url, [scenario], args))["bare_http"]
    finally:
        server.terminate()
        await server.wait()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    broker = EmbeddedBroker()
    broker.start()
    try:
        await broker.wait_ready()
        _log("bare aiohttp server (the ceiling)")
        bare = await bench_bare(args)
        _log("auth with its token cache")
        cached = await bench_auth(
            broker.bootstrap, args, 1, 30.0, {"cached_valid", "unknown", "malformed"}
        )
        _log("auth with its token cache off (every lookup reaches the database)")
        # Without the cache one process cannot carry the main rate; its latency is measured
        # at a rate it sustains, so the figure is not just queueing.
        uncached = await bench_auth(
            broker.bootstrap, args, args.pool, 0.0, {"uncached_valid"}, args.uncached_rate
        )
    finally:
        broker.stop()
    scenarios = {**cached, **uncached}
    bare_rps = bare["requests_per_second"]
    return {
        "benchmark": "introspect",
        "workers": args.workers,
        "seconds": args.seconds,
        "rate": args.rate,
        "scenarios": scenarios,
        "bare_http": bare,
        "ratio_to_bare": {
            name: round(result["requests_per_second"] / bare_rps, 3)
            for name, result in scenarios.items()
        },
        "targets": {"requests_per_second": 3000, "p99_ms_at_1000_per_second": 10},
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--pool", type=int, default=50, help="distinct uncached tokens")
    parser.add_argument("--uncached-rate", type=float, default=250.0)
    parser.add_argument("--quick", action="store_true", help="1-second runs, a smoke test")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.seconds, arguments.rate, arguments.pool = 1.0, 200.0, 5
        arguments.uncached_rate = 100.0
    print(orjson.dumps(asyncio.run(main(arguments)), option=orjson.OPT_INDENT_2).decode())
