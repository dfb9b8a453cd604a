"""What the router writes when the broker refuses part of a batch: only that part again."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)

from services.dispatcher import app as dispatcher_app
from services.dispatcher import routed
from services.shared import (
    OutRecord,
    Settings,
    dead_letter_record,
    ensure_topics,
    make_producer,
    start_client,
    stop_client,
    topics_for,
)
from tests.conftest import Receiver, Stack, dead_letters, records_in, send_records, topic_records
from tests.samples import sample_event


def _source(offset: int) -> ConsumerRecord[bytes, bytes]:
    value = orjson.dumps({"event": offset})
    return ConsumerRecord("events", 0, offset, 0, 0, b"k", value, None, 1, len(value), [])


async def test_only_what_the_broker_refused_is_routed_again(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event for two webhooks: the broker takes one delivery and refuses the other for
    a moment (its partition away). The batch is routed again, but only the refused
    delivery is written again: each webhook gets the event once, not the first one twice."""
    first = await stack.subscribe(f"{receiver.url}/1")
    second = await stack.subscribe(f"{receiver.url}/2")
    real = routed.send_each
    refusals: list[bytes | None] = []

    async def refusing_once(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        refused: dict[int, BaseException] = {}
        if not refusals:
            for index, (topic, key, _) in enumerate(records):
                if topic == stack.dispatcher.topics.deliveries and key == second.encode():
                    refused[index] = KafkaTimeoutError()
                    refusals.append(key)
        taken = [record for index, record in enumerate(records) if index not in refused]
        assert not await real(producer, taken)
        return refused

    monkeypatch.setattr(routed, "send_each", refusing_once)
    await stack.create_object()
    received = await receiver.wait_for(2)
    await asyncio.sleep(1.5)  # past the router's next try of the batch
    assert refusals == [second.encode()]
    assert sorted(r.path for r in receiver.received) == ["/hook/1", "/hook/2"]
    assert len({r.headers["webhook-id"] for r in received}) == 2
    assert first != second


async def test_a_dead_letter_the_broker_refuses_goes_without_its_payload(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_topics(settings)
    topics = topics_for(settings)
    source = _source(7)
    out: list[OutRecord] = [dead_letter_record(topics, source, "not an event")]
    real = routed.send_each

    async def refusing(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        if records and orjson.loads(records[0][2])["payload"]:
            return {0: MessageSizeTooLargeError()}
        return await real(producer, records)

    monkeypatch.setattr(routed, "send_each", refusing)
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        # Already counted as a dead letter: not a second one.
        assert await routed.send_routed(producer, topics, out, [source]) == []
    finally:
        await stop_client(producer)
    [letter] = await topic_records(settings, topics.dead_letter, 1)
    assert letter["payload"] == ""
    # Why it is a dead letter stays, with why its payload was left out.
    assert letter["reason"].startswith("not an event (payload left out: the broker refused it: ")
    assert letter["source_offset"] == 7


async def test_records_refused_for_their_size_are_set_aside_together(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thirty deliveries the broker refuses for their size, even alone: each becomes a
    dead letter of its event, all of them sent at once in each step rather than one
    record after another (the retry timer does this with its turn locked)."""
    await ensure_topics(settings)
    topics = topics_for(settings)
    sources = [_source(offset) for offset in range(30)]
    out: list[OutRecord] = [
        (topics.deliveries, f"wh_{n}".encode(), b"x" * 100) for n in range(len(sources))
    ]
    real = routed.send_each
    in_flight = [0]
    most_in_flight = [0]

    async def refusing(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        in_flight[0] += 1
        most_in_flight[0] = max(most_in_flight[0], in_flight[0])
        try:
            if records[0][0] == topics.deliveries:
                await asyncio.sleep(0.01)
                return {index: MessageSizeTooLargeError() for index in range(len(records))}
            return await real(producer, records)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(routed, "send_each", refusing)
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        set_aside = await routed.send_routed(producer, topics, out, sources)
    finally:
        await stop_client(producer)
    assert sorted(source.offset for source, _ in set_aside) == list(range(30))
    assert all("for wh_" in reason and "refused by the broker" in reason for _, reason in set_aside)
    letters = await topic_records(settings, topics.dead_letter, 30)
    assert sorted(letter["source_offset"] for letter in letters) == list(range(30))
    assert most_in_flight[0] == 30


async def test_an_event_whose_deliveries_are_all_refused_makes_one_dead_letter(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event for twelve webhooks, each delivery refused for its size even alone: one
    dead letter of the event names them (one record to look into and to replay), not one
    per webhook; ten at most, and how many more."""
    await ensure_topics(settings)
    topics = topics_for(settings)
    source = _source(9)
    out: list[OutRecord] = [(topics.deliveries, f"wh_{n}".encode(), b"x" * 100) for n in range(12)]
    real = routed.send_each

    async def refusing(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        if records[0][0] == topics.deliveries:
            return {index: MessageSizeTooLargeError() for index in range(len(records))}
        return await real(producer, records)

    monkeypatch.setattr(routed, "send_each", refusing)
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        [(noted, reason)] = await routed.send_routed(producer, topics, out, [source] * 12)
    finally:
        await stop_client(producer)
    assert noted is source
    deliveries = topics.deliveries
    assert reason.startswith(f"its records for wh_0 on {deliveries}, for wh_1 on {deliveries},")
    assert f"for wh_9 on {deliveries} and 2 more are refused by the broker" in reason
    assert "wh_10" not in reason
    [letter] = await topic_records(settings, topics.dead_letter, 1)
    assert letter["source_offset"] == 9
    assert letter["reason"] == reason
    assert await records_in(settings, topics.dead_letter) == 1


async def test_a_retried_batch_back_in_parts_sends_nothing_twice(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch from two partitions is refused in part; the try after it brings back one
    partition's records only, and the other's come in a later batch: what the broker took
    of those is still not sent again."""
    await stack.subscribe(receiver.url)
    dispatcher = stack.dispatcher
    events = dispatcher.topics.events

    def event_record(partition: int, event_id: str) -> ConsumerRecord[bytes, bytes]:
        value = sample_event(id=event_id, team_id=stack.team_id).to_bytes()
        return ConsumerRecord(events, partition, 7, 0, 0, b"k", value, None, 1, len(value), [])

    first, second = event_record(0, "evt_first"), event_record(1, "evt_second")
    real = routed.send_each
    taken: list[str] = []

    async def refusing_the_first_once(
        producer: Any, records: list[OutRecord]
    ) -> dict[int, BaseException]:
        refused: dict[int, BaseException] = {}
        for index, (_, _, value) in enumerate(records):
            event_id = orjson.loads(value)["event"]["id"]
            if event_id == "evt_first" and "refused" not in taken:
                refused[index] = KafkaTimeoutError()
                taken.append("refused")
        sent = [record for index, record in enumerate(records) if index not in refused]
        taken.extend(orjson.loads(value)["event"]["id"] for _, _, value in sent)
        assert not await real(producer, sent)
        return refused

    monkeypatch.setattr(routed, "send_each", refusing_the_first_once)
    with pytest.raises(routed.Refused):
        await dispatcher._route_batch([first, second])
    await dispatcher._route_batch([first])
    await dispatcher._route_batch([second])
    assert taken == ["refused", "evt_second", "evt_first"]


async def test_a_large_fan_out_is_sent_in_parts_and_a_part_refused_alone_goes_again(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event for six webhooks, parts of about two deliveries' bytes: the batch's
    records go out in parts, no part holding much more than that (held whole, a batch of
    large events to many webhooks took a gigabyte). The broker refuses the last part
    once: the batch is routed again, and only that part is written again; each webhook
    gets the event once."""
    hooks = [await stack.subscribe(f"{receiver.url}/{n}") for n in range(6)]
    event_bytes = 3000
    monkeypatch.setattr(dispatcher_app, "_ROUTED_PART_BYTES", 2 * event_bytes)
    real = routed.send_each
    parts: list[list[bytes | None]] = []
    refused_once: list[bytes | None] = []

    async def counting(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        deliveries = [r for r in records if r[0] == stack.dispatcher.topics.deliveries]
        if deliveries:
            parts.append([key for _, key, _ in deliveries])
            assert sum(len(value) for _, _, value in deliveries) < 3 * (event_bytes + 1000)
        if len(parts) == 3 and not refused_once:
            refused_once.extend(key for _, key, _ in records)
            return {index: KafkaTimeoutError() for index in range(len(records))}
        return await real(producer, records)

    monkeypatch.setattr(routed, "send_each", counting)
    await stack.create_object({"notes": "x" * event_bytes})
    received = await receiver.wait_for(6)
    await asyncio.sleep(1.5)  # past the router's next try of the batch
    assert sorted(r.path for r in receiver.received) == sorted(f"/hook/{n}" for n in range(6))
    assert len({r.headers["webhook-id"] for r in received}) == 6
    # Three parts, then only the refused one again.
    assert len(parts) == 4
    assert parts[3] == parts[2] == refused_once
    assert sorted(key for part in parts[:3] for key in part) == sorted(h.encode() for h in hooks)


async def test_a_write_the_cluster_forbids_ends_the_router(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No permission to write ``deliveries``: the router's loop ends and ``/healthz`` names
    it, rather than routing the batch again every second for ever while the process looks
    healthy. The embedded broker has no ACLs, so the write answers as Kafka's would."""
    await stack.subscribe("http://127.0.0.1:9/hook")

    async def forbidden(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        return {index: TopicAuthorizationFailedError() for index in range(len(records))}

    monkeypatch.setattr(routed, "send_each", forbidden)
    await stack.create_object()
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with stack.session.get(f"{stack.dispatcher_url}/healthz") as response:
            status, answer = response.status, await response.json()
        if status != 200 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (status, answer["reasons"]) == (503, ["router: TopicAuthorizationFailedError"])


async def test_parts_of_a_partition_gone_since_the_batch_began_are_not_sent(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebalance whose hand-over was cut short moves the events partition while the
    batch's first part is on its way: its other parts are not sent from here (its new
    owner routes the batch from its last commit; sent late from here too, they would
    follow that owner's newer deliveries)."""
    for n in range(6):
        await stack.subscribe(f"{receiver.url}/{n}")
    event_bytes = 3000
    monkeypatch.setattr(dispatcher_app, "_ROUTED_PART_BYTES", 2 * event_bytes)
    real = routed.send_each
    parts: list[int] = []
    dispatcher = stack.dispatcher

    async def moving(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        deliveries = [r for r in records if r[0] == dispatcher.topics.deliveries]
        if deliveries:
            parts.append(len(deliveries))
            # Gone as this part is sent: the rebalance that takes it completes meanwhile.
            monkeypatch.setattr(dispatcher, "_router_assignment", set)
        return await real(producer, records)

    monkeypatch.setattr(routed, "send_each", moving)
    await stack.create_object({"notes": "x" * event_bytes})
    await receiver.wait_for(2)
    await asyncio.sleep(1.5)  # time for the other parts, had they gone
    assert parts == [2]
    assert len(receiver.received) == 2


async def test_dead_letters_weigh_toward_a_part(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad events of a few kilobytes, parts of about two of them: their dead letters go
    out in parts too (a batch of large bad records was held whole)."""
    monkeypatch.setattr(dispatcher_app, "_ROUTED_PART_BYTES", 5000)
    real = routed.send_each
    parts: list[int] = []
    topics = stack.dispatcher.topics

    async def counting(producer: Any, records: list[OutRecord]) -> dict[int, BaseException]:
        letters = [r for r in records if r[0] == topics.dead_letter]
        if letters:
            parts.append(len(letters))
        return await real(producer, records)

    monkeypatch.setattr(routed, "send_each", counting)
    # Read in one batch: the router is held back until all four are in.
    router = stack.dispatcher._consumers[0]
    held = router.assignment()
    router.pause(*held)
    await send_records(stack, topics.events, b"k", [b"{" + b"x" * 3000] * 4)
    router.resume(*held)
    letters = await dead_letters(stack.settings, 4)
    assert all(letter["payload"].startswith("{xxx") for letter in letters)
    assert parts == [2, 2]
