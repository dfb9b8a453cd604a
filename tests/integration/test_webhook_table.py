"""The dispatcher's webhook table keeps taking changes when a database read hangs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.dispatcher import table as table_module
from tests.conftest import Receiver, Stack


async def test_a_hung_whole_load_does_not_hold_back_the_changes_behind_it(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(table_module, "_READ_ALL_AT_MOST_SECONDS", 1.0)
    webhook = await stack.create_webhook(receiver.url)
    table = stack.dispatcher.table
    real_read_all = table._read_all
    hung = asyncio.Event()

    async def silent_once() -> list[Any]:
        if not hung.is_set():
            hung.set()
            await asyncio.sleep(3600)  # a database that never answers
        return await real_read_all()

    monkeypatch.setattr(table, "_read_all", silent_once)
    stack.dispatcher._resync_wanted.set()
    await asyncio.wait_for(hung.wait(), 10)
    async with stack.session.patch(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook['id']}",
        headers=stack.headers(),
        json={"active": False},
    ) as response:
        assert response.status == 200
    deadline = asyncio.get_running_loop().time() + 10
    while table.get(webhook["id"]).active:  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() < deadline, "the change never applied"
        await asyncio.sleep(0.05)
