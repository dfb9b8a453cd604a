"""Reading back, on the real broker, the first attempts another dispatcher put off
(decision 54): from the retry group's commit point to the end, for the partitions taken
over, first attempts only; and those already forwarded back to ``deliveries`` but not
yet sent, ahead of which a newer event may wait in the partition (decision 61)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.dispatcher.app import DispatcherService
from services.dispatcher.put_offs import read_forwarded, read_put_offs
from services.shared import (
    Delivery,
    Settings,
    ensure_topics,
    make_consumer,
    make_producer,
    partition_of,
    send_all,
    start_client,
    stop_client,
    topics_for,
    utcnow,
)
from tests.conftest import Receiver, metadata_as_kafka_answers, running_stack
from tests.samples import sample_event


def _webhooks_on(partition: int, of: int, count: int) -> list[str]:
    names = (f"wh_{n}" for n in itertools.count())
    return list(
        itertools.islice((w for w in names if partition_of(w.encode(), of) == partition), count)
    )


def _put_off(webhook_id: str, attempt: int, wakes: datetime) -> bytes:
    event = sample_event()
    delivery = Delivery(id=f"msg_{webhook_id}", webhook_id=webhook_id, attempt=attempt, event=event)
    return delivery.model_copy(update={"not_before": wakes}).to_bytes()


@pytest.fixture
async def retries(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of the retry group, as the dispatcher's retry timer is."""
    await ensure_topics(settings)
    consumer = make_consumer(settings, group_id=f"{settings.topic_prefix}dispatcher.retry")
    await start_client(consumer, settings)
    try:
        yield consumer
    finally:
        await stop_client(consumer)


async def test_put_offs_are_read_from_the_retry_groups_commit_point(
    settings: Settings, retries: AIOKafkaConsumer
) -> None:
    topic = topics_for(settings).retry(1)
    of = settings.kafka_partitions
    a, b = _webhooks_on(0, of, 2)
    [c] = _webhooks_on(1, of, 1)
    now = utcnow().replace(microsecond=0)

    def at(seconds: int) -> datetime:
        return now + timedelta(seconds=seconds)

    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        for webhook_id, attempt, wakes in [
            (a, 1, at(10)),  # below the commit point: forwarded already
            (b, 1, at(20)),
            (a, 2, at(30)),  # a retry: retries keep no order
            (b, 1, at(25)),
            (c, 1, at(40)),
        ]:
            await producer.send_and_wait(
                topic, _put_off(webhook_id, attempt, wakes), key=webhook_id.encode()
            )
    finally:
        await stop_client(producer)
    taken = TopicPartition(topic, 0)
    retries.assign([taken])
    await retries.commit({taken: 1})

    assert await read_put_offs(settings, retries, topic, {0}, of, within=10) == {b: at(25)}
    # Partition 1 has no commit point: all of it may still wait.
    both = await read_put_offs(settings, retries, topic, {0, 1}, of, within=10)
    assert both == {b: at(25), c: at(40)}
    # Deliveries spread over other partitions than the retries: every retry partition is
    # read, and only the webhooks whose deliveries are in the partitions taken over count.
    wider = of + 1
    wanted = partition_of(b.encode(), wider)
    expected = {
        w: t for w, t in ((b, at(25)), (c, at(40))) if partition_of(w.encode(), wider) == wanted
    }
    assert await read_put_offs(settings, retries, topic, {wanted}, wider, within=10) == expected


