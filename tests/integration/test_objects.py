"""Objects: every change publishes its event through the outbox, and only then succeeds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest
import structlog
from aiokafka.errors import KafkaConnectionError
from multidict import CIMultiDict
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.api import object_store
from services.api import outbox as outbox_module
from services.api.context import CONTEXT
from services.api.errors import PublishOutcomeUnknown
from services.api.outbox import Outbox
from services.shared import (
    MAX_EVENT_BYTES,
    EmbeddedBroker,
    Event,
    Metrics,
    Settings,
    cancel_and_wait,
    create_engine,
    ensure_topics,
    free_port,
    make_consumer,
    new_id,
    tables,
    topics_for,
    utcnow,
)
from tests.conftest import (
    Receiver,
    Stack,
    dead_letters,
    fail_nth_call,
    pause_first_call,
    published_events,
    records_in,
    stack_on_own_broker,
    topic_records,
)
from tests.samples import sample_event


async def _call(
    stack: Stack, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, Any, Any]:
    async with stack.session.request(
        method,
        f"{stack.api_url}/v1/teams/{stack.team_id}/objects{path}",
        headers={**stack.headers(), **(headers or {})},
        **kwargs,
    ) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers


async def test_object_lifecycle_publishes_each_event(stack: Stack, receiver: Receiver) -> None:
    """create, update (with previous values), delete to trash, restore, send, force-delete."""
    await stack.subscribe(receiver.url)
    status, created, headers = await _call(
        stack, "POST", "/contact", json={"email": "a@example.com", "name": "Ada"}
    )
    assert (status, headers["ETag"]) == (201, '"1"')
    path = f"/contact/{created['id']}"
    status, updated, headers = await _call(
        stack,
        "PATCH",
        path,
        headers={"If-Match": '"1"'},
        json={"name": "Ada Lovelace", "email": None, "plan": "pro"},
    )
    assert (status, headers["ETag"]) == (200, '"2"')
    assert updated["data"] == {"name": "Ada Lovelace", "plan": "pro"}
    assert (await _call(stack, "DELETE", path))[0] == 204
    assert (await _call(stack, "GET", path))[0] == 404
    _, trash, _ = await _call(stack, "GET", "/contact?trashed=true")
    assert [o["id"] for o in trash["data"]] == [created["id"]]
    assert (await _call(stack, "POST", f"{path}/restore"))[0] == 200
    status, sent, _ = await _call(
        stack, "POST", f"{path}/send", json={"to": "crm@example.com", "channel": "email"}
    )
    assert status == 202
    assert (await _call(stack, "DELETE", f"{path}?force=true"))[0] == 204
    assert (await _call(stack, "GET", path))[0] == 404

    events = [orjson.loads(r.body) for r in await receiver.wait_for(6)]
    assert [e["type"] for e in events] == [
        "object.created",
        "object.updated",
        "object.deleted",
        "object.created",
        "object.send",
        "object.deleted",
    ]
    assert events[0]["id"] == created["event_id"]
    assert events[1]["previous"] == {"name": "Ada", "email": "a@example.com", "plan": None}
    assert events[1]["data"] == {"name": "Ada Lovelace", "plan": "pro"}
    assert events[4]["sent"] == {"to": "crm@example.com", "channel": "email"}
    assert events[4]["id"] == sent["event_id"]
    assert all(e["object_id"] == created["id"] for e in events)
    assert "previous" not in events[0]
    # Created 1, updated 2, trashed 3, restored 4; sent at 4; deleted for good after it.
    assert [e["version"] for e in events] == [1, 2, 3, 4, 4, 5]


async def test_stale_if_match_and_no_op_patches_publish_nothing(
    stack: Stack, receiver: Receiver
) -> None:
    """A stale ETag gets 412 and changes nothing; a patch that changes nothing is silent."""
    await stack.subscribe(receiver.url)
    _, created, _ = await _call(stack, "POST", "/deal", json={"amount": 10})
    path = f"/deal/{created['id']}"
    assert (await _call(stack, "PATCH", path, json={"amount": 20}))[0] == 200
    status, body, _ = await _call(
        stack, "PATCH", path, headers={"If-Match": '"1"'}, json={"amount": 30}
    )
    assert (status, body["error"]["code"]) == (412, "precondition_failed")
    assert body["error"]["details"] == {"current_etag": '"2"'}
    # A weak tag never matches (If-Match compares strongly); a list matches when one does.
    status, weak, _ = await _call(stack, "PATCH", path, headers={"If-Match": 'W/"2"'}, json={})
    assert (status, weak["error"]["message"]) == (
        412,
        "If-Match takes the ETag as given: a weak tag (W/...) never matches",
    )
    status, same, headers = await _call(
        stack, "PATCH", path, headers={"If-Match": '"1", "2"'}, json={"amount": 20}
    )
    assert (status, headers["ETag"], same["data"]) == (200, '"2"', {"amount": 20})
    _, current, _ = await _call(stack, "GET", path)
    assert current["data"] == {"amount": 20}
    # Counted before each answer went out: an event the 412s or the no-op had published
    # would be here already, whereas the router could still be on its way to it.
    assert published_events(stack) == {"object.created": 1.0, "object.updated": 1.0}
    await receiver.wait_for(2)


async def test_if_match_lines_form_one_list_and_a_value_that_is_no_tag_is_a_422(
    api_stack: Stack,
) -> None:
    """Two `If-Match` lines are one list (RFC 9110): the first line alone answered 412
    for a tag on the second. A value that is no entity tag (`garbage`, empty) is the
    client's mistake, not a change since its read: 422 naming the header."""
    _, created, _ = await _call(api_stack, "POST", "/deal", json={"amount": 10})
    path = f"/deal/{created['id']}"
    two_lines = CIMultiDict(api_stack.headers())
    two_lines.add("If-Match", '"7"')
    two_lines.add("If-Match", '"1"')
    async with api_stack.session.patch(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/objects{path}",
        headers=two_lines,
        json={"amount": 11},
    ) as response:
        assert response.status == 200, await response.text()
    for bad in ("garbage", "", '"2", 3'):
        status, body, _ = await _call(
            api_stack, "PATCH", path, headers={"If-Match": bad}, json={"amount": 12}
        )
        assert status == 422, (bad, body)
        assert body["error"]["details"][0]["field"] == "If-Match"
    assert (await _call(api_stack, "GET", path))[1]["data"] == {"amount": 11}


