"""How long a change takes to reach the processes that act on it.

The spec gives every change to a key one second to take effect everywhere; webhook edits
the same for the dispatcher. Runs auth, the api and a dispatcher in this process on
SQLite and an embedded broker, with every fallback out of the way (the api's cache holds
answers for a minute and asks for ended keys once an hour; the dispatcher reloads its
table every minute), so only the change records can carry the change. Measures, each
many times:

- a key revoked through auth until the api refuses it (its cached answer dropped);
- a webhook deactivated through the api until the dispatcher's table has it inactive;
- a process's change follower, from its start until it has read the changes made since its
  moment (every service starts one, and the dispatcher routes nothing until it is done):
  with changes made just before, and on an empty topic (a new installation).

    python -m bench.changes [--samples 40]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from bench._stack import in_process_stack
from services.shared import ChangeFollower, Settings, ensure_topics, topic_layout, topics_for

_POLL_SECONDS = 0.002
_TARGET_MS = 1000.0


async def _until(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> float:
    """Seconds until ``check`` holds, polled every few milliseconds."""
    started = time.perf_counter()
    while not await check():
        if time.perf_counter() - started > within:
            raise TimeoutError("the change never arrived")
        await asyncio.sleep(_POLL_SECONDS)
    return time.perf_counter() - started


def _summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(ms * 1000 for ms in seconds)
    return {
        "p50_ms": round(ordered[len(ordered) // 2], 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 1),
        "max_ms": round(ordered[-1], 1),
    }


async def _follower_starts(settings: Settings, samples: int) -> list[float]:
    starts: list[float] = []
    for _ in range(samples):
        follower = ChangeFollower(settings, lambda change: None)
        began = time.perf_counter()
        await follower.start()
        caught_up = await follower.wait_caught_up(10)
        starts.append(time.perf_counter() - began)
        await follower.stop()
        assert caught_up, "the follower never caught up"
    return starts


async def main(samples: int) -> dict[str, Any]:
    revocations: list[float] = []
    deactivations: list[float] = []
    async with in_process_stack(
        with_dispatcher=True,
        auth_cache_ttl_seconds=60,
        ended_keys_sync_seconds=3600,
        allow_private_urls=True,
    ) as stack:
        auth, api, team, dispatcher = stack.auth, stack.api, stack.team, stack.dispatcher
        assert dispatcher is not None
        owner = {"authorization": f"Bearer {stack.key}"}
        webhooks = f"http://127.0.0.1:{api.port}/v1/teams/{team}/webhooks"
        async with aiohttp.ClientSession() as session:
            for n in range(samples):
                async with session.post(
                    f"http://127.0.0.1:{auth.port}/v1/tokens",
                    headers=owner,
                    json={"name": f"k{n}", "permissions": ["webhook:read"]},
                ) as response:
                    created = await response.json()
                doomed = {"authorization": f"Bearer {created['token']}"}
                async with session.get(webhooks, headers=doomed) as response:
                    assert response.status == 200, "the key works and its answer is cached"
                async with session.delete(
                    f"http://127.0.0.1:{auth.port}/v1/tokens/{created['id']}", headers=owner
                ) as response:
                    assert response.status == 204

                async def refused(headers: dict[str, str] = doomed) -> bool:
                    async with session.get(webhooks, headers=headers) as response:
                        return response.status == 401

                revocations.append(await _until(refused))

                async with session.post(
                    webhooks,
                    headers=owner,
                    json={
                        "name": f"w{n}",
                        "url": "http://127.0.0.1:9/hook",
                        "topics": ["object.created"],
                    },
                ) as response:
                    webhook_id = (await response.json())["id"]

                async def known(webhook_id: str = webhook_id) -> bool:
                    route = dispatcher.table.get(webhook_id)
                    return route is not None and route.active

                await _until(known)
                async with session.patch(
                    f"{webhooks}/{webhook_id}", headers=owner, json={"active": False}
                ) as response:
                    assert response.status == 200
                    # Timed from the answer: the change has committed by then.
                    answered = time.perf_counter()

                async def inactive(webhook_id: str = webhook_id) -> bool:
                    route = dispatcher.table.get(webhook_id)
                    return route is not None and not route.active

                await _until(inactive)
                deactivations.append(time.perf_counter() - answered)
        # With the changes just made less than its clock margin ago: they are read.
        starts = await _follower_starts(api.settings, samples)
        # A `changes` topic of its own, made empty (no client of ours has one made for it).
        bare = api.settings.model_copy(update={"topic_prefix": "empty."})
        changes = topics_for(bare).changes
        await ensure_topics(bare, {changes: topic_layout(bare)[changes]})
        empty = await _follower_starts(bare, samples)
    return {
        "benchmark": "changes",
        "samples": samples,
        "key_revoked_to_api_refusal": _summary(revocations),
        "webhook_deactivated_to_dispatcher_table": _summary(deactivations),
        "change_follower_start_to_caught_up": _summary(starts),
        "change_follower_start_to_caught_up_on_an_empty_topic": _summary(empty),
        "target_ms": _TARGET_MS,
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    result = asyncio.run(main(parser.parse_args().samples))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode(), file=sys.stdout)
