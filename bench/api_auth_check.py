"""What the api's cached token check adds to a request.

Runs the real auth and api services in this process on SQLite and an embedded broker,
warms the cache, then times ``TokenGate.require`` (the check every route makes) over many
calls, for a key (cached introspection answer) and for an access token (verified locally).
It also times whole GET requests with and without a warm cache for context.

    python -m bench.api_auth_check [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import make_mocked_request

from bench._stack import in_process_stack
from services.api.context import CONTEXT
from services.shared import access_tokens


async def _time_calls(call: Any, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls


async def main(calls: int) -> dict[str, Any]:
    async with in_process_stack(
        with_dispatcher=False,
        access_token_private_key=access_tokens.generate_private_key_pem(),
        auth_cache_ttl_seconds=60,
    ) as stack:
        auth, api, team, key = stack.auth, stack.api, stack.team, stack.key
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
            key_seconds = statistics.median([await _time_calls(key_check, calls) for _ in range(3)])
            access_seconds = statistics.median(
                [await _time_calls(access_check, calls // 4) for _ in range(3)]
            )
            get_seconds = await _time_calls(request_with_key, 2000)
            health_seconds = await _time_calls(health, 2000)
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