async def test_a_delete_with_a_stale_if_match_deletes_nothing(api_stack: Stack) -> None:
    """A conditional delete was done unconditionally: an object changed since the
    client's read went to the trash. 412, and it stays; the current tag deletes it."""
    _, created, _ = await _call(api_stack, "POST", "/deal", json={"amount": 10})
    path = f"/deal/{created['id']}"
    assert (await _call(api_stack, "PATCH", path, json={"amount": 20}))[0] == 200
    status, body, _ = await _call(api_stack, "DELETE", path, headers={"If-Match": '"1"'})
    assert (status, body["error"]["code"]) == (412, "precondition_failed")
    assert (await _call(api_stack, "GET", path))[0] == 200
    status, _, _ = await _call(api_stack, "DELETE", path, headers={"If-Match": '"2"'})
    assert status == 204
    assert (await _call(api_stack, "GET", path))[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("PATCH", "/contact/{id}", [1], 422, "body"),
        ("PATCH", "/contact/{id}", "x", 422, "body"),
        # Raw bytes: sent as they are, not as JSON.
        ("POST", "/contact", b"", 422, "body"),
        ("POST", "/contact", b"{", 422, "body"),
        ("PATCH", "/contact/{id}", b"", 422, "body"),
        ("PATCH", "/contact/{id}", b"{", 422, "body"),
        ("POST", "/contact/{id}/send", b"", 422, "body"),
        ("POST", "/contact/{id}/send", b"{", 422, "body"),
        ("POST", "/contact/{id}/send", {}, 422, "to"),
        ("POST", "/contact/{id}/send", {"to": "a", "cc": "b"}, 422, "cc"),
        ("POST", "/contact/{id}/send", {"to": 5}, 422, "to"),
        ("POST", "/contact/{id}/send", {"to": ""}, 422, "to"),
        ("POST", "/contact/{id}/send", {"to": "a" * 321}, 422, "to"),
        ("POST", "/contact/{id}/send", {"to": "a", "channel": ""}, 422, "channel"),
        ("POST", "/contact/{id}/send", {"to": "a", "channel": "c" * 33}, 422, "channel"),
        ("POST", "/contact/{id}/send", {"to": "a", "subject": "s" * 501}, 422, "subject"),
        ("POST", "/contact/{id}/send", {"to": "a", "subject": 1}, 422, "subject"),
        ("POST", "/contact/{id}/send", {"to": "a", "message": "m" * 10_001}, 422, "message"),
        ("POST", "/contact/{id}/send", [{"to": "a"}], 422, "body"),
        ("PATCH", "/contact/obj_missing", {"a": 1}, 404, None),
        ("POST", "/contact/{id}/restore", None, 404, None),
        ("GET", "/contact?limit=0", None, 422, "limit"),
        ("GET", "/contact?limit=5.0", None, 422, "limit"),
        ("GET", "/contact?limit=%2B5", None, 422, "limit"),
        ("GET", "/contact?limit=lots", None, 422, "limit"),
        ("GET", "/contact?cursor=" + "c" * 65, None, 422, "cursor"),
        # A misspelt filter must not quietly list everything.
        ("GET", "/contact?colour=red", None, 422, "colour"),
        ("GET", "/contact?trashed=1", None, 422, "trashed"),
        ("GET", "/Contact/{id}", None, 422, "object_type"),
    ],
)
async def test_bad_object_requests(
    api_stack: Stack, method: str, path: str, body: Any, status: int, field: str | None
) -> None:
    """Wrong bodies, missing objects and bad parameters are refused; nothing changes,
    nothing is stored and no event is published."""
    _, created, _ = await _call(api_stack, "POST", "/contact", json={"a": 1})
    sent = {"data": body} if isinstance(body, bytes) else {"json": body}
    headers = {"content-type": "application/json"} if isinstance(body, bytes) else None
    got, answer, _ = await _call(
        api_stack, method, path.format(id=created["id"]), headers=headers, **sent
    )
    assert got == status, answer
    if field is not None:
        assert field in [d["field"] for d in answer["error"]["details"]]
    _, current, _ = await _call(api_stack, "GET", f"/contact/{created['id']}")
    assert current["data"] == {"a": 1}
    assert current["version"] == 1
    assert await _object_count(api_stack) == 1
    assert published_events(api_stack) == {"object.created": 1.0}


async def test_force_delete_needs_its_own_permission(api_stack: Stack) -> None:
    """object:delete moves to the trash; deleting for good needs object:force-delete."""
    limited = await api_stack.new_token(["object:create", "object:read", "object:delete"])
    _, created, _ = await _call(api_stack, "POST", "/contact", json={"a": 1})
    auth = {"authorization": f"Bearer {limited}"}
    path = f"/contact/{created['id']}"
    assert (await _call(api_stack, "DELETE", f"{path}?force=true", headers=auth))[0] == 403
    assert (await _call(api_stack, "DELETE", path, headers=auth))[0] == 204


