"""The delivery log: every attempt stored by the api, listed, shown, retried and replayed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from sqlalchemy import event as sql_event
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from services.api import deliveries, delivery_log
from services.api.errors import PublishUnavailable
from services.shared import (
    Attempt,
    Settings,
    make_consumer,
    make_producer,
    send_all,
    tables,
    topics_for,
    utcnow,
)
from tests.conftest import (
    Receiver,
    Stack,
    dead_letters,
    refuse_second_replay_chunk,
    running_stack,
)
from tests.integration.test_end_to_end import standard_webhooks_verify
from tests.samples import sample_event


async def _call(
    stack: Stack, method: str, path: str, token: str | None = None, **kwargs: Any
) -> tuple[int, Any]:
    async with stack.session.request(
        method,
        f"{stack.api_url}/v1/teams/{stack.team_id}{path}",
        headers=stack.headers(token),
        **kwargs,
    ) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


async def _logged(
    stack: Stack, delivery_id: str, ready: Callable[[dict[str, Any]], bool], within: float = 10.0
) -> dict[str, Any]:
    """Poll the log until the delivery is there and ``ready`` holds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        status, delivery = await _call(stack, "GET", f"/deliveries/{delivery_id}")
        if status == 200 and ready(delivery):
            return dict(delivery)
        assert asyncio.get_running_loop().time() < deadline, f"log never showed it: {delivery}"
        await asyncio.sleep(0.05)


async def _unreachable_webhook(stack: Stack) -> dict[str, Any]:
    """A webhook for attempt records written by the test; nothing is ever sent to it."""
    status, webhook = await _call(
        stack,
        "POST",
        "/webhooks",
        json={"name": "w", "url": "http://127.0.0.1:9/hook", "topics": ["object.created"]},
    )
    assert status == 201
    return dict(webhook)


async def _listed(stack: Stack, path: str, count: int, within: float = 10.0) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        status, page = await _call(stack, "GET", path)
        assert status == 200, page
        if len(page["data"]) >= count:
            return list(page["data"])
        assert asyncio.get_running_loop().time() < deadline, f"only {len(page['data'])} listed"
        await asyncio.sleep(0.05)


async def test_a_failed_attempt_is_logged_and_a_retry_delivers_it(
    stack: Stack, receiver: Receiver
) -> None:
    """The log shows the failure (status, error class, redacted headers, response body);
    a retry re-sends the same webhook-id with the next attempt number and succeeds."""
    webhook = await stack.create_webhook(
        receiver.url,
        ["object.created"],
        headers={"X-Api-Key": "receiver-credential", "X-Team": "acme"},
    )
    receiver.statuses = [500]
    await stack.create_object()
    [first] = await receiver.wait_for(1)
    delivery_id = first.headers["webhook-id"]

    failed = await _logged(stack, delivery_id, lambda d: d["attempt_count"] == 1)
    assert failed["webhook_id"] == webhook["id"]
    assert failed["event"]["type"] == "object.created"
    [attempt] = failed["attempts"]
    assert (attempt["outcome"], attempt["status_code"], attempt["error_class"]) == (
        "failed",
        500,
        "http_status",
    )
    assert attempt["response_body"] == "ok"
    assert attempt["latency_ms"] > 0
    shown = attempt["request_headers"]
    assert shown["webhook-signature"] == "[redacted]"
    assert shown["X-Api-Key"] == "[redacted]"
    assert shown["X-Team"] == "acme"
    assert shown["webhook-id"] == delivery_id
    assert "receiver-credential" not in orjson.dumps(failed).decode()

    status, retried = await _call(stack, "POST", f"/deliveries/{delivery_id}/retry")
    assert (status, retried) == (202, {"delivery_id": delivery_id, "attempt": 2})
    second = (await receiver.wait_for(2))[1]
    assert second.headers["webhook-id"] == delivery_id
    assert second.body == first.body
    assert standard_webhooks_verify(webhook["secret"], second.headers, second.body)

    done = await _logged(stack, delivery_id, lambda d: d["state"] == "delivered")
    assert done["attempt_count"] == 2
    assert [(a["attempt"], a["status_code"]) for a in done["attempts"]] == [(1, 500), (2, 200)]
    assert done["attempts"][1]["final"] is True


