"""Publishing events directly, with Idempotency-Key."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict
from sqlalchemy import insert, select, update
from sqlalchemy.exc import OperationalError

from services.api import events
from services.api.context import CONTEXT
from services.api.errors import PublishUnavailable
from services.shared import tables, utcnow
from tests.conftest import Receiver, Stack, published_events
from tests.integration._inputs import EMPTY_BODIES, NOT_JSON

EVENT = {
    "type": "object.updated",
    "object_type": "invoice",
    "object_id": "inv-42",
    "data": {"total": 12.5},
}


async def _publish(
    stack: Stack, body: Any, key: str | None = None, token: str | None = None
) -> tuple[int, Any, Any]:
    headers = stack.headers(token)
    if key is not None:
        headers["Idempotency-Key"] = key
    async with stack.session.post(
        f"{stack.api_url}/v1/teams/{stack.team_id}/events", headers=headers, json=body
    ) as response:
        return response.status, await response.json(), response.headers


async def test_published_event_is_delivered(stack: Stack, receiver: Receiver) -> None:
    """The response's id is the delivered event's id; the body is the producer's data."""
    await stack.subscribe(receiver.url)
    status, answer, _ = await _publish(stack, EVENT)
    assert status == 201
    [delivery] = await receiver.wait_for(1)
    event = orjson.loads(delivery.body)
    assert event["id"] == answer["id"]
    assert (event["type"], event["object_id"], event["data"]) == (
        "object.updated",
        "inv-42",
        {"total": 12.5},
    )
    assert event["team_id"] == stack.team_id


async def test_idempotency_key_makes_a_repeat_a_no_op(stack: Stack, receiver: Receiver) -> None:
    """The same key and body returns the first answer and publishes nothing more;
    the same key with another body is 422; another key publishes again."""
    await stack.subscribe(receiver.url)
    first = await _publish(stack, EVENT, key="order-1")
    again = await _publish(stack, EVENT, key="order-1")
    assert first[0] == again[0] == 201
    assert first[1] == again[1]
    assert again[2]["Idempotent-Replayed"] == "true"
    status, body, _ = await _publish(stack, {**EVENT, "data": {"total": 99}}, key="order-1")
    assert (status, body["error"]["code"]) == (422, "idempotency_key_reused")
    other = await _publish(stack, EVENT, key="order-2")
    assert other[1]["id"] != first[1]["id"]
    received = await receiver.wait_for(2)
    registry = stack.dispatcher.metrics.registry
    assert registry.get_sample_value("hookwire_dispatcher_events_routed_total") == 2
    assert [orjson.loads(r.body)["id"] for r in received] == [first[1]["id"], other[1]["id"]]
    published = stack.api.metrics.registry.get_sample_value(
        "hookwire_api_events_published_total", {"type": "object.updated"}
    )
    assert published == 2


def _first_publish_fails(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stream refuses the api's next publish, then takes them; returns the ids of the
    events the api tried to publish."""
    outbox = stack.api.app[CONTEXT].outbox
    real = outbox.publish_direct
    sent: list[str] = []

    async def fails_once(topic: str, key: str, record: Any) -> None:
        sent.append(record.id)
        if len(sent) == 1:
            raise PublishUnavailable("event stream is unavailable")
        await real(topic, key, record)

    monkeypatch.setattr(outbox, "publish_direct", fails_once)
    return sent


async def test_a_keyed_event_keeps_its_id_when_its_publish_failed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed publish frees its key, yet may have reached Kafka (a timeout proves
    nothing): the retry publishes the same event id, so receivers see one webhook-id."""
    sent = _first_publish_fails(stack, monkeypatch)
    status, body, _ = await _publish(stack, EVENT, key="order-9")
    assert (status, body["error"]["code"]) == (503, "publish_unavailable")
    again = await _publish(stack, EVENT, key="order-9")
    assert again[0] == 201
    assert again[1]["id"] == sent[0] == sent[1]
    assert "Idempotent-Replayed" not in again[2]
    # Another key is another event.
    status, body, _ = await _publish(stack, EVENT, key="order-10")
    assert status == 201
    assert len(set(sent)) == 2


async def test_a_key_used_again_after_its_window_publishes_a_new_event(stack: Stack) -> None:
    """The same key and body a day later (an order shipped again) is a new event: under
    the old id, receivers that de-duplicate would drop it."""
    first = await _publish(stack, EVENT, key="order-shipped")
    keys = tables.idempotency_keys
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            update(keys)
            .where(keys.c.key == "order-shipped")
            .values(created_at=utcnow() - timedelta(hours=25))
        )
    later = await _publish(stack, EVENT, key="order-shipped")
    assert first[0] == later[0] == 201
    assert "Idempotent-Replayed" not in later[2]
    assert later[1]["id"] != first[1]["id"]


