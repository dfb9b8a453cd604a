"""Reading back, on the real broker, the first attempts another dispatcher put off
(decision 54): from the retry group's commit point to the end, for the partitions taken
over, first attempts only."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.dispatcher.put_offs import read_put_offs
from services.shared import (
    Delivery,
    Settings,
    ensure_topics,
    make_consumer,
    make_producer,
    partition_of,
    start_client,
    stop_client,
    topics_for,
    utcnow,
)
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