async def test_listing_filters_by_state_and_time_and_pages(
    stack: Stack, receiver: Receiver
) -> None:
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    receiver.statuses = [200, 503, 200]
    for n in range(3):
        await stack.create_object({"n": n})
    await receiver.wait_for(3)
    path = f"/webhooks/{webhook['id']}/deliveries"
    everything = await _listed(stack, path, 3)
    assert len({d["id"] for d in everything}) == 3
    created = [d["created_at"] for d in everything]
    assert created == sorted(created, reverse=True), "newest first"

    [failed] = (await _call(stack, "GET", path, params={"state": "failed,retrying"}))[1]["data"]
    assert failed["last_status_code"] == 503
    delivered = (await _call(stack, "GET", path, params={"state": "delivered"}))[1]["data"]
    assert len(delivered) == 2

    later = (utcnow() + timedelta(minutes=1)).isoformat()
    assert (await _call(stack, "GET", path, params={"since": later}))[1]["data"] == []
    assert len((await _call(stack, "GET", path, params={"until": later}))[1]["data"]) == 3
    # The same instants written with another offset select the same deliveries.
    east = timezone(timedelta(hours=2))
    later_east = (utcnow() + timedelta(minutes=1)).astimezone(east).isoformat()
    earlier_east = (utcnow() - timedelta(minutes=30)).astimezone(east).isoformat()
    assert (await _call(stack, "GET", path, params={"since": later_east}))[1]["data"] == []
    assert len((await _call(stack, "GET", path, params={"since": earlier_east}))[1]["data"]) == 3

    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "1"} | ({"cursor": cursor} if cursor else {})
        status, page = await _call(stack, "GET", path, params=params)
        assert status == 200
        seen.extend(d["id"] for d in page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [d["id"] for d in everything]

    team_wide = (await _call(stack, "GET", "/deliveries", params={"webhook_id": webhook["id"]}))[1][
        "data"
    ]
    assert [d["id"] for d in team_wide] == seen


async def test_a_list_reads_no_event_and_no_response_body(stack: Stack, receiver: Receiver) -> None:
    """A page of 500 deliveries would otherwise read every event (up to 900 KB each) and
    every attempt's answer to drop them; showing one delivery reads them."""
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    await stack.create_object({"n": 1})
    await receiver.wait_for(1)
    path = f"/webhooks/{webhook['id']}/deliveries"
    [listed] = await _listed(stack, path, 1)
    statements: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    engine = stack.api.engine.sync_engine
    sql_event.listen(engine, "before_cursor_execute", note)
    try:
        status, page = await _call(stack, "GET", path)
        assert status == 200
        assert [d["id"] for d in page["data"]] == [listed["id"]]
        assert "event" not in page["data"][0]
        listing = [s for s in statements if "FROM deliveries" in s or "FROM delivery_attempts" in s]
        assert len(listing) == 2, statements
        assert not any(
            word in statement
            for statement in listing
            for word in (
                "deliveries.event,",
                "deliveries.event ",
                "response_body",
                "request_headers",
            )
        ), listing
        statements.clear()
        status, shown = await _call(stack, "GET", f"/deliveries/{listed['id']}")
        assert status == 200
        assert shown["event"]["data"] == {"n": 1}
        assert "response_body" in shown["attempts"][0]
        assert any("response_body" in statement for statement in statements), statements
    finally:
        sql_event.remove(engine, "before_cursor_execute", note)


async def test_replay_resends_every_delivery_since_a_time_or_only_failed_ones(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    before = utcnow() - timedelta(seconds=1)
    receiver.statuses = [200, 500, 200]
    for n in range(3):
        await stack.create_object({"n": n})
    originals = await receiver.wait_for(3)
    ids = {r.headers["webhook-id"] for r in originals}
    path = f"/webhooks/{webhook['id']}/deliveries"
    await _listed(stack, path, 3)
    [failed] = (await _call(stack, "GET", path, params={"state": "failed,retrying"}))[1]["data"]
    failed_id = failed["id"]

    status, answer = await _call(
        stack,
        "POST",
        f"/webhooks/{webhook['id']}/replay",
        json={"since": before.isoformat(), "only_failed": True},
    )
    assert (status, answer["replayed"], answer["truncated"]) == (202, 1, False)
    [replayed] = (await receiver.wait_for(4))[3:]
    assert replayed.headers["webhook-id"] == failed_id

    status, answer = await _call(
        stack, "POST", f"/webhooks/{webhook['id']}/replay", json={"since": before.isoformat()}
    )
    assert (status, answer["replayed"]) == (202, 3)
    again = (await receiver.wait_for(7))[4:]
    assert {r.headers["webhook-id"] for r in again} == ids
    recovered = await _logged(stack, failed_id, lambda d: d["state"] == "delivered")
    assert recovered["attempt_count"] >= 2

    status, answer = await _call(
        stack,
        "POST",
        f"/webhooks/{webhook['id']}/replay",
        json={"since": (utcnow() + timedelta(minutes=1)).isoformat()},
    )
    assert (status, answer["replayed"]) == (202, 0)

    # Read and sent a chunk at a time; past the bound the answer says where to resume.
    monkeypatch.setattr(deliveries, "_REPLAY_CHUNK", 1)
    monkeypatch.setattr(deliveries, "MAX_REPLAY", 2)
    status, answer = await _call(
        stack, "POST", f"/webhooks/{webhook['id']}/replay", json={"since": before.isoformat()}
    )
    assert (status, answer["replayed"], answer["truncated"]) == (202, 2, True)
    sent = (await receiver.wait_for(9))[7:]
    oldest_first = [d["id"] for d in reversed(await _listed(stack, path, 3))]
    assert [r.headers["webhook-id"] for r in sent] == oldest_first[:2]
    status, answer = await _call(
        stack, "POST", f"/webhooks/{webhook['id']}/replay", json={"since": answer["resume_since"]}
    )
    assert (status, answer["replayed"], answer["truncated"]) == (202, 1, False)
    [last] = (await receiver.wait_for(10))[9:]
    assert last.headers["webhook-id"] == oldest_first[2]

    # The stream fails after a first chunk went out: the 503 says where to go on from.
    monkeypatch.setattr(deliveries, "MAX_REPLAY", 10)
    refuse_second_replay_chunk(monkeypatch)
    status, answer = await _call(
        stack, "POST", f"/webhooks/{webhook['id']}/replay", json={"since": before.isoformat()}
    )
    assert status == 503
    details = answer["error"]["details"]
    assert details["replayed"] == 1
    second_created = datetime.fromisoformat(
        (await _call(stack, "GET", f"/deliveries/{oldest_first[1]}"))[1]["created_at"]
    )
    assert datetime.fromisoformat(details["resume_since"]) == second_created


async def test_a_test_event_goes_to_that_webhook_only(stack: Stack, receiver: Receiver) -> None:
    tested = await stack.create_webhook(receiver.url + "/tested", ["object.created"])
    await stack.create_webhook(receiver.url + "/other", ["object.created"])
    status, answer = await _call(stack, "POST", f"/webhooks/{tested['id']}/test")
    assert status == 202
    [got] = await receiver.wait_for(1)
    assert got.path.endswith("/tested")
    body = orjson.loads(got.body)
    assert (body["type"], body["object_id"]) == ("webhook.test", tested["id"])
    assert got.headers["webhook-id"] == answer["delivery_id"]
    # The answer shows the event as the receiver got it: absent fields absent, not null.
    assert answer["event"] == body
    assert standard_webhooks_verify(tested["secret"], got.headers, got.body)
    logged = await _logged(stack, answer["delivery_id"], lambda d: d["state"] == "delivered")
    assert (logged["kind"], logged["event_type"]) == ("test", "webhook.test")

    status, answer = await _call(
        stack, "POST", f"/webhooks/{tested['id']}/test", json={"data": {"hello": "world"}}
    )
    assert status == 202
    second = (await receiver.wait_for(2))[1]
    assert orjson.loads(second.body)["data"] == {"hello": "world"}
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 2, "the other webhook received nothing"


async def test_bad_requests_to_the_log_are_refused(stack: Stack, receiver: Receiver) -> None:
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    path = f"/webhooks/{webhook['id']}"
    naive = "2026-01-01T00:00:00"
    refused = [
        ("GET", "/deliveries", {"params": {"state": "lost"}}, 422, "state"),
        ("GET", "/deliveries", {"params": {"limit": "0"}}, 422, "limit"),
        ("GET", "/deliveries", {"params": {"since": naive}}, 422, "since"),
        ("GET", "/deliveries", {"params": {"cursor": "nonsense"}}, 422, "cursor"),
        ("GET", "/deliveries", {"params": {"cursor": "\u00b21.msg_x"}}, 422, "cursor"),
        ("GET", "/deliveries", {"params": {"cursor": "9" * 20 + ".msg_x"}}, 422, "cursor"),
        ("GET", "/deliveries", {"params": {"colour": "red"}}, 422, "colour"),
        ("GET", path + "/deliveries", {"params": {"webhook_id": "wh_x"}}, 422, "webhook_id"),
        ("GET", "/webhooks/wh_missing/deliveries", {}, 404, None),
        ("GET", "/deliveries/msg_missing", {}, 404, None),
        ("POST", "/deliveries/msg_missing/retry", {}, 404, None),
        ("POST", path + "/replay", {"json": {}}, 422, "since"),
        ("POST", path + "/replay", {"json": {"since": naive}}, 422, "since"),
        ("POST", path + "/replay", {"data": b"{"}, 422, "body"),
        ("POST", path + "/replay", {"json": {"since": "2026-01-01T00:00:00Z", "x": 1}}, 422, "x"),
        (
            "POST",
            path + "/replay",
            {"json": {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
            422,
            "until",
        ),
        ("POST", path + "/test", {"json": {"data": [1]}}, 422, "data"),
        ("POST", path + "/test", {"json": {"data": {"n": 2**64}}}, 422, "data"),
        ("POST", path + "/test", {"json": {"data": {"n": float("inf")}}}, 422, "data"),
        ("POST", path + "/test", {"json": {"other": 1}}, 422, "other"),
        ("POST", "/webhooks/wh_missing/test", {}, 404, None),
    ]
    for method, target, kwargs, expected, field in refused:
        status, body = await _call(stack, method, target, **kwargs)
        assert status == expected, (method, target, kwargs, body)
        assert set(body) == {"error"}
        if field is not None:
            assert field in {d["field"] for d in body["error"]["details"]}, body
        if field == "cursor":
            # A query parameter, and named so.
            assert body["error"]["message"] == "invalid query parameters: cursor", body

    reader = await stack.new_token(["webhook:read"])
    status, body = await _call(stack, "POST", path + "/test", token=reader)
    assert (status, body["error"]["code"]) == (403, "forbidden")

    assert (await _call(stack, "PATCH", path, json={"active": False}))[0] == 200
    status, body = await _call(stack, "POST", path + "/test")
    assert (status, body["error"]["code"]) == (409, "conflict")
    assert (await _call(stack, "PATCH", path, json={"active": True}))[0] == 200
    assert (await _call(stack, "DELETE", path))[0] == 204
    for target, kwargs in (
        ("/test", {}),
        ("/replay", {"json": {"since": "2026-01-01T00:00:00Z"}}),
    ):
        status, body = await _call(stack, "POST", path + target, **kwargs)
        assert (status, body["error"]["code"]) == (409, "conflict"), target
        assert "trash" in body["error"]["message"]
    await asyncio.sleep(0.3)
    assert receiver.received == [], "nothing was sent"


async def test_force_delete_takes_the_log_and_trash_keeps_it(
    stack: Stack, receiver: Receiver
) -> None:
    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    await stack.create_object()
    [got] = await receiver.wait_for(1)
    delivery_id = got.headers["webhook-id"]
    await _logged(stack, delivery_id, lambda d: d["state"] == "delivered")
    assert (await _call(stack, "DELETE", f"/webhooks/{webhook['id']}"))[0] == 204
    listed = await _call(stack, "GET", f"/webhooks/{webhook['id']}/deliveries")
    assert [d["id"] for d in listed[1]["data"]] == [delivery_id]
    assert (await _call(stack, "POST", f"/deliveries/{delivery_id}/retry"))[0] == 409
    assert (await _call(stack, "DELETE", f"/webhooks/{webhook['id']}?force=true"))[0] == 204
    assert (await _call(stack, "GET", f"/deliveries/{delivery_id}"))[0] == 404


def _attempt(stack: Stack, delivery_id: str, attempt: int, webhook_id: str) -> Attempt:
    event = sample_event(
        id=f"evt_{delivery_id}", team_id=stack.team_id, occurred_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    return Attempt(
        delivery_id=delivery_id,
        event_id=event.id,
        webhook_id=webhook_id,
        team_id=stack.team_id,
        attempt=attempt,
        attempted_at=utcnow(),
        outcome="failed" if attempt == 1 else "delivered",
        status_code=500 if attempt == 1 else 200,
        final=attempt > 1,
        event=event,
    )


async def test_bad_attempt_records_are_dead_lettered_and_repeats_change_nothing(
    settings: Settings,
) -> None:
    """Garbage and out-of-contract attempt records go to the dead-letter topic with the
    reason; valid ones after them are stored; a stale repeat does not move a delivery back."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        await _bad_attempts_are_dead_lettered(stack)


async def _bad_attempts_are_dead_lettered(stack: Stack) -> None:
    topics = topics_for(stack.settings)
    webhook = await _unreachable_webhook(stack)
    good = _attempt(stack, "msg_good", 1, webhook["id"])
    bad = [
        b"not json",
        orjson.dumps({**orjson.loads(good.to_bytes()), "attempt": 0}),
        orjson.dumps({**orjson.loads(good.to_bytes()), "delivery_id": "x" * 65}),
        orjson.dumps({k: v for k, v in orjson.loads(good.to_bytes()).items() if k != "event"}),
    ]
    producer = make_producer(stack.settings)
    await producer.start()
    try:
        for value in bad:
            await producer.send_and_wait(topics.attempts, value=value, key=b"k")
        for record in (good, _attempt(stack, "msg_good", 2, webhook["id"]), good):
            await producer.send_and_wait(topics.attempts, value=record.to_bytes(), key=b"k")
    finally:
        await producer.stop()

    done = await _logged(stack, "msg_good", lambda d: len(d["attempts"]) == 2)
    assert (done["state"], done["attempt_count"]) == ("delivered", 2), "the repeat of #1 lost"

    letters = await dead_letters(stack.settings, len(bad))
    assert [letter["source_topic"] for letter in letters] == [topics.attempts] * len(bad)
    reasons = [letter["reason"] for letter in letters]
    assert "attempt" in reasons[1]
    assert "delivery_id" in reasons[2]
    assert "event" in reasons[3]
    registry = stack.api.metrics.registry
    assert registry.get_sample_value(
        "hookwire_api_attempts_consumed_total", {"outcome": "invalid"}
    ) == len(bad)
    assert registry.get_sample_value(
        "hookwire_api_dead_letters_total", {"reason": "invalid_record"}
    ) == len(bad)


async def test_a_test_event_written_to_the_events_topic_is_dead_lettered(
    stack: Stack, receiver: Receiver
) -> None:
    await stack.create_webhook(receiver.url, ["object.created"])
    event = sample_event(
        id="evt_forged_test",
        type="webhook.test",
        team_id=stack.team_id,
        object_type="webhook",
        object_id="wh_x",
    )
    producer = make_producer(stack.settings)
    await producer.start()
    try:
        await producer.send_and_wait(stack.dispatcher.topics.events, value=event.to_bytes())
    finally:
        await producer.stop()
    registry = stack.dispatcher.metrics.registry
    deadline = asyncio.get_running_loop().time() + 10
    while not registry.get_sample_value(
        "hookwire_dispatcher_dead_letters_total", {"reason": "invalid_record"}
    ):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert receiver.received == []


async def test_nul_in_an_answer_is_stored_and_a_stale_disable_request_is_ignored(
    settings: Settings,
) -> None:
    """A receiver's answer with NUL characters (which PostgreSQL text cannot hold) is
    stored with them replaced, and the log goes on; a request to disable a webhook made
    before the webhook last changed (reactivated since, or the record read again) leaves
    it active, while a current one disables it."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = await _unreachable_webhook(stack)
        base = _attempt(stack, "msg_nul", 1, webhook["id"]).model_copy(
            update={"webhook_id": webhook["id"], "response_body": "ok\x00", "error": "x\x00"}
        )
        stale = base.model_copy(
            update={
                "delivery_id": "msg_stale",
                "attempted_at": utcnow() - timedelta(hours=1),
                "disable_reason": "the endpoint answered 410 Gone",
            }
        )
        producer = make_producer(stack.settings)
        await producer.start()
        try:
            for record in (base, stale):
                await producer.send_and_wait(
                    topics_for(stack.settings).attempts, value=record.to_bytes(), key=b"k"
                )
            shown = await _logged(stack, "msg_nul", lambda d: len(d["attempts"]) == 1)
            assert shown["attempts"][0]["response_body"] == "ok\ufffd"
            await _logged(stack, "msg_stale", lambda d: len(d["attempts"]) == 1)
            assert (await _call(stack, "GET", f"/webhooks/{webhook['id']}"))[1]["active"] is True
            current = stale.model_copy(update={"delivery_id": "msg_now", "attempted_at": utcnow()})
            await producer.send_and_wait(
                topics_for(stack.settings).attempts, value=current.to_bytes(), key=b"k"
            )
            await _logged(stack, "msg_now", lambda d: len(d["attempts"]) == 1)
            assert (await _call(stack, "GET", f"/webhooks/{webhook['id']}"))[1]["active"] is False
        finally:
            await producer.stop()


async def test_a_disable_request_read_again_still_tells_the_dispatchers(
    settings: Settings,
) -> None:
    """The writer may die after disabling a webhook and before publishing the change; the
    request read again finds the webhook already inactive and must still publish it, or
    the other dispatchers go on delivering until their next whole load."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = await _unreachable_webhook(stack)
        request = _attempt(stack, "msg_gone", 1, webhook["id"]).model_copy(
            update={
                "webhook_id": webhook["id"],
                "disable_reason": "the endpoint answered 410 Gone",
            }
        )
        topics = topics_for(stack.settings)
        producer = make_producer(stack.settings)
        await producer.start()
        changes = make_consumer(stack.settings, topics.changes, group_id=None)
        await changes.start()
        updates: list[str] = []

        async def updated(count: int) -> None:
            async with asyncio.timeout(10):
                while len(updates) < count:
                    batches = await changes.getmany(timeout_ms=200)
                    records = [orjson.loads(r.value) for b in batches.values() for r in b]
                    updates.extend(
                        c["entity_id"]
                        for c in records
                        if c["entity_id"] == webhook["id"] and c["action"] == "updated"
                    )

        try:
            await producer.send_and_wait(topics.attempts, value=request.to_bytes(), key=b"k")
            await updated(1)
            assert (await _call(stack, "GET", f"/webhooks/{webhook['id']}"))[1]["active"] is False
            await producer.send_and_wait(topics.attempts, value=request.to_bytes(), key=b"k")
            await updated(2)
            assert updates == [webhook["id"]] * 2
        finally:
            await changes.stop()
            await producer.stop()


async def test_an_attempt_the_store_refuses_is_dead_lettered_and_the_log_goes_on(
    settings: Settings,
) -> None:
    """A record within the contract that the database cannot hold (a time that leaves the
    calendar once turned to UTC, as every stored time is) would
    fail its batch on every try and stop the delivery log; it is dead-lettered with the
    reason and the records around it are stored."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        topics = topics_for(stack.settings)
        webhook = await _unreachable_webhook(stack)
        refused = orjson.loads(_attempt(stack, "msg_refused", 1, webhook["id"]).to_bytes())
        refused["attempted_at"] = "0001-01-01T00:00:00+14:00"
        producer = make_producer(stack.settings)
        await producer.start()
        try:
            await send_all(
                producer,
                [
                    (
                        topics.attempts,
                        b"k",
                        _attempt(stack, "msg_before", 1, webhook["id"]).to_bytes(),
                    ),
                    (topics.attempts, b"k", orjson.dumps(refused)),
                    (
                        topics.attempts,
                        b"k",
                        _attempt(stack, "msg_after", 1, webhook["id"]).to_bytes(),
                    ),
                ],
            )
        finally:
            await producer.stop()
        await _logged(stack, "msg_before", lambda d: len(d["attempts"]) == 1)
        await _logged(stack, "msg_after", lambda d: len(d["attempts"]) == 1)
        assert (await _call(stack, "GET", "/deliveries/msg_refused"))[0] == 404
        [letter] = await dead_letters(stack.settings, 1)
        assert letter["source_topic"] == topics.attempts
        assert letter["reason"].startswith("not storable: ")
        assert "out of range" in letter["reason"]
        assert orjson.loads(letter["payload"])["delivery_id"] == "msg_refused"
        assert (
            stack.api.metrics.registry.get_sample_value(
                "hookwire_api_dead_letters_total", {"reason": "not_storable"}
            )
            == 1
        )


async def test_a_team_resends_no_more_than_its_budget(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three re-sends an hour: a replay of four deliveries sends three and says where to
    go on from and when the budget allows a whole replay again; then a retry, a replay and
    a test event are each 429 with Retry-After, and nothing more is sent."""
    monkeypatch.setattr(deliveries, "_REPLAY_CHUNK", 2)
    limited = settings.model_copy(update={"resends_per_team_per_hour": 3})
    async with running_stack(limited, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, ["object.created"])
        before = utcnow() - timedelta(seconds=1)
        for n in range(4):
            await stack.create_object({"n": n})
        await receiver.wait_for(4)
        path = f"/webhooks/{webhook['id']}/deliveries"
        listed = await _listed(stack, path, 4)
        oldest_first = [d["id"] for d in reversed(listed)]
        replay = f"/webhooks/{webhook['id']}/replay"
        status, answer = await _call(stack, "POST", replay, json={"since": before.isoformat()})
        assert (status, answer["replayed"], answer["truncated"]) == (202, 3, True)
        # The budget holds three, refilled one per 20 minutes: full again in an hour.
        assert 3500 < answer["retry_after_seconds"] <= 3600
        fourth = (await _call(stack, "GET", f"/deliveries/{oldest_first[3]}"))[1]
        assert datetime.fromisoformat(answer["resume_since"]) == datetime.fromisoformat(
            fourth["created_at"]
        )
        sent = (await receiver.wait_for(7))[4:]
        assert [r.headers["webhook-id"] for r in sent] == oldest_first[:3]
        for route, body in (
            (f"/deliveries/{listed[0]['id']}/retry", None),
            (replay, {"since": answer["resume_since"]}),
            (f"/webhooks/{webhook['id']}/test", None),
        ):
            async with stack.session.post(
                f"{stack.api_url}/v1/teams/{stack.team_id}{route}",
                headers=stack.headers(),
                json=body,
            ) as response:
                assert response.status == 429, route
                assert 1000 < int(response.headers["Retry-After"]) <= 1200
                refused = await response.json()
            assert refused["error"]["code"] == "rate_limited"
            assert "HOOKWIRE_RESENDS_PER_TEAM_PER_HOUR" in refused["error"]["message"]
        await asyncio.sleep(0.5)
        assert len(receiver.received) == 7
        # A refused retry took no attempt number.
        shown = (await _call(stack, "GET", f"/deliveries/{listed[0]['id']}"))[1]
        assert shown["attempt_count"] == 1


async def test_resends_not_made_are_given_back(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay with fewer deliveries than the budget, and re-sends the stream refused,
    leave the budget as it was: the team can still re-send all of it."""
    limited = settings.model_copy(update={"resends_per_team_per_hour": 3})
    async with running_stack(limited, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, ["object.created"])
        before = utcnow() - timedelta(seconds=1)
        await stack.create_object({"n": 0})
        await receiver.wait_for(1)
        [listed] = await _listed(stack, f"/webhooks/{webhook['id']}/deliveries", 1)

        async def refused(ctx: Any, chosen: Any) -> None:
            raise PublishUnavailable("event stream is unavailable: test")

        real_publish = deliveries._publish
        monkeypatch.setattr(deliveries, "_publish", refused)
        for route in (f"/deliveries/{listed['id']}/retry", f"/webhooks/{webhook['id']}/test"):
            assert (await _call(stack, "POST", route))[0] == 503
        replay = f"/webhooks/{webhook['id']}/replay"
        since = {"since": before.isoformat()}
        assert (await _call(stack, "POST", replay, json=since))[0] == 503
        monkeypatch.setattr(deliveries, "_publish", real_publish)
        status, answer = await _call(stack, "POST", replay, json=since)
        assert (status, answer["replayed"], answer["truncated"]) == (202, 1, False)
        for _ in range(2):
            assert (await _call(stack, "POST", f"/webhooks/{webhook['id']}/test"))[0] == 202
        assert (await _call(stack, "POST", f"/webhooks/{webhook['id']}/test"))[0] == 429


async def test_no_success_for_the_period_disables_the_webhook_whoever_delivered(
    settings: Settings,
) -> None:
    """The clock lives with the webhook in the database: attempts alone decide, whichever
    dispatcher made them and however often dispatchers restarted. A success ends a run of
    failures; a reactivation, or a restore from the trash, starts afresh. (Failures up to
    half the period apart are one run, far longer apart than a minute's retries wait.)"""
    a_day = settings.model_copy(
        update={"endpoint_disable_after_days": 1.0, "retry_schedule_seconds": (60.0,)}
    )
    async with running_stack(a_day, with_dispatcher=False) as stack:
        webhook = await _unreachable_webhook(stack)
        start = utcnow()
        topics = topics_for(stack.settings)
        producer = make_producer(stack.settings)
        await producer.start()
        sent = 0

        async def attempt(after: timedelta, outcome: str) -> None:
            nonlocal sent
            sent += 1
            record = _attempt(stack, f"msg_day_{sent}", 1, webhook["id"]).model_copy(
                update={
                    "webhook_id": webhook["id"],
                    "attempted_at": start + after,
                    "outcome": outcome,
                    "final": False,
                }
            )
            await producer.send_and_wait(topics.attempts, value=record.to_bytes(), key=b"k")
            await _logged(stack, record.delivery_id, lambda d: len(d["attempts"]) == 1)

        async def active() -> bool:
            return bool((await _call(stack, "GET", f"/webhooks/{webhook['id']}"))[1]["active"])

        try:
            await attempt(timedelta(minutes=1), "failed")
            await attempt(timedelta(minutes=2), "delivered")
            await attempt(timedelta(minutes=3), "failed")
            await attempt(timedelta(hours=12), "failed")
            await attempt(timedelta(hours=23), "failed")
            assert await active(), "a success ended the first run; the second is 23 h long"
            await attempt(timedelta(hours=25), "failed")
            assert not await active()
            status, audit = await stack.auth_call(
                "GET", f"/v1/audit-log?team_id={stack.team_id}&action=webhook.disabled"
            )
            assert status == 200
            assert audit["data"][0]["details"]["reason"] == "no successful delivery for 1 days"
            registry = stack.api.metrics.registry
            disabled = {"reason": "failing"}
            assert registry.get_sample_value("hookwire_api_webhooks_disabled_total", disabled) == 1

            status, _ = await _call(
                stack, "PATCH", f"/webhooks/{webhook['id']}", json={"active": True}
            )
            assert status == 200
            await attempt(timedelta(hours=48), "failed")
            await attempt(timedelta(hours=49), "failed")
            assert await active(), "failures before the reactivation do not count"

            assert (await _call(stack, "DELETE", f"/webhooks/{webhook['id']}"))[0] == 204
            status, _ = await _call(stack, "POST", f"/webhooks/{webhook['id']}/restore")
            assert status == 200
            await attempt(timedelta(hours=75), "failed")
            assert await active(), "failures before the trash and restore do not count"
        finally:
            await producer.stop()


async def test_a_late_attempt_does_not_bring_back_a_force_deleted_webhooks_log(
    settings: Settings,
) -> None:
    """Retries waiting and deliveries in flight when a webhook is force-deleted report
    later; the log went with the webhook and stays gone."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = await _unreachable_webhook(stack)
        kept = await _unreachable_webhook(stack)
        topics = topics_for(stack.settings)
        producer = make_producer(stack.settings)
        await producer.start()
        try:
            early = _attempt(stack, "msg_early", 1, webhook["id"])
            await send_all(producer, [(topics.attempts, b"k", early.to_bytes())])
            await _logged(stack, "msg_early", lambda d: len(d["attempts"]) == 1)
            status, _ = await _call(stack, "DELETE", f"/webhooks/{webhook['id']}?force=true")
            assert status == 204
            assert (await _call(stack, "GET", "/deliveries/msg_early"))[0] == 404
            await send_all(
                producer,
                [
                    (
                        topics.attempts,
                        b"k",
                        _attempt(stack, "msg_early", 2, webhook["id"]).to_bytes(),
                    ),
                    (topics.attempts, b"k", _attempt(stack, "msg_kept", 1, kept["id"]).to_bytes()),
                ],
            )
        finally:
            await producer.stop()
        await _logged(stack, "msg_kept", lambda d: len(d["attempts"]) == 1)
        assert (await _call(stack, "GET", "/deliveries/msg_early"))[0] == 404
        status, listed = await _call(stack, "GET", "/deliveries")
        assert [d["id"] for d in listed["data"]] == ["msg_kept"]
        registry = stack.api.metrics.registry
        consumed = {
            sample.labels["outcome"]: sample.value
            for metric in registry.collect()
            if metric.name == "hookwire_api_attempts_consumed"
            for sample in metric.samples
            if sample.name.endswith("_total")
        }
        # Each attempt counted once: the one of the webhook gone only as that.
        assert sum(consumed.values()) == 3, consumed
        assert consumed["webhook_gone"] == 1


async def test_deliveries_past_the_retention_leave_the_log_with_their_attempts(
    settings: Settings,
) -> None:
    """The log keeps a delivery, its event and its attempts for the retention after its
    last change, then lets them go (a batch at a time), or it would grow for good."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = await _unreachable_webhook(stack)
        topics = topics_for(stack.settings)
        producer = make_producer(stack.settings)
        await producer.start()
        try:
            names = ["msg_old_1", "msg_old_2", "msg_recent"]
            records = [
                (topics.attempts, b"k", _attempt(stack, name, n, webhook["id"]).to_bytes())
                for name in names
                for n in (1, 2)
            ]
            await send_all(producer, records)
            for name in names:
                await _logged(stack, name, lambda d: len(d["attempts"]) == 2)
        finally:
            await producer.stop()
        deliveries_table, attempts_table = tables.deliveries, tables.delivery_attempts
        now = utcnow()
        async with stack.api.engine.begin() as conn:
            await conn.execute(
                update(deliveries_table)
                .where(deliveries_table.c.id.in_(["msg_old_1", "msg_old_2"]))
                .values(updated_at=now - timedelta(days=31))
            )
            await conn.execute(
                update(deliveries_table)
                .where(deliveries_table.c.id == "msg_recent")
                .values(updated_at=now - timedelta(days=29))
            )
        pruned = await delivery_log.prune(stack.api.engine, now - timedelta(days=30), batch=1)
        assert pruned == 2
        assert (await _call(stack, "GET", "/deliveries/msg_old_1"))[0] == 404
        assert (await _call(stack, "GET", "/deliveries/msg_recent"))[0] == 200
        async with stack.api.engine.connect() as conn:
            left = (await conn.execute(select(attempts_table.c.delivery_id))).scalars().all()
        assert sorted(left) == ["msg_recent", "msg_recent"]


async def test_a_force_delete_during_a_write_of_the_log_leaves_none_of_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivery-log writer has read that the webhook exists and not yet written its
    attempts when the webhook is force-deleted: the delete waits for the writes and takes
    them too (PostgreSQL), or the writer's stale read fails and its batch is read again
    (SQLite). No log is left behind for a webhook that is gone."""
    async with running_stack(settings, with_dispatcher=False) as stack:
        webhook = await _unreachable_webhook(stack)
        attempt = _attempt(stack, "msg_racing", 1, webhook["id"])
        release, read = asyncio.Event(), asyncio.Event()
        real_store = delivery_log._store

        async def store_when_released(conn: Any, attempts: Any) -> None:
            read.set()
            await release.wait()
            await real_store(conn, attempts)

        monkeypatch.setattr(delivery_log, "_store", store_when_released)

        async def writer() -> None:
            # As the attempt recorder does: a batch that fails is read again.
            for _ in range(2):
                try:
                    async with stack.api.engine.begin() as conn:
                        await delivery_log.record_attempts(conn, [attempt])
                    return
                except OperationalError:
                    continue

        writing = asyncio.create_task(writer())
        # The writer has read that the webhook exists and waits to write.
        await asyncio.wait_for(read.wait(), 30)
        deleting = asyncio.create_task(
            _call(stack, "DELETE", f"/webhooks/{webhook['id']}?force=true")
        )
        await asyncio.sleep(0.5)
        release.set()
        await asyncio.wait_for(writing, 30)
        status, _ = await asyncio.wait_for(deleting, 30)
        assert status == 204
        async with stack.api.engine.connect() as conn:
            left = (
                await conn.execute(
                    select(tables.deliveries.c.id).where(
                        tables.deliveries.c.webhook_id == webhook["id"]
                    )
                )
            ).all()
        assert left == []


async def test_a_delivery_re_sent_many_times_shows_its_latest_attempts(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each re-send adds an attempt: shown with its delivery (one or in a list), only the
    latest are read, oldest first, and ``attempt_count`` gives them all."""
    monkeypatch.setattr(delivery_log, "ATTEMPTS_SHOWN", 3)
    webhook = await _unreachable_webhook(stack)
    attempts = [_attempt(stack, "msg_resent", n, webhook["id"]) for n in range(1, 6)]
    async with stack.api.engine.begin() as conn:
        await delivery_log.record_attempts(conn, attempts)
    status, shown = await _call(stack, "GET", "/deliveries/msg_resent")
    assert status == 200, shown
    assert shown["attempt_count"] == 5
    assert [a["attempt"] for a in shown["attempts"]] == [3, 4, 5]
    status, listed = await _call(stack, "GET", f"/webhooks/{webhook['id']}/deliveries")
    assert status == 200, listed
    [delivery] = listed["data"]
    assert [a["attempt"] for a in delivery["attempts"]] == [3, 4, 5]


async def test_a_replay_of_failed_ones_includes_those_skipped_while_the_webhook_was_off(
    stack: Stack,
) -> None:
    """Deliveries retrying when their webhook was disabled (days of failures, a 410) are
    skipped at their turn; turned back on, the webhook's owner re-sends what was not
    delivered, and those are among it. Delivered ones are not."""
    webhook = await _unreachable_webhook(stack)
    outcomes = {"msg_was_off": "skipped", "msg_went": "delivered", "msg_broke": "failed"}
    attempts = []
    for delivery_id, outcome in outcomes.items():
        attempt = _attempt(stack, delivery_id, 1, webhook["id"])
        attempts.append(attempt.model_copy(update={"outcome": outcome, "final": True}))
    async with stack.api.engine.begin() as conn:
        await delivery_log.record_attempts(conn, attempts)
    published = deliveries._publish
    sent: list[str] = []

    async def noted(ctx: Any, chosen: Any) -> None:
        sent.extend(delivery.id for delivery in chosen)
        await published(ctx, chosen)

    replay = f"/webhooks/{webhook['id']}/replay"
    before = (utcnow() - timedelta(minutes=1)).isoformat()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(deliveries, "_publish", noted)
        status, answer = await _call(
            stack, "POST", replay, json={"since": before, "only_failed": True}
        )
    assert (status, answer["replayed"]) == (202, 2), answer
    assert sorted(sent) == ["msg_broke", "msg_was_off"]


async def test_the_log_of_a_webhook_neither_live_nor_trashed_is_plainly_not_found(
    api_stack: Stack,
) -> None:
    """Listing a webhook's log asks nothing of the trash: a webhook never made, or deleted
    for good, is "not found", not "not found in the trash"."""
    webhook = await _unreachable_webhook(api_stack)
    assert (await _call(api_stack, "DELETE", f"/webhooks/{webhook['id']}?force=true"))[0] == 204
    for webhook_id in ("wh_nope", webhook["id"]):
        status, body = await _call(api_stack, "GET", f"/webhooks/{webhook_id}/deliveries")
        assert (status, body["error"]["message"]) == (404, f"webhook {webhook_id} not found")


async def test_a_webhooks_own_log_says_why_it_takes_no_webhook_id(api_stack: Stack) -> None:
    """The webhook is the one in the path: a webhook_id given too is refused with a reason
    saying so, not pydantic's "Input should be None"."""
    webhook = await _unreachable_webhook(api_stack)
    status, body = await _call(
        api_stack,
        "GET",
        f"/webhooks/{webhook['id']}/deliveries",
        params={"webhook_id": webhook["id"]},
    )
    assert status == 422, body
    assert body["error"]["details"] == [
        {
            "field": "webhook_id",
            "reason": "the webhook is the one in the path; leave webhook_id out"
            " (it narrows the team-wide /deliveries list)",
        }
    ]


async def test_a_retry_refuses_fields_it_does_not_take(api_stack: Stack) -> None:
    """A retry takes no field: a body with one is a 422 naming it, re-sending nothing and
    taking no attempt number; no body, or {}, re-sends."""
    webhook = await _unreachable_webhook(api_stack)
    async with api_stack.api.engine.begin() as conn:
        await delivery_log.record_attempts(
            conn, [_attempt(api_stack, "msg_retried", 1, webhook["id"])]
        )
    published = deliveries._publish
    sent: list[str] = []

    async def noted(ctx: Any, chosen: Any) -> None:
        sent.extend(delivery.id for delivery in chosen)
        await published(ctx, chosen)

    retry = "/deliveries/msg_retried/retry"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(deliveries, "_publish", noted)
        for body, field in (({"x": 1}, "x"), ({"attempt": 5}, "attempt"), ([1], "body")):
            status, answer = await _call(api_stack, "POST", retry, json=body)
            assert status == 422, (body, answer)
            assert answer["error"]["code"] == "validation_failed"
            assert [d["field"] for d in answer["error"]["details"]] == [field], answer
        assert sent == []
        status, shown = await _call(api_stack, "GET", "/deliveries/msg_retried")
        assert (status, shown["attempt_count"]) == (200, 1)
        status, answer = await _call(api_stack, "POST", retry)
        assert (status, answer) == (202, {"delivery_id": "msg_retried", "attempt": 2})
        status, answer = await _call(api_stack, "POST", retry, json={})
        assert (status, answer) == (202, {"delivery_id": "msg_retried", "attempt": 3})
    assert sent == ["msg_retried", "msg_retried"]
