"""What the router writes when the broker refuses part of a batch: only that part again."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from services.dispatcher import routed
from services.shared import (
    OutRecord,
    Settings,
    ensure_topics,
    make_producer,
    start_client,
    stop_client,
    topics_for,
)
from tests.conftest import records_in, topic_records


def _source(offset: int) -> ConsumerRecord[bytes, bytes]:
    value = orjson.dumps({"event": offset})
    return ConsumerRecord("events", 0, offset, 0, 0, b"k", value, None, 1, len(value), [])


async def test_only_what_the_broker_refused_is_sent_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record refused for a moment (a partition away) is sent again alone, the records
    taken with it are not; one too large for the broker even alone becomes a dead letter
    of its event. Every record is on its topic once."""
    await ensure_topics(settings)
    topics = topics_for(settings)
    out: list[OutRecord] = [
        (topics.deliveries, f"wh_{n}".encode(), orjson.dumps({"delivery": n})) for n in range(3)
    ]
    sources = [_source(n) for n in range(3)]
    real = routed.send_each
    calls: list[list[bytes]] = []

    async def refusing(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        calls.append([value for _, _, value in records])
        refused: dict[int, BaseException] = {}
        taken: list[int] = []
        for index, (_, _, value) in enumerate(records):
            if value == orjson.dumps({"delivery": 1}) and len(calls) == 1:
                refused[index] = KafkaTimeoutError()
            elif value == orjson.dumps({"delivery": 2}):
                refused[index] = MessageSizeTooLargeError()
            else:
                taken.append(index)
        failed = await real(producer, [records[index] for index in taken])
        assert not failed
        return refused

    monkeypatch.setattr(routed, "send_each", refusing)
    monkeypatch.setattr(routed, "_SEND_AGAIN_SECONDS", 0.05)
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        letters = await routed.send_routed(producer, topics, out, sources)
    finally:
        await stop_client(producer)

    assert [(record.offset, reason.split(":")[0]) for record, reason in letters] == [
        (2, "what it became is refused by the broker")
    ]
    assert await records_in(settings, topics.deliveries) == 2
    delivered = await topic_records(settings, topics.deliveries, 2)
    assert sorted(record["delivery"] for record in delivered) == [0, 1]
    [letter] = await topic_records(settings, topics.dead_letter, 1)
    assert (letter["source_offset"], orjson.loads(letter["payload"])) == (2, {"event": 2})
    # All three; 2 alone (its batch might have been the trouble), then its dead letter;
    # a second later 1 again. Record 0 never twice.
    assert sum(orjson.dumps({"delivery": 0}) in sent for sent in calls) == 1
    assert sum(orjson.dumps({"delivery": 1}) in sent for sent in calls) == 2


async def test_a_dead_letter_the_broker_refuses_goes_without_its_payload(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_topics(settings)
    topics = topics_for(settings)
    source = _source(7)
    out: list[OutRecord] = [routed.dead_letter_record(topics, source, "not an event")]
    real = routed.send_each

    async def refusing(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        if records and orjson.loads(records[0][2])["payload"]:
            return {0: MessageSizeTooLargeError()}
        return await real(producer, records)

    monkeypatch.setattr(routed, "send_each", refusing)
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        await routed.send_routed(producer, topics, out, [source])
    finally:
        await stop_client(producer)
    [letter] = await topic_records(settings, topics.dead_letter, 1)
    assert letter["payload"] == ""
    assert letter["reason"].startswith("its dead letter is refused by the broker")
    assert letter["source_offset"] == 7
