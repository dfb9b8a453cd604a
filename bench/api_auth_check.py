"""What the api's cached token check adds to a request.

Runs the real auth and api services in this process on SQLite and an embedded broker,
warms the cache, then times ``TokenGate.require`` (the check every route makes) over many
calls, for a key (cached introspection answer) and for an access token (verified locally).
It also times whole GET requests with and without a warm cache for context.

    python bench/api_auth_check.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import make_mocked_request

from services.api.app import ApiService
from services.api.context import CONTEXT
from services.auth.admin import add_member, create_team, create_token, create_user
from services.auth.app import AuthService
from services.shared import (
    PERMISSIONS,
    EmbeddedBroker,
    access_tokens,
    configure_logging,
    create_engine,
    ensure_topics,
    load_settings,
    migrate,
)


async def _time_calls(call: Any, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls


async def main(calls: int) -> dict[str, Any]:
    configure_logging("json", "warning")
    broker = EmbeddedBroker()
    broker.start()
    data_dir = tempfile.mkdtemp()
    try:
        await broker.wait_ready()
        settings = load_settings(
            database_url=f"sqlite+aiosqlite:///{data_dir}/bench.db",
            kafka_bootstrap=broker.bootstrap,
            api_port=0,
            auth_port=0,
            service_credential="bench",
            token_pepper="bench",
            access_token_private_key=access_tokens.generate_private_key_pem(),
            auth_cache_ttl_seconds=60,
            log_level="warning",
            log_format="json",
        )
        await migrate(settings.effective_database_url)
        await ensure_topics(settings)
        engine = create_engine(settings.effective_database_url)
        user = await create_user(engine, "bench@example.com", "Bench")
        team = await create_team(engine, "bench")
        await add_member(engine, user, team, "owner")
        _, key = await create_token(
            engine, pepper="bench", user_id=user, name="k", permissions=sorted(PERMISSIONS)
        )
        auth = AuthService(settings, engine)
        await auth.start()
        api = ApiService(
            settings.model_copy(update={"auth_url": f"http://127.0.0.1:{auth.port}"}), engine
        )
        await api.start()
        try:
            assert api.app is not None
            gate = api.app[CONTEXT].gate
            request = make_mocked_request("GET", f"/v1/teams/{team}/webhooks")
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"http://127.0.0.1:{auth.port}/v1/token-exchange",
                    headers={"authorization": f"Bearer {key}"},
                ) as response:
                    access = (await response.json())["access_token"]
                url = f"http://127.0.0.1:{api.port}/v1/teams/{team}/webhooks"

                async def key_check() -> None:
                    await gate.require(request, key, team, "webhook:read")

                async def access_check() -> None:
                    await gate.require(request, access, team, "webhook:read")

                async def request_with_key() -> None:
                    async with session.get(url, headers={"authorization": f"Bearer {key}"}) as r:
                        await r.read()

                async def health() -> None:
                    async with session.get(f"http://127.0.0.1:{api.port}/healthz") as r:
                        await r.read()

                await key_check()
                await access_check()
                key_seconds = statistics.median(
                    [await _time_calls(key_check, calls) for _ in range(3)]
                )
                access_seconds = statistics.median(
                    [await _time_calls(access_check, calls // 4) for _ in range(3)]
                )
                get_seconds = await _time_calls(request_with_key, 2000)
                health_seconds = await _time_calls(health, 2000)
        finally:
            await api.stop()
            await auth.stop()
            await engine.dispose()
    finally:
        broker.stop()
    return {
        "benchmark": "api_auth_check",
        "calls": calls,
        "cached_key_check_ms": round(key_seconds * 1000, 4),
        "access_token_check_ms": round(access_seconds * 1000, 4),
        "get_webhooks_request_ms": round(get_seconds * 1000, 3),
        "healthz_request_ms": round(health_seconds * 1000, 3),
        "target_cached_check_ms": 0.2,
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    result = asyncio.run(main(parser.parse_args().calls))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode(), file=sys.stdout)
