"""Invalid records from outside producers are dead-lettered and never stop the consumer."""

from __future__ import annotations

import orjson

from services.shared import make_consumer, make_producer
from tests.conftest import Receiver, Stack

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

    consumer = make_consumer(stack.settings, topics.dead_letter, group_id=None)
    await consumer.start()
    try:
        letters: list[dict[str, object]] = []
        while len(letters) < len(bad):
            batches = await consumer.getmany(timeout_ms=1000)
            letters.extend(orjson.loads(r.value) for b in batches.values() for r in b)
    finally:
        await consumer.stop()
    assert [letter["source_topic"] for letter in letters] == [topics.events] * 3
    reasons = [str(letter["reason"]) for letter in letters]
    assert "json" in reasons[0].lower()
    assert "schema" in reasons[1]
    assert "object_id" in reasons[2]
    assert letters[0]["payload"] == "\x00not json at all"
    registry = stack.dispatcher.metrics.registry
    value = registry.get_sample_value(
        "hookwire_dispatcher_dead_letters_total", {"reason": "invalid_record"}
    )
    assert value == 3
