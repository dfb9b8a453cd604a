"""Record contracts: strict decoding, with reasons for what is wrong."""

from __future__ import annotations

import orjson
import pytest

from services.shared import Event, InvalidRecord, decode

VALID = {
    "schema": 1,
    "id": "evt_1",
    "type": "object.created",
    "team_id": "team_1",
    "object_type": "contact",
    "object_id": "obj_1",
    "occurred_at": "2026-01-01T00:00:00Z",
    "data": {"a": 1},
}


def test_valid_event_round_trips() -> None:
    """Encoding then decoding gives the same event."""
    event = decode(Event, orjson.dumps(VALID))
    assert decode(Event, event.to_bytes()) == event
    assert orjson.loads(event.to_bytes())["schema"] == 1


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"not json", "json"),
        (None, "no value"),
        (orjson.dumps({**VALID, "schema": 2}), "schema"),
        (orjson.dumps({**VALID, "type": "object.exploded"}), "type"),
        (orjson.dumps({k: v for k, v in VALID.items() if k != "team_id"}), "team_id"),
        (orjson.dumps({**VALID, "surprise": True}), "surprise"),
        (orjson.dumps({**VALID, "occurred_at": "yesterday"}), "occurred_at"),
        (orjson.dumps({**VALID, "data": [1, 2]}), "data"),
    ],
)
def test_invalid_records_say_why(raw: bytes | None, fragment: str) -> None:
    """Bad JSON, unknown schema versions, unknown types and missing fields are refused."""
    with pytest.raises(InvalidRecord) as caught:
        decode(Event, raw)
    assert fragment in caught.value.message.lower()
