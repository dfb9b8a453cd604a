"""Invalid records from outside producers are dead-lettered and never stop the consumer."""

from __future__ import annotations

import asyncio
import base64
from datetime import timedelta
from typing import Any

import orjson

from services.shared import utcnow
from tests.conftest import Receiver, Stack, dead_letters, send_records

# Not UTF-8: a dead letter keeps its bytes whole (base64), not read as text.
NOT_UTF8 = b"\xff\xfe\x00{garbage\x80"


def _assert_kept_whole(letter: dict[str, Any], raw: bytes) -> None:
    assert letter["payload_encoding"] == "base64"
    assert base64.b64decode(letter["payload"]) == raw


GOOD = {
    "schema": 1,
    "id": "evt_external_1",
    "type": "object.created",
    "object_type": "contact",
    "object_id": "obj_external_1",
    "occurred_at": "2026-01-01T00:00:00Z",
    "data": {"n": 1},
}


async def test_bad_events_go_to_dead_letter_and_good_ones_still_flow(
    stack: Stack, receiver: Receiver
) -> None:
    """Garbage, wrong schema and missing fields are dead-lettered with the reason; the
    valid event written after them by an external producer is still delivered."""
    async with stack.session.post(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks",
        headers=stack.headers(),
        json={"name": "ext", "url": receiver.url, "topics": ["object.created"]},
    ) as response:
        assert response.status == 201
        await stack.wait_for_webhook((await response.json())["id"])

    topics = stack.dispatcher.topics
    bad = [
        b"\x00not json at all",
        orjson.dumps({**GOOD, "team_id": stack.team_id, "schema": 99}),
        orjson.dumps({k: v for k, v in GOOD.items() if k != "object_id"} | {"team_id": "t"}),
        # orjson writes no integer past 64 bits; the text is what an outside producer sends.
        orjson.dumps({**GOOD, "team_id": stack.team_id}).replace(
            b'"n":1', b'"n":1180591620717411303424'
        ),
        # Read as infinity, it would be delivered as null.
        orjson.dumps({**GOOD, "team_id": stack.team_id}).replace(b'"n":1', b'"n":1e999'),
        # Seconds since 1970 and a version as text: refused, not rewritten.
        orjson.dumps({**GOOD, "team_id": stack.team_id, "occurred_at": 1_700_000_000}),
        orjson.dumps({**GOOD, "team_id": stack.team_id, "version": "5"}),
        # Not text at all, and JSON that is not an object.
        NOT_UTF8,
        b"[]",
        b"42",
        b"null",
        b'"an event"',
    ]
    good = orjson.dumps({**GOOD, "team_id": stack.team_id})
    await send_records(stack, topics.events, b"same-partition", [*bad, good])

    [delivery] = await receiver.wait_for(1)
    assert orjson.loads(delivery.body)["id"] == "evt_external_1"

    letters = await dead_letters(stack.settings, len(bad))
    assert [letter["source_topic"] for letter in letters] == [topics.events] * len(bad)
    reasons = [str(letter["reason"]) for letter in letters]
    assert "json" in reasons[0].lower()
    assert "schema" in reasons[1]
    assert "object_id" in reasons[2]
    assert reasons[3] == "data: Value error, integers must fit in 64 bits"
    assert reasons[4].startswith("data: Value error, numbers must be finite")
    assert reasons[5].startswith("occurred_at: Value error, must be an RFC 3339 time")
    assert reasons[6].startswith("version: Input should be a valid integer")
    assert letters[0]["payload"] == "\x00not json at all"
    assert "payload_encoding" not in letters[0]
    _assert_kept_whole(letters[7], NOT_UTF8)
    assert reasons[7] == "record: not UTF-8 text (byte 0xff at offset 0)"
    for letter, payload in zip(letters[8:], bad[8:], strict=True):
        assert letter["payload"] == payload.decode()
        assert letter["reason"] == "record: Input should be an object", letter
    registry = stack.dispatcher.metrics.registry
    value = registry.get_sample_value(
        "hookwire_dispatcher_dead_letters_total", {"reason": "invalid_record"}
    )
    assert value == len(bad)


async def test_an_empty_event_record_and_an_unknown_field_are_dead_lettered(
    stack: Stack, receiver: Receiver
) -> None:
    """On the events topic, a record with no value at all, one of no bytes, and an event
    with a field the contract does not know (decoding is strict): each dead-lettered with
    the reason, and the valid event written after them is still delivered."""
    await stack.create_webhook(receiver.url, ["object.created"])
    topics = stack.dispatcher.topics
    event = {**GOOD, "team_id": stack.team_id}
    await send_records(
        stack,
        topics.events,
        b"same-partition",
        [
            None,
            b"",
            orjson.dumps({**event, "id": "evt_with_colour", "colour": "red"}),
            orjson.dumps({**event, "id": "evt_after_them"}),
        ],
    )
    [delivery] = await receiver.wait_for(1)
    assert orjson.loads(delivery.body)["id"] == "evt_after_them"
    letters = await dead_letters(stack.settings, 3)
    assert [letter["source_topic"] for letter in letters] == [topics.events] * 3
    assert [letter["reason"] for letter in letters] == [
        "record has no value",
        "record value is empty (0 bytes)",
        "colour: Extra inputs are not permitted",
    ]
    assert letters[0]["payload"] == letters[1]["payload"] == ""
    assert orjson.loads(letters[2]["payload"])["id"] == "evt_with_colour"
    assert _invalid_records(stack) == 3
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 1


