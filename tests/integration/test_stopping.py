"""A stopping auth or api process keeps answering, unready, for the stop delay; then its
listener closes and the requests still in flight finish."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import pytest

from services.api.authn import TokenGate
from services.shared import Settings
from tests.conftest import pause_first_call, running_stack

# Long enough for the checks made within it on a busy machine.
_DELAY = 5.0


async def _get(session: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, str]:
    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
        await response.read()
        return response.status, response.headers.get("connection", "")


async def test_the_api_serves_through_the_delay_then_finishes_what_it_holds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_stack(
        settings.model_copy(update={"stop_delay_seconds": _DELAY}), with_dispatcher=False
    ) as stack:
        objects = f"{stack.api_url}/v1/teams/{stack.team_id}/objects/contact"
        held = pause_first_call(monkeypatch, TokenGate, "_introspect")
        in_flight = asyncio.create_task(_get(stack.session, objects, headers=stack.headers()))
        await asyncio.wait_for(held.read.wait(), 10)

        stopping = asyncio.create_task(stack.api.stop())
        await asyncio.sleep(0.2)
        # Within the delay: unready, yet still serving, and telling clients to reconnect
        # (to another process) after each answer.
        async with aiohttp.ClientSession() as fresh:
            ready, _ = await _get(fresh, f"{stack.api_url}/readyz")
            served, connection = await _get(fresh, objects, headers=stack.headers())
        assert ready == 503
        assert served == 200
        assert connection.lower() == "close"
        assert not stopping.done()

        # After the delay the listener is closed: new connections are refused ...
        await asyncio.sleep(_DELAY)
        async with aiohttp.ClientSession() as late:
            with pytest.raises(aiohttp.ClientConnectionError):
                await _get(late, f"{stack.api_url}/healthz")
        # ... while the request held since before the stop is still owed its answer.
        assert not in_flight.done()
        held.release.set()
        assert (await asyncio.wait_for(in_flight, 10))[0] == 200
        await asyncio.wait_for(stopping, 30)


async def test_auth_answers_unready_through_the_delay_then_closes(settings: Settings) -> None:
    async with running_stack(
        settings.model_copy(update={"stop_delay_seconds": _DELAY}), with_dispatcher=False
    ) as stack:
        stopping = asyncio.create_task(stack.auth.stop())
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as fresh:
            ready, _ = await _get(fresh, f"{stack.auth_url}/readyz")
            fresh_stack = dataclasses.replace(stack, session=fresh)
            answer = await fresh_stack.introspect(stack.token)
        assert ready == 503
        assert answer["active"] is True
        assert not stopping.done()
        await asyncio.wait_for(stopping, 30)
        async with aiohttp.ClientSession() as late:
            with pytest.raises(aiohttp.ClientConnectionError):
                await _get(late, f"{stack.auth_url}/healthz")