async def test_a_force_delete_of_an_object_neither_live_nor_trashed_is_plainly_not_found(
    api_stack: Stack,
) -> None:
    """?force=true takes a live object or one in the trash; in neither (deleted for good
    already, or never made) it is "not found", not "not found in the trash". A restore
    looks only in the trash, and says so."""
    _, created, _ = await _call(api_stack, "POST", "/contact", json={"a": 1})
    for trashed_first in (False, True):
        if trashed_first:
            _, created, _ = await _call(api_stack, "POST", "/contact", json={"a": 2})
            assert (await _call(api_stack, "DELETE", f"/contact/{created['id']}"))[0] == 204
        path = f"/contact/{created['id']}?force=true"
        assert (await _call(api_stack, "DELETE", path))[0] == 204
        for object_id in (created["id"], "obj_nope"):
            status, body, _ = await _call(api_stack, "DELETE", f"/contact/{object_id}?force=true")
            assert (status, body["error"]["message"]) == (404, f"contact {object_id} not found")
    status, body, _ = await _call(api_stack, "POST", "/contact/obj_nope/restore")
    assert (status, body["error"]["message"]) == (404, "contact obj_nope not found in the trash")


@pytest.fixture
async def own_broker_stack(settings: Settings) -> AsyncIterator[tuple[Stack, EmbeddedBroker]]:
    """A stack on a broker of its own, which the test may kill."""
    async with stack_on_own_broker(settings, publish_timeout_seconds=2.0) as running:
        yield running


async def _object_count(stack: Stack) -> int:
    async with stack.api.engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(tables.objects))).scalar()
    return int(count or 0)


async def test_kafka_down_means_503_and_nothing_written(
    own_broker_stack: tuple[Stack, EmbeddedBroker],
) -> None:
    """With the broker gone, changes answer 503 with Retry-After and are undone."""
    stack, broker = own_broker_stack
    _, created, _ = await _call(stack, "POST", "/contact", json={"v": 1})
    broker.stop()
    started = time.monotonic()
    status, body, headers = await _call(stack, "POST", "/contact", json={"v": 2})
    assert (status, body["error"]["code"]) == (503, "publish_unavailable")
    assert headers["Retry-After"] == "5", "a broker down is seldom back within a second"
    # The client learns what is unavailable, not the broker's address or the library's
    # words (they are in the log line).
    assert body["error"]["message"] == "event stream is unavailable", body
    assert time.monotonic() - started < 10
    status, _, _ = await _call(stack, "PATCH", f"/contact/{created['id']}", json={"v": 3})
    assert status == 503
    # A refused send is not left for the relay: the caller's retry would be a second send.
    status, body, _ = await _call(
        stack, "POST", f"/contact/{created['id']}/send", json={"to": "crm@example.com"}
    )
    assert (status, body["error"]["code"]) == (503, "publish_unavailable")
    assert "will be published" not in body["error"]["message"]
    assert await _object_count(stack) == 1
    failures = stack.api.metrics.registry.get_sample_value("hookwire_api_publish_failures_total")
    assert failures == 3
    _, current, _ = await _call(stack, "GET", f"/contact/{created['id']}")
    assert (current["data"], current["version"]) == ({"v": 1}, 1)
    async with stack.api.engine.connect() as conn:
        staged = (await conn.execute(select(func.count()).select_from(tables.outbox))).scalar()
    assert staged == 0


async def _second_version(
    stack: Stack, object_id: str, data: dict[str, Any]
) -> tuple[
    Any,
    Event,
    Callable[[AsyncConnection], Awaitable[None]],
    Callable[[AsyncConnection], Awaitable[bool]],
]:
    """A contact at version 1, and what the api's PATCH would hand the outbox to make it
    version 2 with ``data``: the row as read, the event, the change and its undo."""
    async with stack.api.engine.connect() as conn:
        row = await object_store.find(conn, stack.team_id, "contact", object_id)
    event = sample_event(
        id=new_id("evt"), type="object.updated", team_id=stack.team_id, object_id=row.id, data=data
    )

    async def change(conn: AsyncConnection) -> None:
        fields = object_store.now_fields(event.occurred_at, 2)
        assert await object_store.set_fields(conn, row.id, 1, data=data, **fields)

    async def undo(conn: AsyncConnection) -> bool:
        return await object_store.revert(conn, row, 2)

    return row, event, change, undo


async def test_a_refused_change_with_a_later_change_on_top_is_kept_for_the_relay(
    own_broker_stack: tuple[Stack, EmbeddedBroker],
) -> None:
    """Request A's publish fails after request B changed the object again: undoing A
    would lose B, so both stay, A's event is left staged for the relay, and A's caller
    gets A's answer (a 503 would have it make the change again)."""
    stack, broker = own_broker_stack
    _, created, _ = await _call(stack, "POST", "/contact", json={"v": 1})
    outbox = stack.api.outbox_for(stack.api._producer)  # type: ignore[arg-type]
    row, event, change, undo = await _second_version(stack, created["id"], {"v": "A"})

    broker.stop()
    request_a = asyncio.create_task(
        outbox.commit_and_publish(change, undo, "events", row.id, event)
    )
    async with asyncio.timeout(10):
        while True:
            if (await _call(stack, "GET", f"/contact/{row.id}"))[1]["version"] == 2:
                break
            await asyncio.sleep(0.02)
    async with stack.api.engine.begin() as conn:
        fields = object_store.now_fields(utcnow(), 3)
        assert await object_store.set_fields(conn, row.id, 2, data={"v": "B"}, **fields)
    await request_a  # answered as made: a retry would repeat the change
    _, current, _ = await _call(stack, "GET", f"/contact/{row.id}")
    assert (current["data"], current["version"]) == ({"v": "B"}, 3)
    assert await outbox.backlog() == 1, "A's event waits for the relay"