async def test_a_delivery_outside_its_contract_is_dead_lettered_before_any_post(
    stack: Stack, receiver: Receiver
) -> None:
    """A delivery whose id the delivery log could not store is refused when read, rather
    than sent and then left without an attempt record."""
    webhook_id = (await stack.create_webhook(receiver.url, ["object.created"]))["id"]
    event = {**GOOD, "team_id": stack.team_id}
    delivery = {"schema": 1, "webhook_id": webhook_id, "attempt": 1, "event": event}
    topics = stack.dispatcher.topics
    await send_records(
        stack,
        topics.deliveries,
        webhook_id.encode(),
        [
            orjson.dumps({**delivery, "id": delivery_id})
            for delivery_id in ("msg_" + "x" * 80, "msg_within_contract")
        ],
    )

    [delivered] = await receiver.wait_for(1)
    assert delivered.headers["webhook-id"] == "msg_within_contract"
    [letter] = await dead_letters(stack.settings, 1)
    assert letter["source_topic"] == topics.deliveries
    assert str(letter["reason"]).startswith("id: String should have at most 64 characters")


def _delivery(webhook_id: str, team_id: str, delivery_id: str, **fields: Any) -> bytes:
    event = {**GOOD, "team_id": team_id}
    record = {"schema": 1, "id": delivery_id, "webhook_id": webhook_id, "attempt": 1}
    return orjson.dumps({**record, "event": event, **fields})


async def _timer_drained(stack: Stack, within: float = 5.0) -> None:
    """Until the dispatcher's retry timer holds no record waiting, failing after ``within``
    seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while stack.dispatcher._timer is not None and stack.dispatcher._timer.pending:
        assert asyncio.get_running_loop().time() < deadline, "records left waiting"
        await asyncio.sleep(0.05)


def _invalid_records(stack: Stack) -> float | None:
    return stack.dispatcher.metrics.registry.get_sample_value(
        "hookwire_dispatcher_dead_letters_total", {"reason": "invalid_record"}
    )


async def test_a_delivery_pairing_one_teams_event_with_anothers_webhook_is_not_sent(
    stack: Stack, receiver: Receiver
) -> None:
    """Written by hand to the deliveries topic: one team's event named for another team's
    webhook. The router never pairs them; sent, the event would reach the other team's
    endpoint. It is dead-lettered, and the delivery behind it still goes."""
    webhook_id = (await stack.create_webhook(receiver.url, ["object.created"]))["id"]
    topics = stack.dispatcher.topics
    await send_records(
        stack,
        topics.deliveries,
        webhook_id.encode(),
        [
            _delivery(webhook_id, "team_someone_else", "msg_other_team"),
            _delivery(webhook_id, stack.team_id, "msg_own_team"),
        ],
    )
    [delivered] = await receiver.wait_for(1)
    assert delivered.headers["webhook-id"] == "msg_own_team"
    [letter] = await dead_letters(stack.settings, 1)
    assert letter["source_topic"] == topics.deliveries
    assert letter["reason"] == ("the event is team team_someone_else's, its webhook another team's")
    assert _invalid_records(stack) == 1
    assert len(receiver.received) == 1


async def test_unreadable_deliveries_are_dead_lettered_and_the_lane_goes_on(
    stack: Stack, receiver: Receiver
) -> None:
    """A record that is not JSON, and one with no value at all, on the deliveries topic of
    a webhook's lane: each dead-lettered as invalid; the delivery behind them is sent."""
    webhook_id = (await stack.create_webhook(receiver.url, ["object.created"]))["id"]
    topics = stack.dispatcher.topics
    await send_records(
        stack,
        topics.deliveries,
        webhook_id.encode(),
        [
            b"{not json",
            None,
            NOT_UTF8,
            b"[]",
            _delivery(webhook_id, stack.team_id, "msg_behind_them"),
        ],
    )
    [delivered] = await receiver.wait_for(1)
    assert delivered.headers["webhook-id"] == "msg_behind_them"
    letters = await dead_letters(stack.settings, 4)
    assert [letter["source_topic"] for letter in letters] == [topics.deliveries] * 4
    assert [letter["payload"] for letter in letters[:2]] == ["{not json", ""]
    assert "json" in str(letters[0]["reason"]).lower()
    assert letters[1]["reason"] == "record has no value"
    _assert_kept_whole(letters[2], NOT_UTF8)
    assert str(letters[2]["reason"]).startswith("record: not UTF-8 text")
    assert letters[3]["payload"] == "[]"
    assert letters[3]["reason"] == "record: Input should be an object"
    assert _invalid_records(stack) == 4


