"""Record contracts: strict decoding, with reasons for what is wrong."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
import pytest
from aiokafka import ConsumerRecord

from services.shared import (
    MAX_RECORD_BYTES,
    Attempt,
    DeadLetter,
    Event,
    InvalidRecord,
    Topics,
    dead_letter_record,
    decode,
    utcnow,
)
from services.shared._contracts import MAX_REASON_CHARS

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
        # RFC 3339 times carry their offset; without one the time is not definite.
        (orjson.dumps({**VALID, "occurred_at": "2026-01-01T00:00:00"}), "timezone"),
        (orjson.dumps({**VALID, "data": [1, 2]}), "data"),
        # Decoding is strict: what a producer sent is refused, not rewritten.
        (orjson.dumps({**VALID, "occurred_at": 1_700_000_000}), "occurred_at"),
        (orjson.dumps({**VALID, "occurred_at": "1700000000"}), "occurred_at"),
        (orjson.dumps({**VALID, "version": "5"}), "version"),
        (orjson.dumps({**VALID, "version": 5.0}), "version"),
        (orjson.dumps({**VALID, "version": True}), "version"),
        (orjson.dumps({**VALID, "schema": True}), "schema"),
        (orjson.dumps({**VALID, "schema": 1.0}), "schema"),
    ],
)
def test_invalid_records_say_why(raw: bytes | None, fragment: str) -> None:
    """Bad JSON, unknown schema versions, unknown types and missing fields are refused."""
    with pytest.raises(InvalidRecord) as caught:
        decode(Event, raw)
    assert fragment in caught.value.message.lower()


def _attempt_fields(**fields: object) -> dict[str, object]:
    """An attempt record's fields, as JSON has them, around the valid event."""
    event = decode(Event, orjson.dumps(VALID))
    return {
        "delivery_id": "msg_1",
        "event_id": event.id,
        "webhook_id": "wh_1",
        "team_id": "team_1",
        "attempt": 1,
        "attempted_at": "2026-01-01T00:00:00Z",
        "event": orjson.loads(event.to_bytes()),
        **fields,
    }


def test_an_attempt_time_without_an_offset_is_refused() -> None:
    """The delivery log orders attempts by time: one without an offset cannot be compared
    with the others (it would stop the log's writer at the first comparison)."""
    attempt = _attempt_fields(outcome="delivered", final=True)
    assert decode(Attempt, orjson.dumps(attempt)).attempted_at.tzinfo is not None
    with pytest.raises(InvalidRecord) as caught:
        decode(Attempt, orjson.dumps({**attempt, "attempted_at": "2026-01-01T00:00:00"}))
    assert caught.value.message.startswith("attempted_at: Input should have timezone info")


@pytest.mark.parametrize(
    "fields",
    [{"final": False}, {"final": True, "next_retry_at": "2026-01-01T00:10:00Z"}],
    ids=["no next_retry_at", "final"],
)
def test_a_put_off_says_when_the_delivery_goes_next(fields: dict[str, object]) -> None:
    """A deferred record without its time, or final, would list a delivery waiting for
    nothing: refused (dead-lettered with the reason by the log's writer)."""
    put_off = _attempt_fields(outcome="deferred")
    waiting = {**put_off, "final": False, "next_retry_at": "2026-01-01T00:10:00Z"}
    assert decode(Attempt, orjson.dumps(waiting)).state == "pending"
    assert decode(Attempt, orjson.dumps({**waiting, "attempt": 2})).state == "retrying"
    with pytest.raises(InvalidRecord) as caught:
        decode(Attempt, orjson.dumps({**put_off, **fields}))
    assert "a deferred attempt has a next_retry_at and is not final" in caught.value.message