async def test_a_claim_from_before_event_ids_were_stored_keeps_its_derived_id(
    stack: Stack,
) -> None:
    """A key an earlier release claimed and whose publish failed has no stored id: its
    retry publishes under the id that release derived from the team, key and body."""
    status, _, _ = await _publish(stack, EVENT, key="legacy")
    assert status == 201
    keys = tables.idempotency_keys
    async with stack.api.engine.begin() as conn:
        row = (await conn.execute(select(keys).where(keys.c.key == "legacy"))).one()
        await conn.execute(
            update(keys)
            .where(keys.c.key == "legacy")
            .values(
                event_id=None,
                status=None,
                response=None,
                created_at=utcnow() - timedelta(minutes=10),
            )
        )
    again = await _publish(stack, EVENT, key="legacy")
    assert again[0] == 201
    assert again[1]["id"] == events._keyed_event_id(stack.team_id, "legacy", row.request_hash)


async def test_a_database_failing_after_the_publish_answers_the_event(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event is in the stream; the key's answer could not be written. The caller is
    told the event's fate (201, not a 500 it would retry), and the key stays claimed
    until it is free again, when a retry goes out under the same id."""

    def database_away(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("UPDATE", {}, Exception("database is away"))

    monkeypatch.setattr(events, "update", database_away)
    status, answer, _ = await _publish(stack, EVENT, key="order-11")
    assert status == 201
    published = stack.api.metrics.registry.get_sample_value(
        "hookwire_api_events_published_total", {"type": "object.updated"}
    )
    assert published == 1
    monkeypatch.undo()
    status, body, _ = await _publish(stack, EVENT, key="order-11")
    assert (status, body["error"]["code"]) == (409, "conflict")
    keys = tables.idempotency_keys
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            update(keys)
            .where(keys.c.key == "order-11")
            .values(created_at=utcnow() - timedelta(minutes=10))
        )
    again = await _publish(stack, EVENT, key="order-11")
    assert (again[0], again[1]["id"]) == (201, answer["id"])


async def test_a_retry_with_another_body_after_a_failed_publish_is_a_new_event(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _first_publish_fails(stack, monkeypatch)
    assert (await _publish(stack, EVENT, key="order-12"))[0] == 503
    status, answer, _ = await _publish(stack, {**EVENT, "data": {"total": 1}}, key="order-12")
    assert status == 201
    assert answer["id"] == sent[1] != sent[0]
    # The key answered for the new body: the first body is now the other one.
    status, body, _ = await _publish(stack, EVENT, key="order-12")
    assert (status, body["error"]["code"]) == (422, "idempotency_key_reused")


async def test_a_request_whose_claim_was_taken_over_does_not_answer_for_the_key(
    stack: Stack,
) -> None:
    """A request stalled past the abandoned-claim wait: its key went to a retry, and the
    stalled request's late answer must not overwrite the retry's."""
    status, _, _ = await _publish(stack, EVENT, key="order-13")
    assert status == 201
    keys = tables.idempotency_keys
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            update(keys).where(keys.c.key == "order-13").values(status=None, response=None)
        )
    await events._settle(
        stack.api.engine, stack.team_id, "order-13", "evt_stalled", status=201, response={}
    )
    async with stack.api.engine.connect() as conn:
        row = (await conn.execute(select(keys).where(keys.c.key == "order-13"))).one()
    assert (row.status, row.response) == (None, None)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**EVENT, "type": "object.exploded"}, "type"),
        ({**EVENT, "object_type": "Invoice"}, "object_type"),
        ({**EVENT, "object_id": "has spaces"}, "object_id"),
        ({**EVENT, "data": [1]}, "data"),
        # No JSON reader on the way (the delivery log's, receivers') takes a larger one.
        ({**EVENT, "data": {"n": 2**64}}, "data"),
        # Written as NaN and Infinity; read, they would travel on as null.
        ({**EVENT, "data": {"n": float("nan")}}, "data"),
        ({**EVENT, "data": {"deep": [{"n": float("-inf")}]}}, "data"),
        ({**EVENT, "id": "evt_mine"}, "id"),
        ({k: v for k, v in EVENT.items() if k != "data"}, "data"),
    ],
)
async def test_bad_events_are_refused(api_stack: Stack, body: Any, field: str) -> None:
    """Unknown types, bad ids, non-object data and unknown fields are named; 422."""
    status, answer, _ = await _publish(api_stack, body)
    assert status == 422
    assert field in [d["field"] for d in answer["error"]["details"]]
    assert published_events(api_stack) == {}


@pytest.mark.parametrize("raw", [*EMPTY_BODIES, *NOT_JSON, b'{"type": "object.updated",}'])
async def test_event_bodies_that_are_not_json_are_refused(api_stack: Stack, raw: bytes) -> None:
    """422 on ``body``, and no event goes out; the key it came with stays free."""
    headers = {
        **api_stack.headers(),
        "content-type": "application/json",
        "Idempotency-Key": "raw-1",
    }
    async with api_stack.session.post(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/events", headers=headers, data=raw
    ) as response:
        assert response.status == 422
        answer = await response.json()
    assert answer["error"]["code"] == "validation_failed"
    assert [d["field"] for d in answer["error"]["details"]] == ["body"]
    assert "JSON" in answer["error"]["message"]
    assert published_events(api_stack) == {}
    status, _, headers = await _publish(api_stack, EVENT, key="raw-1")
    assert status == 201
    assert "Idempotent-Replayed" not in headers


async def test_a_refused_event_leaves_its_idempotency_key_free(api_stack: Stack) -> None:
    status, answer, _ = await _publish(api_stack, {**EVENT, "data": {"n": -(2**63) - 1}}, "k1")
    assert status == 422
    assert answer["error"]["details"][0]["reason"].endswith("integers must fit in 64 bits")
    status, _, _ = await _publish(api_stack, EVENT, key="k1")
    assert status == 201


async def test_publishing_needs_event_publish(api_stack: Stack) -> None:
    """Without event:publish the producer is forbidden, and nothing goes out."""
    token = await api_stack.new_token(["object:create"])
    status, answer, _ = await _publish(api_stack, EVENT, token=token)
    assert (status, answer["error"]["details"]) == (403, {"permission": "event:publish"})
    assert published_events(api_stack) == {}


@pytest.mark.parametrize(
    "key",
    [
        "x" * 256,
        "",
        # Inside a header value a tab reaches the route as sent (the HTTP parser takes it).
        "order\t1",
        # A control character outside ASCII (NEL): a check of ASCII controls would pass it.
        "order\x851",
    ],
    ids=["too_long", "empty", "tab", "c1_control"],
)
async def test_a_bad_idempotency_key_is_refused(api_stack: Stack, key: str) -> None:
    """Not 1 to 255 printable characters: 422 naming the header, and nothing goes out."""
    status, answer, _ = await _publish(api_stack, EVENT, key=key)
    assert status == 422, answer
    assert answer["error"] == {
        "code": "validation_failed",
        "message": "invalid header: Idempotency-Key",
        "details": [{"field": "Idempotency-Key", "reason": "1 to 255 printable characters"}],
    }
    assert published_events(api_stack) == {}
    async with api_stack.api.engine.connect() as conn:
        assert (await conn.execute(select(tables.idempotency_keys.c.key))).all() == []


async def test_oversized_event_is_refused(api_stack: Stack) -> None:
    """An event body over the limit is 413, and nothing goes out."""
    big = {**EVENT, "data": {"blob": "x" * api_stack.settings.max_body_bytes}}
    status, answer, _ = await _publish(api_stack, big)
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")
    assert published_events(api_stack) == {}


async def test_idempotency_keys_past_their_window_are_pruned(api_stack: Stack) -> None:
    """A key used once stays only its window (24 h), not for good."""
    now = utcnow()
    keys = tables.idempotency_keys
    async with api_stack.api.engine.begin() as conn:
        for key, age in (("old", timedelta(hours=25)), ("fresh", timedelta(hours=1))):
            await conn.execute(
                insert(keys).values(
                    team_id=api_stack.team_id, key=key, request_hash="h", created_at=now - age
                )
            )
    async with api_stack.api.engine.begin() as conn:
        assert await events.prune_idempotency_keys(conn, now) == 1
    async with api_stack.api.engine.connect() as conn:
        left = (await conn.execute(select(keys.c.key))).scalars().all()
    assert left == ["fresh"]


async def test_two_idempotency_keys_are_refused(api_stack: Stack) -> None:
    """The first of two was taken: a repeat of the pair replayed under one key while a
    request with the other published again. 422 naming the header, nothing out."""
    headers = CIMultiDict(api_stack.headers())
    headers.add("Idempotency-Key", "a1")
    headers.add("Idempotency-Key", "a2")
    async with api_stack.session.post(
        f"{api_stack.api_url}/v1/teams/{api_stack.team_id}/events", headers=headers, json=EVENT
    ) as response:
        assert response.status == 422
        answer = await response.json()
    assert answer["error"]["details"] == [
        {"field": "Idempotency-Key", "reason": "given 2 times: send one"}
    ]
    assert published_events(api_stack) == {}