async def test_garbage_on_a_retry_topic_is_forwarded_then_dead_lettered(
    stack: Stack, receiver: Receiver
) -> None:
    """The retry timer reads no more of a record than its due time: garbage (no readable
    time: due now) and an empty record are forwarded at once, dead-lettered by the delivery
    lane, and the due retry written after them still arrives. Nothing stalls the timer."""
    webhook_id = (await stack.create_webhook(receiver.url, ["object.created"]))["id"]
    topics = stack.dispatcher.topics
    due = _delivery(
        webhook_id, stack.team_id, "msg_due_retry", attempt=2, not_before=utcnow().isoformat()
    )
    await send_records(
        stack, topics.retry(1), webhook_id.encode(), [b"garbage", None, NOT_UTF8, due]
    )
    [delivered] = await receiver.wait_for(1)
    assert delivered.headers["webhook-id"] == "msg_due_retry"
    letters = await dead_letters(stack.settings, 3)
    # Forwarded first, so the delivery lane is where they are found out.
    assert [letter["source_topic"] for letter in letters] == [topics.deliveries] * 3
    assert sorted(letter["payload"] for letter in letters[:2]) == ["", "garbage"]
    _assert_kept_whole(letters[2], NOT_UTF8)
    assert _invalid_records(stack) == 3
    await _timer_drained(stack)


async def test_a_retry_with_no_offset_or_due_in_centuries_is_dead_lettered_at_once(
    stack: Stack, receiver: Receiver
) -> None:
    """Written by hand to a retry topic: a ``not_before`` without a UTC offset (no time
    it can be compared with) and one further ahead than any wait the dispatcher makes.
    Neither waits in the timer (the second would hold its room for ever): both are
    forwarded at once and dead-lettered with the reason. Written straight to the
    deliveries topic, one due in two days is dead-lettered too (a delivery is read there
    once due: sent, it would skip its wait). The due retry after them arrives."""
    webhook_id = (await stack.create_webhook(receiver.url, ["object.created"]))["id"]
    topics = stack.dispatcher.topics
    retry = {"webhook_id": webhook_id, "team_id": stack.team_id, "attempt": 2}
    naive = _delivery(**retry, delivery_id="msg_naive", not_before="2026-01-01T00:00:00")
    far = _delivery(**retry, delivery_id="msg_far", not_before="2226-01-01T00:00:00Z")
    in_two_days = (utcnow() + timedelta(days=2)).isoformat()
    early = _delivery(**retry, delivery_id="msg_early", not_before=in_two_days)
    due = _delivery(**retry, delivery_id="msg_due", not_before=utcnow().isoformat())
    await send_records(stack, topics.deliveries, webhook_id.encode(), [early])
    await send_records(stack, topics.retry(1), webhook_id.encode(), [naive, far, due])
    [delivered] = await receiver.wait_for(1)
    assert delivered.headers["webhook-id"] == "msg_due"
    letters = await dead_letters(stack.settings, 3)
    assert [letter["source_topic"] for letter in letters] == [topics.deliveries] * 3
    by_id = {orjson.loads(letter["payload"])["id"]: letter["reason"] for letter in letters}
    assert "not_before" in by_id["msg_naive"]
    for delivery_id, when in (("msg_far", "2226-01-01T00:00:00+00:00"), ("msg_early", in_two_days)):
        assert by_id[delivery_id] == (
            f"not_before {when} is more than a day ahead: a delivery is read here once due"
        )
    assert _invalid_records(stack) == 3
    assert len(receiver.received) == 1
    await _timer_drained(stack)


async def test_deliveries_of_another_schema_an_unknown_field_or_attempt_0_are_dead_lettered(
    stack: Stack, receiver: Receiver
) -> None:
    """On the deliveries topic, records outside the contract: a schema version this
    dispatcher does not know, a field it does not know, and attempt 0 (attempts count
    from 1). None is sent: each is dead-lettered with the reason naming the field, and
    the delivery written after them is sent."""
    webhook_id = (await stack.create_webhook(receiver.url, ["object.created"]))["id"]
    topics = stack.dispatcher.topics
    team_id = stack.team_id
    await send_records(
        stack,
        topics.deliveries,
        webhook_id.encode(),
        [
            _delivery(webhook_id, team_id, "msg_schema_99", schema=99),
            _delivery(webhook_id, team_id, "msg_with_colour", colour="red"),
            _delivery(webhook_id, team_id, "msg_attempt_0", attempt=0),
            _delivery(webhook_id, team_id, "msg_after_them"),
        ],
    )
    [delivered] = await receiver.wait_for(1)
    assert delivered.headers["webhook-id"] == "msg_after_them"
    letters = await dead_letters(stack.settings, 3)
    assert [letter["source_topic"] for letter in letters] == [topics.deliveries] * 3
    assert [orjson.loads(letter["payload"])["id"] for letter in letters] == [
        "msg_schema_99",
        "msg_with_colour",
        "msg_attempt_0",
    ]
    assert [letter["reason"] for letter in letters] == [
        "schema: Input should be 1",
        "colour: Extra inputs are not permitted",
        "attempt: Input should be greater than or equal to 1",
    ]
    assert _invalid_records(stack) == 3
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 1