def test_a_dead_letter_always_fits_a_record() -> None:
    """A near-limit record escaped once more as the payload string would pass the broker's
    limit (and stop its partition for good): the payload is cut and the reason says so."""
    payload = '{"data": "' + '\\"' * 600_000 + '"}'  # quotes: each one escapes to two bytes
    letter = DeadLetter(
        reason="gone: attempt 1 ended with HTTP 410",
        source_topic="hookwire.deliveries",
        payload=payload,
        at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    value = letter.to_bytes()
    assert len(value) <= MAX_RECORD_BYTES
    decoded = orjson.loads(value)
    assert payload.startswith(decoded["payload"])
    assert len(decoded["payload"]) > 100_000
    assert decoded["reason"].startswith("gone: attempt 1 ended with HTTP 410 (payload cut to")
    small = letter.model_copy(update={"payload": "{}"})
    assert orjson.loads(small.to_bytes())["reason"] == "gone: attempt 1 ended with HTTP 410"


def test_a_dead_letter_of_bytes_that_are_not_text_keeps_them_and_still_fits() -> None:
    """Not UTF-8: the bytes go whole, in base64 (as text, invalid bytes were replaced and
    the original lost); cut to fit a record, what is kept still decodes to their start."""
    raw = bytes(range(256)) * 4000  # 1,024,000 bytes, 0xff among them
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        "hookwire.events", 0, 9, 0, 0, None, raw, None, 1, len(raw), []
    )
    _, _, value = dead_letter_record(Topics(), record, "not an event")
    assert len(value) <= MAX_RECORD_BYTES
    letter = orjson.loads(value)
    assert letter["payload_encoding"] == "base64"
    kept = base64.b64decode(letter["payload"], validate=True)
    assert raw.startswith(kept)
    assert len(kept) > 500_000
    assert letter["reason"].startswith("not an event (payload cut to")
    tiny: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        "hookwire.events", 0, 10, 0, 0, None, b"\xff\x00", None, 1, 2, []
    )
    _, _, small = dead_letter_record(Topics(), tiny, "not an event")
    assert base64.b64decode(orjson.loads(small)["payload"]) == b"\xff\x00"


def test_an_attempt_at_the_event_limit_always_fits_a_record() -> None:
    """The largest event, 20 KB of headers and a 64 KB binary answer (each control byte
    escaped to six) would pass the broker's limit: the answer is cut to fit."""
    event = decode(Event, orjson.dumps({**VALID, "data": {"x": "a" * 899_000}}))
    answer = "\x00" * 65_536
    attempt = Attempt(
        delivery_id="msg_1",
        event_id=event.id,
        webhook_id="wh_1",
        team_id="team_1",
        attempt=1,
        attempted_at=datetime(2026, 1, 1, tzinfo=UTC),
        outcome="failed",
        final=False,
        event=event,
        request_headers={f"x-h{n}": "v" * 1000 for n in range(20)},
        response_body=answer,
    )
    value = attempt.to_bytes()
    assert len(value) <= MAX_RECORD_BYTES
    decoded = decode(Attempt, value)
    assert decoded.response_body is not None
    assert answer.startswith(decoded.response_body)
    assert len(decoded.response_body) > 10_000
    assert decoded.event == event
    small = attempt.model_copy(update={"response_body": "ok"})
    assert decode(Attempt, small.to_bytes()).response_body == "ok"


def test_a_dead_letter_leaves_out_a_key_too_large_to_travel_with_it() -> None:
    """An outside producer's key of hundreds of kilobytes, next to a payload of up to a
    megabyte, would make a dead letter the broker refuses for good."""
    topics = Topics("hw.")
    value = b"x" * 100

    def record(key: bytes) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord("hw.events", 0, 5, 0, 0, key, value, None, len(key), 100, [])

    topic, key, letter = dead_letter_record(topics, record(b"k" * 200_000), "not json")
    assert (topic, key) == (topics.dead_letter, None)
    assert orjson.loads(letter)["reason"] == "not json (its key of 200000 bytes left out)"
    _, kept, _ = dead_letter_record(topics, record(b"k" * 1024), "not json")
    assert kept == b"k" * 1024


def test_a_record_wrong_in_many_places_gets_a_short_reason_and_dead_letter() -> None:
    """Ten errors are named and the rest counted: a reason of megabytes would make a dead
    letter the broker refuses, and stop the consumer that writes it."""
    raw = orjson.dumps(
        {**VALID, "data": {"a": 1}, "id": 5, "type": 6, "team_id": 7}
        | {f"extra_{n}": n for n in range(50_000)}
    )
    with pytest.raises(InvalidRecord) as caught:
        decode(Event, raw)
    assert len(caught.value.message) <= MAX_REASON_CHARS
    assert caught.value.message.endswith("more")
    letter = DeadLetter(reason="x" * 3_000_000, source_topic="t", payload=raw.decode(), at=utcnow())
    value = letter.to_bytes()
    assert len(value) <= MAX_RECORD_BYTES
    assert len(orjson.loads(value)["reason"]) < MAX_REASON_CHARS + 200


def test_a_cut_reason_keeps_the_notes_at_its_end() -> None:
    """A dead letter's own notes (a key left out) come after the reason they follow."""
    record = ConsumerRecord("t.events", 0, 3, 0, 0, b"k" * 5_000, b"{}", None, 1, 2, [])
    reason = "x" * 5_000
    [_, key, value] = dead_letter_record(Topics("t."), record, reason)
    written = orjson.loads(value)["reason"]
    assert key is None
    assert written.endswith("(its key of 5000 bytes left out)")
    assert "(5033 characters in all)" in written
    assert len(written) < MAX_REASON_CHARS + 100