async def test_the_relay_publishes_what_a_crashed_request_left(
    stack: Stack, receiver: Receiver
) -> None:
    """A committed change whose request died before publishing still gets its event."""
    await stack.subscribe(receiver.url)
    ctx_outbox = stack.api.outbox_for(stack.api._producer)  # type: ignore[arg-type]
    event = sample_event(
        id=new_id("evt"), team_id=stack.team_id, object_id="obj_orphan", data={"from": "a crash"}
    )
    async with stack.api.engine.begin() as conn:
        row_id = await ctx_outbox.stage(conn, stack.dispatcher.topics.events, "k", event)
        await conn.execute(
            tables.outbox.update()
            .where(tables.outbox.c.id == row_id)
            .values(created_at=utcnow() - ctx_outbox.relay_after * 2)
        )
    backlog, age = await ctx_outbox._backlog_and_age()
    assert backlog == 1
    assert age >= (ctx_outbox.relay_after * 2).total_seconds()
    assert await ctx_outbox.relay_once() == 1
    assert await ctx_outbox.relay_once() == 0
    registry = stack.api.metrics.registry
    assert registry.get_sample_value("hookwire_api_events_relayed_total") == 1
    assert await ctx_outbox._backlog_and_age() == (0, 0.0)
    [delivery] = await receiver.wait_for(1)
    assert orjson.loads(delivery.body)["id"] == event.id
    await asyncio.sleep(0)


@pytest.fixture
async def relay_stack(api_stack: Stack) -> tuple[Stack, Outbox, str]:
    """The stack's outbox, with the stack's own relay loop stopped (it would take rows
    from under the test every 5 s), and a topic of the test's own."""
    await cancel_and_wait(api_stack.api._relay)
    topic = f"{api_stack.settings.topic_prefix}relayed"
    await ensure_topics(api_stack.settings, {topic: 3})
    return api_stack, api_stack.api.outbox_for(api_stack.api._producer), topic  # type: ignore[arg-type]


async def _left_behind(
    stack: Stack, outbox: Outbox, topic: str, count: int, objects: list[str] | None = None
) -> list[str]:
    """Stage ``count`` events as requests that died before publishing would have, each
    for an object of its own unless ``objects`` names them (the key is the object)."""
    long_ago = utcnow() - outbox.relay_after * 2
    ids = []
    async with stack.api.engine.begin() as conn:
        for n in range(count):
            object_id = objects[n] if objects else f"obj_left_{n}"
            event = sample_event(
                id=new_id("evt"), team_id=stack.team_id, object_id=object_id, data={"n": n}
            )
            row_id = await outbox.stage(conn, topic, event.object_id, event)
            await conn.execute(
                tables.outbox.update()
                .where(tables.outbox.c.id == row_id)
                .values(created_at=long_ago + timedelta(milliseconds=n))
            )
            ids.append(event.id)
    return ids


@contextlib.asynccontextmanager
async def _second_process_outbox(stack: Stack) -> AsyncIterator[Outbox]:
    """Another api process's outbox: its own connections to the same database."""
    assert stack.api._producer is not None
    engine = create_engine(stack.settings.database_url)
    try:
        yield Outbox(
            engine,
            stack.api._producer,
            Metrics("test"),
            stack.settings.publish_timeout_seconds,
            dead_letter_topic=topics_for(stack.settings).dead_letter,
        )
    finally:
        await engine.dispose()


async def _relayed_once(stack: Stack, topic: str, ids: list[str]) -> None:
    assert await records_in(stack.settings, topic) == len(ids)
    relayed = await topic_records(stack.settings, topic, len(ids))
    assert sorted(record["id"] for record in relayed) == sorted(ids)


async def test_two_api_processes_relay_each_record_left_behind_once(
    relay_stack: tuple[Stack, Outbox, str],
) -> None:
    """Every api process runs a relay over the same table: each row goes out once, and a
    backlog larger than one round is shared (500 rows a round)."""
    stack, first, topic = relay_stack
    ids = await _left_behind(stack, first, topic, 600)
    async with _second_process_outbox(stack) as second:
        counts = await asyncio.gather(first.relay_once(), second.relay_once())
    # A round takes at most 500; concurrent rounds on PostgreSQL may split them otherwise.
    assert sum(counts) == 600
    assert min(counts) >= 100
    assert await first.backlog() == 0
    await _relayed_once(stack, topic, ids)


async def test_a_relay_claiming_while_another_commits_its_claim_takes_none_of_it(
    relay_stack: tuple[Stack, Outbox, str],
) -> None:
    """Relay B's claim starts while relay A's claim of the same rows is not yet committed:
    B takes none of them (PostgreSQL passes over rows locked by A's claim; SQLite makes B
    wait for A's write and then finds them claimed)."""
    stack, outbox, topic = relay_stack
    await _left_behind(stack, outbox, topic, 5)
    async with _second_process_outbox(stack) as other, other._engine.connect() as conn:
        claiming = await conn.begin()
        await conn.execute(
            tables.outbox.update().values(
                claimed_by="rly_a", claimed_until=utcnow() + timedelta(minutes=1)
            )
        )
        second = asyncio.create_task(outbox._claim())
        await asyncio.sleep(0.5)
        await claiming.commit()
        _, _, rows = await second
    assert rows == []
    assert await outbox.relay_once() == 0


async def test_rows_a_dead_relay_claimed_are_relayed_once_its_claim_ends(
    relay_stack: tuple[Stack, Outbox, str],
) -> None:
    """A process that died after claiming rows holds them only until its claim runs out."""
    stack, outbox, topic = relay_stack
    ids = await _left_behind(stack, outbox, topic, 3)
    async with _second_process_outbox(stack) as dead:
        assert len((await dead._claim())[2]) == 3
    assert await outbox.relay_once() == 0, "claimed by the other process"
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            tables.outbox.update().values(claimed_until=utcnow() - timedelta(seconds=1))
        )
    assert await outbox.relay_once() == 3
    await _relayed_once(stack, topic, ids)


