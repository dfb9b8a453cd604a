"""An event too large for the records that carry it is dead-lettered by the router, and
the events behind it still flow; an attempt's record always fits the stream."""

from __future__ import annotations

import orjson

from services.shared import MAX_EVENT_BYTES, make_producer
from tests.conftest import Receiver, Stack, dead_letters

_EVENT = {
    "schema": 1,
    "type": "object.created",
    "object_type": "contact",
    "object_id": "obj_large",
    "occurred_at": "2026-01-01T00:00:00Z",
}


async def test_an_event_too_large_to_carry_is_dead_lettered_and_the_rest_flow(
    stack: Stack, receiver: Receiver
) -> None:
    await stack.subscribe(receiver.url, ["object.created"])
    large = orjson.dumps(
        {**_EVENT, "id": "evt_large", "team_id": stack.team_id, "data": {"x": "a" * 950_000}}
    )
    # Small as written, past the limit as every record that carries it would write it.
    numbers = b"[" + b",".join([b"1e15"] * 60_000) + b"]"
    growing = orjson.dumps(
        {**_EVENT, "id": "evt_growing", "team_id": stack.team_id, "data": {"x": 0}}
    ).replace(b'"x":0', b'"x":' + numbers)
    assert len(growing) < MAX_EVENT_BYTES
    fine = orjson.dumps({**_EVENT, "id": "evt_fine", "team_id": stack.team_id, "data": {}})
    producer = make_producer(stack.settings)
    await producer.start()
    try:
        for value in (large, growing, fine):
            await producer.send_and_wait(stack.dispatcher.topics.events, value=value, key=b"k")
    finally:
        await producer.stop()

    [delivered] = await receiver.wait_for(1)
    assert orjson.loads(delivered.body)["id"] == "evt_fine"
    too_large, grown = await dead_letters(stack.settings, 2)
    assert too_large["reason"] == f"the event is {len(large)} bytes, over {MAX_EVENT_BYTES}"
    assert grown["reason"].startswith("the event is ")
    assert int(grown["reason"].split()[3]) > MAX_EVENT_BYTES