async def test_put_offs_are_read_when_the_first_metadata_names_no_topic(
    settings: Settings, retries: AIOKafkaConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on Kafka, where a client learns of a topic only by asking for it."""
    topic = topics_for(settings).retry(1)
    of = settings.kafka_partitions
    [webhook_id] = _webhooks_on(0, of, 1)
    wakes = utcnow().replace(microsecond=0) + timedelta(seconds=20)
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        await producer.send_and_wait(topic, _put_off(webhook_id, 1, wakes), key=webhook_id.encode())
    finally:
        await stop_client(producer)
    metadata_as_kafka_answers(monkeypatch, f"{settings.topic_prefix}absent")
    assert await read_put_offs(settings, retries, topic, {0}, of, within=10) == {webhook_id: wakes}


async def test_a_broker_that_does_not_answer_holds_the_partitions_only_so_long(
    settings: Settings, retries: AIOKafkaConsumer
) -> None:
    """The partitions taken over must not wait for ever: the read gives up within its
    bound, with nothing read, and the partitions go on as before."""

    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # takes every request, answers none

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    unanswered = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})
    started = time.monotonic()
    try:
        topic = topics_for(settings).retry(1)
        assert await read_put_offs(unanswered, retries, topic, {0}, 2, within=0.5) == {}
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - started < 15


async def test_put_offs_forwarded_back_are_read_from_the_delivery_groups_commit_point(
    settings: Settings,
) -> None:
    await ensure_topics(settings)
    topic = topics_for(settings).deliveries
    of = settings.kafka_partitions
    a, b, c, d = _webhooks_on(0, of, 4)
    now = utcnow()
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        for webhook_id, attempt, wakes in [
            (d, 1, now),  # below the commit point: sent already
            (b, 1, None),  # a new event: not a put-off
            (a, 1, now),
            (c, 2, now),  # a retry: retries keep no order
            (a, 1, now),
        ]:
            delivery = Delivery(
                id=f"msg_{webhook_id}", webhook_id=webhook_id, attempt=attempt, event=sample_event()
            )
            value = delivery.model_copy(update={"not_before": wakes}).to_bytes()
            await producer.send_and_wait(topic, value, key=webhook_id.encode())
    finally:
        await stop_client(producer)
    deliverer = make_consumer(settings, group_id=f"{settings.topic_prefix}dispatcher.delivery")
    await start_client(deliverer, settings)
    try:
        taken = TopicPartition(topic, 0)
        deliverer.assign([taken])
        await deliverer.commit({taken: 1})
        assert await read_forwarded(settings, deliverer, topic, {0}, of, within=10) == {a: 4}
    finally:
        await stop_client(deliverer)


async def test_put_offs_forwarded_behind_a_newer_event_are_still_sent_first(
    settings: Settings, receiver: Receiver
) -> None:
    """The old owner's circuit opened and put three first attempts off; they came back to
    ``deliveries`` after a newer event was routed there (the partition had a backlog),
    and the partition changed hands before any was sent. The new owner sends them before
    the newer event, as the old owner would have, and the event after them in turn."""
    one_at_a_time = settings.model_copy(update={"delivery_concurrency_per_endpoint": 1})
    async with running_stack(one_at_a_time, with_dispatcher=False) as stack:
        webhook_id = str((await stack.create_webhook(receiver.url, routed=False))["id"])

        def delivery(name: str, put_off: bool) -> tuple[str, bytes, bytes]:
            event = sample_event(id=f"evt_{name}", team_id=stack.team_id)
            made = Delivery(id=f"msg_{name}", webhook_id=webhook_id, attempt=1, event=event)
            if put_off:
                made = made.model_copy(update={"not_before": utcnow()})
            return (topics_for(settings).deliveries, webhook_id.encode(), made.to_bytes())

        producer = make_producer(settings)
        await start_client(producer, settings)
        try:
            await send_all(producer, [delivery("new", False)])
            await send_all(producer, [delivery(f"old{n}", True) for n in range(3)])
            await send_all(producer, [delivery("newer", False)])
        finally:
            await stop_client(producer)
        dispatcher = DispatcherService(one_at_a_time, stack.api.engine)
        await dispatcher.start()
        try:
            arrived = await receiver.wait_for(5, within=30)
        finally:
            await dispatcher.stop()
    order = [request.headers["webhook-id"] for request in arrived]
    assert order == ["msg_old0", "msg_old1", "msg_old2", "msg_new", "msg_newer"]
