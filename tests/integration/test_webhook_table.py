"""The dispatcher's webhook table: it keeps taking changes when a database read hangs, and
a secret it cannot read costs that secret, never the webhook's deliveries."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from sqlalchemy import select, update

from services.dispatcher import table as table_module
from services.dispatcher.signing import secret_key
from services.shared import tables, utcnow
from tests.conftest import Receiver, Stack
from tests.integration.test_end_to_end import standard_webhooks_verify
from tests.integration.test_retries import _webhook_call

# Not base64 of anything: what a hand edit or an older release may have left in a row.
_UNDECODABLE = "whsec_abc"


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
    await _deactivate(stack, webhook["id"])
    deadline = asyncio.get_running_loop().time() + 10
    while table.get(webhook["id"]).active:  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() < deadline, "the change never applied"
        await asyncio.sleep(0.05)


async def _deactivate(stack: Stack, webhook_id: str) -> None:
    """Through the api, as a user would: the change record follows."""
    status, answer = await _webhook_call(stack, "PATCH", webhook_id, {"active": False})
    assert status == 200, answer


async def _hand_write_secrets(stack: Stack, webhook_id: str, secrets: list[str]) -> None:
    """Store these secrets (all in force) behind the api's back and have the table re-read."""
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            update(tables.webhooks)
            .where(tables.webhooks.c.id == webhook_id)
            .values(secrets=[{"secret": secret, "expires_at": None} for secret in secrets])
        )
    await stack.dispatcher.table.refresh(webhook_id)


async def test_an_undecodable_secret_is_skipped_and_the_others_still_sign(
    stack: Stack, receiver: Receiver
) -> None:
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    with structlog.testing.capture_logs() as logs:
        await _hand_write_secrets(stack, webhook["id"], [_UNDECODABLE, webhook["secret"]])
    route = stack.dispatcher.table.get(webhook["id"])
    assert route is not None
    assert route.active
    assert route.signing_keys_at(utcnow()) == (secret_key(webhook["secret"]),)
    [logged] = [entry for entry in logs if entry["event"] == "webhook_secret_invalid"]
    assert (logged["webhook_id"], logged["skipped"]) == (webhook["id"], 1)
    assert _UNDECODABLE not in repr(logged)

    await stack.create_object()
    [delivery] = await receiver.wait_for(1)
    assert len(delivery.headers["webhook-signature"].split()) == 1
    assert standard_webhooks_verify(webhook["secret"], delivery.headers, delivery.body)


async def test_a_webhook_left_with_no_readable_secret_fails_as_unsigned(
    stack: Stack, receiver: Receiver
) -> None:
    """Still routed, so its events leave failed attempts to see and retry, not nothing."""
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    await _hand_write_secrets(stack, webhook["id"], [_UNDECODABLE])
    route = stack.dispatcher.table.get(webhook["id"])
    assert route is not None
    assert route.active
    assert route.signing_keys == ()

    await stack.create_object()
    attempts = tables.delivery_attempts
    deliveries = tables.deliveries
    query = (
        select(attempts.c.outcome, attempts.c.error_class)
        .join(deliveries, deliveries.c.id == attempts.c.delivery_id)
        .where(deliveries.c.webhook_id == webhook["id"])
    )
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with stack.api.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if rows:
            break
        assert asyncio.get_running_loop().time() < deadline, "no attempt was ever recorded"
        await asyncio.sleep(0.05)
    assert {tuple(row) for row in rows} == {("failed", "unsigned")}
    assert receiver.received == []


async def test_a_change_read_while_a_whole_load_reads_applies_at_once_and_stays(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole load reads outside the table's lock: a webhook deactivated while the load's
    read is still on its way takes effect at once (it waited for the whole load, seconds
    at a hundred thousand webhooks), and the load, which read it active, does not bring it
    back."""
    webhook = await stack.create_webhook(receiver.url)
    table = stack.dispatcher.table
    real_read_all = table._read_all
    read, release, loaded = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def read_then_wait() -> list[Any]:
        rows = await real_read_all()
        read.set()
        await release.wait()
        return rows

    async def load() -> None:
        await table.load_all()
        loaded.set()

    monkeypatch.setattr(table, "_read_all", read_then_wait)
    loading = asyncio.create_task(load())
    await asyncio.wait_for(read.wait(), 10)
    await _deactivate(stack, webhook["id"])
    deadline = asyncio.get_running_loop().time() + 5
    while table.get(webhook["id"]).active:  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() < deadline, "the change waited for the load"
        await asyncio.sleep(0.05)
    assert not loaded.is_set()
    release.set()
    await asyncio.wait_for(loading, 10)
    route = table.get(webhook["id"])
    assert route is not None
    assert not route.active
    assert route.id not in {r.id for r in table.for_team(stack.team_id)}


async def test_a_whole_load_builds_again_only_the_rows_that_changed(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding every secret of every webhook at each load held the loop for seconds at a
    hundred thousand webhooks: an unchanged row keeps its route."""
    hooks = [await stack.create_webhook(f"{receiver.url}/{n}") for n in range(3)]
    table = stack.dispatcher.table
    await table.load_all()
    built: list[str] = []
    real = table_module._route_from_row

    def counted(row: Any) -> Any:
        built.append(row.id)
        return real(row)

    monkeypatch.setattr(table_module, "_route_from_row", counted)
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            update(tables.webhooks)
            .where(tables.webhooks.c.id == hooks[1]["id"])
            .values(url=f"{receiver.url}/moved")
        )
    await table.load_all()
    assert built == [hooks[1]["id"]]
    assert table.get(hooks[1]["id"]).url == f"{receiver.url}/moved"  # type: ignore[union-attr]
    assert table.get(hooks[0]["id"]) is not None
    assert table.get(hooks[2]["id"]) is not None
    await table.load_all()
    assert built == [hooks[1]["id"]]


async def test_a_failed_re_read_during_a_whole_load_leaves_the_loads_row(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change record's re-read fails while a whole load reads, and the load read after
    the change: the load's row stands (it was thrown away for the table's older one)."""
    webhook = await stack.create_webhook(receiver.url)
    table = stack.dispatcher.table
    real_read_all = table._read_all
    release, refresh_failed = asyncio.Event(), asyncio.Event()

    async def read_when_released() -> list[Any]:
        await release.wait()  # the change has committed by then
        return await real_read_all()

    async def failing_read_some(webhook_ids: Any) -> list[Any]:
        refresh_failed.set()
        raise TimeoutError("the database is slow")

    monkeypatch.setattr(table, "_read_all", read_when_released)
    monkeypatch.setattr(table, "_read_some", failing_read_some)
    loading = asyncio.create_task(table.load_all())
    await _deactivate(stack, webhook["id"])
    await asyncio.wait_for(refresh_failed.wait(), 10)
    release.set()
    await asyncio.wait_for(loading, 10)
    route = table.get(webhook["id"])
    assert route is not None
    assert not route.active