async def test_a_record_the_stream_refuses_holds_back_only_its_key(
    relay_stack: tuple[Stack, Outbox, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose partition is away (its leader down) keeps the later records of its
    key back, in their order, for a claim's length, here and in another process; the
    other keys' records go on rather than wait behind it."""
    stack, outbox, topic = relay_stack
    ids = await _left_behind(stack, outbox, topic, 4, objects=["a", "b", "b", "c"])
    producer = stack.api._producer
    assert producer is not None
    sends = fail_nth_call(
        monkeypatch,
        producer,
        "send_and_wait",
        2,
        KafkaConnectionError("the partition's leader went away"),
    )
    assert await outbox.relay_once() == 2  # "a" and "c"; the second "b" waits for the first
    assert sends.count == 3
    # The failed send may have written its record: its request must not undo the change.
    async with stack.api.engine.connect() as conn:
        failed = (
            await conn.execute(
                select(tables.outbox.c.id).order_by(tables.outbox.c.created_at).limit(1)
            )
        ).scalar_one()
    assert not await outbox._undone(failed, _never_undone)
    async with _second_process_outbox(stack) as other:
        assert await other.relay_once() == 0, "the failed one and the one behind it wait"
        await _hold_ends(stack)
        assert await other.relay_once() == 2
    await _relayed_once(stack, topic, ids)
    relayed = await topic_records(stack.settings, topic, 4)
    assert [r["id"] for r in relayed if r["object_id"] == "b"] == ids[1:3], "in their order"


async def test_a_round_stops_once_the_stream_seems_away(
    relay_stack: tuple[Stack, Outbox, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three failed sends in a row: the stream is away, not one partition, and the round
    does not wait out a send for every key left."""
    stack, outbox, topic = relay_stack
    await _left_behind(stack, outbox, topic, 6)
    producer = stack.api._producer
    assert producer is not None
    calls = 0

    async def away(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise KafkaConnectionError("the broker went away")

    monkeypatch.setattr(producer, "send_and_wait", away)
    assert await outbox.relay_once() == 0
    assert calls == 3
    assert await outbox.backlog() == 6


async def test_a_send_hanging_past_the_publish_wait_ends_the_round(
    relay_stack: tuple[Stack, Outbox, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer's own waits (metadata, retries) can outlast a publish wait; the relay
    stops waiting then, so its claim's time check holds, and frees the rows."""
    stack, outbox, topic = relay_stack
    ids = await _left_behind(stack, outbox, topic, 2)
    outbox._wait = 0.3
    producer = stack.api._producer
    assert producer is not None
    send = producer.send_and_wait

    async def hangs(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(60)

    monkeypatch.setattr(producer, "send_and_wait", hangs)
    async with asyncio.timeout(5):
        assert await outbox.relay_once() == 0
    monkeypatch.setattr(producer, "send_and_wait", send)
    await _hold_ends(stack)
    async with _second_process_outbox(stack) as other:
        assert await other.relay_once() == 2
    await _relayed_once(stack, topic, ids)


async def _hold_ends(stack: Stack) -> None:
    """Records held back after a failed send are free again (their hold has run out)."""
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            tables.outbox.update()
            .where(tables.outbox.c.claimed_until.is_not(None))
            .values(claimed_until=utcnow() - timedelta(seconds=1))
        )


async def test_records_failing_at_the_head_of_the_outbox_do_not_hold_back_the_rest(
    relay_stack: tuple[Stack, Outbox, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three records whose topic is away (an audit topic missing, say) end a round; held
    back a while, they do not end the next one too before the events behind them go."""
    stack, outbox, topic = relay_stack
    away = f"{topic}-away"
    await _left_behind(stack, outbox, away, 3)
    ids = await _left_behind(stack, outbox, topic, 5, objects=[f"obj_{n}" for n in range(5)])
    async with stack.api.engine.begin() as conn:
        # Behind the three that fail.
        await conn.execute(
            tables.outbox.update()
            .where(tables.outbox.c.topic == topic)
            .values(created_at=utcnow() - outbox.relay_after - timedelta(seconds=1))
        )
    producer = stack.api._producer
    assert producer is not None
    send = producer.send_and_wait

    async def topic_away(topic_name: str, *args: Any, **kwargs: Any) -> Any:
        if topic_name == away:
            raise KafkaConnectionError("the topic's leader is away")
        return await send(topic_name, *args, **kwargs)

    monkeypatch.setattr(producer, "send_and_wait", topic_away)
    assert await outbox.relay_once() == 0, "three failures in a row end the round"
    assert await outbox.relay_once() == 5
    await _relayed_once(stack, topic, ids)
    assert await outbox.backlog() == 3, "kept, for a later round"


async def _claim_the_first_record_elsewhere(conn: AsyncConnection) -> None:
    """Relay A's claim that ended at the outbox's first record (its batch's last)."""
    first = (
        await conn.execute(select(tables.outbox.c.id).order_by(tables.outbox.c.created_at).limit(1))
    ).scalar_one()
    await conn.execute(
        tables.outbox.update()
        .where(tables.outbox.c.id == first)
        .values(claimed_by="rly_a", claimed_until=utcnow() + timedelta(minutes=1))
    )


async def test_a_relay_leaves_a_key_alone_while_another_holds_its_earlier_record(
    relay_stack: tuple[Stack, Outbox, str],
) -> None:
    """Relay A's claim took an object's first record (its batch ended there); relay B's
    round must not send that object's next record ahead of it, and sends the others."""
    stack, outbox, topic = relay_stack
    ids = await _left_behind(stack, outbox, topic, 3, objects=["x", "x", "y"])
    async with stack.api.engine.begin() as conn:
        await _claim_the_first_record_elsewhere(conn)
    async with _second_process_outbox(stack) as other:
        assert await other.relay_once() == 1, "y only"
    relayed = await topic_records(stack.settings, topic, 1)
    assert [r["id"] for r in relayed] == [ids[2]]


async def _never_undone(conn: AsyncConnection) -> bool:
    raise AssertionError("a change whose record may be in the stream was undone")


async def test_a_round_short_of_claim_time_stops_and_frees_the_rest(
    relay_stack: tuple[Stack, Outbox, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round sends only while more than one publish wait of its claim is left: a send
    still on its way when the claim ends would race another relay's copy."""
    stack, outbox, topic = relay_stack
    ids = await _left_behind(stack, outbox, topic, 3)
    outbox.claim_for = timedelta(seconds=outbox._wait + 2.0)
    producer = stack.api._producer
    assert producer is not None
    send = producer.send_and_wait

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(2.5)
        return await send(*args, **kwargs)

    monkeypatch.setattr(producer, "send_and_wait", slow)
    assert await outbox.relay_once() == 1
    monkeypatch.setattr(producer, "send_and_wait", send)
    async with _second_process_outbox(stack) as other:
        assert await other.relay_once() == 2, "freed at once, not when the claim ends"
    await _relayed_once(stack, topic, ids)


async def test_a_request_does_not_undo_a_change_whose_row_the_relay_has_taken(
    relay_stack: tuple[Stack, Outbox, str],
) -> None:
    """A request stalled past the relay's wait: its publish failed, but the relay has
    claimed the row and may be sending it, so the change stays."""
    stack, outbox, topic = relay_stack
    await _left_behind(stack, outbox, topic, 1)
    async with _second_process_outbox(stack) as relay:
        [row] = (await relay._claim())[2]
    undone = []

    async def undo(conn: AsyncConnection) -> bool:
        undone.append(True)
        return True

    assert not await outbox._undone(row.id, undo)
    assert undone == []
    assert await outbox.backlog() == 1


async def test_a_change_made_while_an_older_event_waits_for_the_relay_goes_after_it(
    relay_stack: tuple[Stack, Outbox, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2's publish timed out, so its event waits for the relay; version 3 is made
    with the stream back. Published at once it would reach the events topic before
    version 2 (same key, same partition): it waits behind it, and the relay sends both in
    their order."""
    stack, outbox, _ = relay_stack
    _, created, _ = await _call(stack, "POST", "/contact", json={"v": 1})
    path = f"/contact/{created['id']}"
    publish = outbox.publish_direct

    async def times_out(topic: str, key: str, record: Any) -> None:
        raise PublishOutcomeUnknown("event stream did not answer in time")

    monkeypatch.setattr(outbox, "publish_direct", times_out)
    assert (await _call(stack, "PATCH", path, json={"v": 2}))[0] == 200
    monkeypatch.setattr(outbox, "publish_direct", publish)
    # Version 3 waits for version 2's record a publish's wait at most (shortened here):
    # its request might still have been sending it.
    monkeypatch.setattr(outbox, "_wait", 1.0)
    assert (await _call(stack, "PATCH", path, json={"v": 3}))[0] == 200
    assert await outbox.backlog() == 2, "both wait for the relay"
    monkeypatch.setattr(outbox, "relay_after", timedelta(0))
    await outbox.relay_once()
    events = await topic_records(stack.settings, topics_for(stack.settings).events, 3)
    assert [e["version"] for e in events if e["object_id"] == created["id"]] == [1, 2, 3]
    assert await outbox.backlog() == 0


async def test_a_change_made_while_the_one_before_is_being_published_goes_straight_after_it(
    relay_stack: tuple[Stack, Outbox, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two changes to one object a moment apart: the second's event waits for the first's
    to be published by its own request, then goes at once, behind it, not by the relay."""
    stack, outbox, _ = relay_stack
    _, created, _ = await _call(stack, "POST", "/contact", json={"v": 1})
    path = f"/contact/{created['id']}"
    publish = outbox.publish_direct
    sending, go_on = asyncio.Event(), asyncio.Event()

    async def slow_for_version_2(topic: str, key: str, record: Any) -> None:
        if getattr(record, "version", None) == 2:
            sending.set()
            await go_on.wait()
        await publish(topic, key, record)

    monkeypatch.setattr(outbox, "publish_direct", slow_for_version_2)
    second = asyncio.create_task(_call(stack, "PATCH", path, json={"v": 2}))
    await asyncio.wait_for(sending.wait(), 10)
    third = asyncio.create_task(_call(stack, "PATCH", path, json={"v": 3}))
    await asyncio.sleep(0.5)
    assert not third.done(), "version 3 waits while version 2 is on its way"
    go_on.set()
    assert (await second)[0] == 200
    assert (await third)[0] == 200
    events = await topic_records(stack.settings, topics_for(stack.settings).events, 3)
    assert [e["version"] for e in events if e["object_id"] == created["id"]] == [1, 2, 3]
    assert await outbox.backlog() == 0, "nothing was left for the relay"


async def test_a_record_the_stream_will_never_take_does_not_block_the_relay(
    stack: Stack, receiver: Receiver
) -> None:
    """An older staged record too large for any request (a broker with a lower limit than
    ours would refuse others) goes to the dead-letter topic; the records behind it go on."""
    await stack.subscribe(receiver.url)
    outbox = stack.api.outbox_for(stack.api._producer)  # type: ignore[arg-type]
    topics = topics_for(stack.settings)
    event = sample_event(
        id=new_id("evt"), team_id=stack.team_id, object_id="obj_behind", data={"n": 1}
    )
    long_ago = utcnow() - outbox.relay_after * 3
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            tables.outbox.insert().values(
                id="out_poison",
                topic=topics.events,
                key="k",
                value='{"big": "' + "x" * 1_100_000 + '"}',
                created_at=long_ago,
            )
        )
        row_id = await outbox.stage(conn, topics.events, "k", event)
        await conn.execute(
            tables.outbox.update()
            .where(tables.outbox.c.id == row_id)
            .values(created_at=long_ago + timedelta(seconds=1))
        )
    assert await outbox.relay_once() == 1
    assert await outbox.backlog() == 0
    [delivery] = await receiver.wait_for(1)
    assert orjson.loads(delivery.body)["id"] == event.id
    [letter] = await dead_letters(stack.settings, 1)
    assert letter["reason"].startswith("the event stream refuses this record for good")
    assert letter["source_topic"] == topics.events
    assert (
        stack.api.metrics.registry.get_sample_value(
            "hookwire_api_dead_letters_total", {"reason": "refused_by_broker"}
        )
        == 1
    )


@pytest.fixture
async def patient_producer_stack(settings: Settings) -> AsyncIterator[tuple[Stack, EmbeddedBroker]]:
    """A stack on a broker of its own whose producer waits 30 s for an answer."""
    async with stack_on_own_broker(settings, publish_timeout_seconds=30.0) as running:
        yield running


async def test_a_change_whose_event_may_have_left_is_not_undone(
    patient_producer_stack: tuple[Stack, EmbeddedBroker],
) -> None:
    """The outbox stops waiting while its event is on its way (the broker paused mid-
    request): the event may reach the stream, so the change stays, the relay keeps it, and
    the caller gets the change's answer. Undoing it would leave an event for a change that
    never happened, as happens here."""
    stack, broker = patient_producer_stack
    assert broker.pid is not None
    _, created, _ = await _call(stack, "POST", "/contact", json={"v": 1})
    assert stack.api._producer is not None
    # Gives up after 5.5 s, long before the producer's own 30 s.
    outbox = Outbox(
        stack.api.engine,
        stack.api._producer,
        Metrics("test"),
        publish_timeout=0.5,
        dead_letter_topic=topics_for(stack.settings).dead_letter,
    )
    row, event, change, undo = await _second_version(stack, created["id"], {"v": 2})

    events_topic = topics_for(stack.settings).events
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        # Answered as made: the change stays, and a retry would make it twice.
        await outbox.commit_and_publish(change, undo, events_topic, row.id, event)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    _, current, _ = await _call(stack, "GET", f"/contact/{row.id}")
    assert (current["data"], current["version"]) == ({"v": 2}, 2)
    assert await outbox.backlog() == 1, "the event stays staged for the relay"
    consumer = make_consumer(stack.settings, events_topic, group_id=None)
    await consumer.start()
    try:
        ids: list[str] = []
        async with asyncio.timeout(20):
            while event.id not in ids:
                batches = await consumer.getmany(timeout_ms=200)
                ids += [orjson.loads(r.value)["id"] for b in batches.values() for r in b]
    finally:
        await consumer.stop()


async def test_a_produce_request_that_timed_out_leaves_its_change_made(
    own_broker_stack: tuple[Stack, EmbeddedBroker],
) -> None:
    """The broker takes the produce request and answers nothing (paused) until the
    producer's own timeout: the record may be written once the broker goes on, as here.
    The change stays and the caller gets its answer; undone with a 503, the object would
    be gone while its `object.created` reached every webhook."""
    stack, broker = own_broker_stack
    assert broker.pid is not None
    await _call(stack, "POST", "/contact", json={"warm": True})  # connected, metadata known
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        status, created, _ = await _call(stack, "POST", "/contact", json={"v": 1})
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert status == 201, created
    assert (await _call(stack, "GET", f"/contact/{created['id']}"))[0] == 200
    consumer = make_consumer(stack.settings, topics_for(stack.settings).events, group_id=None)
    await consumer.start()
    try:
        seen: list[str] = []
        async with asyncio.timeout(20):
            while created["id"] not in seen:
                batches = await consumer.getmany(timeout_ms=200)
                seen += [orjson.loads(r.value)["object_id"] for b in batches.values() for r in b]
    finally:
        await consumer.stop()


@pytest.mark.parametrize("trashed_first", [False, True])
async def test_a_force_delete_does_not_take_a_change_made_after_its_read(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, trashed_first: bool
) -> None:
    """A PATCH (or a restore) that commits between the force-delete's read and its delete
    wins: the delete answers 412 and the object stays as changed."""
    _, created, _ = await _call(stack, "POST", "/contact", json={"v": 1})
    path = f"/contact/{created['id']}"
    if trashed_first:
        assert (await _call(stack, "DELETE", path))[0] == 204
    pause = pause_first_call(monkeypatch, object_store, "find")
    deleting = asyncio.create_task(_call(stack, "DELETE", f"{path}?force=true"))
    await asyncio.wait_for(pause.read.wait(), 5)
    if trashed_first:
        status, _, _ = await _call(stack, "POST", f"{path}/restore")
    else:
        status, _, _ = await _call(stack, "PATCH", path, json={"v": 2})
    assert status == 200
    # The delete read before the change; its write comes after it.
    pause.release.set()
    status, body, _ = await deleting
    assert (status, body["error"]["code"]) == (412, "precondition_failed")
    status, current, _ = await _call(stack, "GET", path)
    assert status == 200
    assert current["data"] == {"v": 1 if trashed_first else 2}


async def test_an_object_grown_past_what_the_stream_takes_is_a_413(stack: Stack) -> None:
    """Each PATCH fits the body limit, the merged object does not fit one event: 413 (a 503
    would have the caller retry for ever), and the object stays as it was."""
    _, created, _ = await _call(stack, "POST", "/contact", json={"n": 0})
    path = f"/contact/{created['id']}"
    chunk = "x" * 250_000
    statuses = []
    for n in range(5):
        status, body, _ = await _call(stack, "PATCH", path, json={f"part{n}": chunk})
        statuses.append(status)
        if status == 413:
            assert body["error"]["details"]["max_bytes"] == MAX_EVENT_BYTES
            break
    assert statuses == [200, 200, 200, 413]
    _, current, _ = await _call(stack, "GET", path)
    assert current["version"] == 4
    assert sorted(current["data"]) == ["n", "part0", "part1", "part2"]


class _DatabaseAwayOnce:
    """An engine whose ``begin`` fails once, from its ``fail_from``-th call on (a database
    failing over, a dropped connection); every other call goes to the real engine."""

    def __init__(self, engine: Any, fail_from: int) -> None:
        self._engine = engine
        self._calls = 0
        self._fail_from = fail_from
        self.failed = False

    def begin(self) -> Any:
        self._calls += 1
        if self._calls >= self._fail_from and not self.failed:
            self.failed = True
            raise OperationalError("BEGIN", {}, Exception("database is away"))
        return self._engine.begin()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@pytest.mark.parametrize("broker_up", [True, False], ids=["published", "refused"])
async def test_a_database_failing_after_the_change_answers_it_as_made(
    own_broker_stack: tuple[Stack, EmbeddedBroker], broker_up: bool
) -> None:
    """The change is committed; then the database fails while the outbox forgets the
    published record, or while it would undo the change the stream refused. Either way
    the change stays with its record staged for the relay, and the caller gets the
    change's answer: a 500 would have it make the change a second time."""
    stack, broker = own_broker_stack
    _, created, _ = await _call(stack, "POST", "/contact", json={"v": 1})
    real = stack.api.outbox_for(stack.api._producer)  # type: ignore[arg-type]
    outbox = Outbox(
        _DatabaseAwayOnce(stack.api.engine, fail_from=2),  # type: ignore[arg-type]
        stack.api._producer,  # type: ignore[arg-type]
        Metrics("test"),
        publish_timeout=2.0,
        dead_letter_topic=topics_for(stack.settings).dead_letter,
    )
    row, event, change, undo = await _second_version(stack, created["id"], {"v": 2})
    events_topic = topics_for(stack.settings).events
    if not broker_up:
        broker.stop()
    await outbox.commit_and_publish(change, undo, events_topic, row.id, event)
    assert outbox._engine.failed  # type: ignore[attr-defined]
    _, current, _ = await _call(stack, "GET", f"/contact/{row.id}")
    assert (current["data"], current["version"]) == ({"v": 2}, 2)
    assert await real.backlog() == 1, "the record stays staged for the relay"
    if broker_up:
        published = await topic_records(stack.settings, events_topic, 2)
        assert event.id in [record["id"] for record in published]


async def test_a_claim_waits_for_one_being_made_and_leaves_its_keys_alone(
    relay_stack: tuple[Stack, Outbox, str],
) -> None:
    """Relay A's claim of an object's first record is made but not yet committed when relay
    B claims: B must not take that object's next record (it would send it ahead of the
    first), and takes the other object's."""
    stack, outbox, topic = relay_stack
    ids = await _left_behind(stack, outbox, topic, 3, objects=["x", "x", "y"])
    async with _second_process_outbox(stack) as other, other._engine.connect() as conn:
        claiming = await conn.begin()
        if conn.dialect.name == "postgresql":
            await conn.execute(select(func.pg_advisory_xact_lock(outbox_module._CLAIM_LOCK)))
        await _claim_the_first_record_elsewhere(conn)
        second = asyncio.create_task(outbox._claim())
        await asyncio.sleep(0.5)
        await claiming.commit()
        _, _, rows = await second
    assert [row.key for row in rows] == ["y"], "x's second record waits for its first"
    assert ids[2] in rows[0].value


async def test_a_failed_relay_round_says_why_and_that_it_goes_on(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its line named no error beyond a traceback and was called a crash, though the next
    round came as usual: it names the error and when the relay tries again."""
    assert api_stack.api._producer is not None
    outbox = api_stack.api.outbox_for(api_stack.api._producer)
    rounds = 0
    second_round = asyncio.Event()

    async def database_away() -> int:
        nonlocal rounds
        rounds += 1
        if rounds == 2:
            second_round.set()
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))

    monkeypatch.setattr(outbox, "relay_once", database_away)
    with structlog.testing.capture_logs() as logs:
        relaying = asyncio.create_task(outbox.relay_forever(every_seconds=0.05))
        try:
            await asyncio.wait_for(second_round.wait(), 5)  # the loop went on
        finally:
            relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relaying
    failed = [e for e in logs if e["event"] == "outbox_relay_round_failed"]
    assert len(failed) >= 1
    assert failed[0]["error"].startswith("OperationalError")
    assert failed[0]["retry_in_seconds"] == 0.05


async def test_auth_unreachable_is_a_503_asking_for_a_pause(
    api_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key the api has not cached, with auth gone: 503 `auth_unavailable`, and a
    `Retry-After` of 5 s, not 1 (a service that is down is seldom back within a second)."""
    assert api_stack.api.app is not None
    gate = api_stack.api.app[CONTEXT].gate
    monkeypatch.setattr(gate, "_url", f"http://127.0.0.1:{free_port()}/v1/introspect")
    status, body, headers = await _call(
        api_stack,
        "GET",
        "/contact",
        headers={"authorization": f"Bearer {await api_stack.new_token(['object:read'])}"},
    )
    assert (status, body["error"]["code"]) == (503, "auth_unavailable")
    assert headers["Retry-After"] == "5"
