"""Invalid records from outside producers are dead-lettered and never stop the consumer."""

from __future__ import annotations

import orjson

from services.shared import make_producer
from tests.conftest import Receiver, Stack, dead_letters

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
    ]
    producer = make_producer(stack.settings)
    await producer.start()
    try:
        for value in bad:
            await producer.send_and_wait(topics.events, value=value, key=b"same-partition")
        await producer.send_and_wait(
            topics.events,
            value=orjson.dumps({**GOOD, "team_id": stack.team_id}),
            key=b"same-partition",
        )
    finally:
        await producer.stop()

    [delivery] = await receiver.wait_for(1)
    assert orjson.loads(delivery.body)["id"] == "evt_external_1"

    letters = await dead_letters(stack.settings, len(bad))
    assert [letter["source_topic"] for letter in letters] == [topics.events] * 4
    reasons = [str(letter["reason"]) for letter in letters]
    assert "json" in reasons[0].lower()
    assert "schema" in reasons[1]
    assert "object_id" in reasons[2]
    assert reasons[3] == "data: Value error, integers must fit in 64 bits"
    assert letters[0]["payload"] == "\x00not json at all"
    registry = stack.dispatcher.metrics.registry
    value = registry.get_sample_value(
        "hookwire_dispatcher_dead_letters_total", {"reason": "invalid_record"}
    )
    assert value == 4


async def test_a_delivery_outside_its_contract_is_dead_lettered_before_any_post(
    stack: Stack, receiver: Receiver
) -> None:
    """A delivery whose id the delivery log could not store is refused when read, rather
    than sent and then left without an attempt record."""
    webhook_id = (await stack.create_webhook(receiver.url, ["object.created"]))["id"]
    event = {**GOOD, "team_id": stack.team_id}
    delivery = {"schema": 1, "webhook_id": webhook_id, "attempt": 1, "event": event}
    topics = stack.dispatcher.topics
    producer = make_producer(stack.settings)
    await producer.start()
    try:
        for delivery_id in ("msg_" + "x" * 80, "msg_within_contract"):
            await producer.send_and_wait(
                topics.deliveries,
                value=orjson.dumps({**delivery, "id": delivery_id}),
                key=webhook_id.encode(),
            )
    finally:
        await producer.stop()

    [delivered] = await receiver.wait_for(1)
    assert delivered.headers["webhook-id"] == "msg_within_contract"
    [letter] = await dead_letters(stack.settings, 1)
    assert letter["source_topic"] == topics.deliveries
    assert str(letter["reason"]).startswith("id: String should have at most 64 characters")
