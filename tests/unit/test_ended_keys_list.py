"""The api's periodic list of ended keys from auth: a key a change record said ended
stays refused while the list may not show it yet (another auth process, its clock a
little behind, answers), and is let go once the list has left it out for longer than
that (reactivated, that change record lost)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from services.api import authn
from services.api.authn import TokenGate
from services.shared import Metrics
from tests.unit.test_sender import bound_port


@pytest.fixture
async def gate() -> AsyncIterator[TokenGate]:
    """A gate whose auth service lists no ended key."""

    async def ended_keys(request: web.Request) -> web.Response:
        return web.json_response({"token_ids": []})

    app = web.Application()
    app.router.add_get("/v1/ended-keys", ended_keys)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    async with aiohttp.ClientSession() as session:
        yield TokenGate(
            session,
            f"http://127.0.0.1:{bound_port(runner)}",
            "credential",
            30.0,
            Metrics("test_ended_keys_list"),
        )
    await runner.cleanup()


async def test_a_key_noted_ended_a_moment_ago_stays_refused(gate: TokenGate) -> None:
    gate.note_token_state("tok_1", "expired")
    await gate.sync_ended_keys()
    assert gate._is_ended("tok_1")


async def test_a_key_the_list_leaves_out_well_after_it_was_noted_is_let_go(
    gate: TokenGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate.note_token_state("tok_1", "inactive")
    monkeypatch.setattr(authn, "ENDED_SETTLE_SECONDS", 0.0)
    await gate.sync_ended_keys()
    assert not gate._is_ended("tok_1")
