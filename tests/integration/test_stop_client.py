"""A Kafka client whose ``stop()`` fails part-way (a coordinator ending in an error, a
cancellation raised from inside, a stop that hangs) still ends every background task and
closes every connection: nothing keeps reconnecting to the broker afterwards."""

from __future__ import annotations

import asyncio
from itertools import chain
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import client as aiokafka_client
from aiokafka.client import ConnectionGroup
from aiokafka.conn import AIOKafkaConnection
from aiokafka.errors import KafkaConnectionError, KafkaError, NodeNotReadyError
from aiokafka.protocol.metadata import MetadataRequest

import services.shared._kafka as kafka_helpers
from services.shared import (
    DependencyUnavailable,
    SentUnacknowledged,
    Settings,
    cancel_and_wait,
    ensure_topics,
    make_consumer,
    make_producer,
    send_all,
    start_all,
    start_client,
    stop_client,
    topics_for,
)


@pytest.fixture(autouse=True)
async def _topics(settings: Settings) -> None:
    """The topics these clients use: no client of ours has the broker make one."""
    await ensure_topics(settings)


async def _joined_consumer(settings: Settings) -> AIOKafkaConsumer:
    topic = topics_for(settings).events
    consumer = make_consumer(settings, topic, group_id=f"{settings.topic_prefix}stopping")
    await start_client(consumer, settings)
    async with asyncio.timeout(30):
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
    return consumer


async def _assert_nothing_left(
    client: AIOKafkaConsumer | AIOKafkaProducer, tasks_before: set[asyncio.Task[Any]]
) -> None:
    inner = client._client if isinstance(client, AIOKafkaConsumer) else client.client
    # Long enough for a metadata refresh or a fetch left running to open a connection again.
    await asyncio.sleep(1.0)
    left = {task for task in asyncio.all_tasks() - tasks_before if not task.done()}
    left.discard(asyncio.current_task())  # type: ignore[arg-type]
    assert left == set()
    assert [conn for conn in inner._conns.values() if conn.connected()] == []


async def test_a_coordinator_failing_to_close_still_closes_the_consumer(
    settings: Settings,
) -> None:
    before = asyncio.all_tasks()
    consumer = await _joined_consumer(settings)
    assert any(conn.connected() for conn in consumer._client._conns.values())

    async def failing_close() -> None:
        raise KafkaConnectionError("coordinator went away")

    consumer._coordinator.close = failing_close
    await stop_client(consumer)
    await _assert_nothing_left(consumer, before)


async def test_a_cancellation_raised_inside_stop_still_closes_the_consumer(
    settings: Settings,
) -> None:
    before = asyncio.all_tasks()
    consumer = await _joined_consumer(settings)

    async def cancelled_close() -> None:
        raise asyncio.CancelledError

    consumer._coordinator.close = cancelled_close
    await stop_client(consumer)  # not this task's cancellation: the stop goes on
    await _assert_nothing_left(consumer, before)


async def test_a_producer_stop_that_hangs_is_cut_short_and_closed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = asyncio.all_tasks()
    producer = make_producer(settings)
    await start_client(producer, settings)
    await send_all(producer, [(topics_for(settings).changes, b"k", b"{}")])

    async def hanging_close() -> None:
        await asyncio.Event().wait()

    producer._sender.close = hanging_close
    monkeypatch.setattr(kafka_helpers, "_STOP_TIMEOUT_SECONDS", 0.5)
    await stop_client(producer)
    await _assert_nothing_left(producer, before)


async def test_a_start_cancelled_while_joining_its_group_leaves_nothing_running(
    settings: Settings,
) -> None:
    topic = topics_for(settings).events
    before = asyncio.all_tasks()
    consumer = make_consumer(settings, topic, group_id=f"{settings.topic_prefix}joining")

    joining = asyncio.Event()

    async def slow_join() -> None:
        joining.set()
        await asyncio.Event().wait()

    # A group join that takes its time (a rebalance elsewhere in the group) holds start().
    consumer._subscription.wait_for_assignment = slow_join
    starting = asyncio.create_task(start_client(consumer, settings))
    try:
        async with asyncio.timeout(10):
            await joining.wait()
        # Its connections open as the join goes on: the stop must close them.
        deadline = asyncio.get_running_loop().time() + 10
        while not any(conn.connected() for conn in consumer._client._conns.values()):
            assert asyncio.get_running_loop().time() < deadline, "never connected"
            await asyncio.sleep(0.01)
        starting.cancel()  # a stop signal while starting
        with pytest.raises(asyncio.CancelledError):
            await starting
        await _assert_nothing_left(consumer, before)
    finally:
        await stop_client(consumer)


async def test_a_producer_stop_cut_short_with_records_failing_to_send_ends_everything(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = asyncio.all_tasks()
    producer = make_producer(settings, retry_backoff_ms=50)
    await start_client(producer, settings)
    topic = topics_for(settings).changes
    await send_all(producer, [(topic, b"k", b"{}")])
    inner = producer.client
    real_send = inner.send

    async def metadata_never_answered(*_: Any) -> bool:
        await asyncio.Event().wait()
        return False

    async def broker_gone(node_id: int, request: Any, **kwargs: Any) -> Any:
        if type(request).__name__.startswith("ProduceRequest"):
            # The failed request waits for a metadata refresh that never comes back.
            inner._metadata_update = metadata_never_answered
            inner.force_metadata_update()
            raise KafkaConnectionError("broker gone")
        return await real_send(node_id, request, **kwargs)

    inner.send = broker_gone
    sending = asyncio.create_task(send_all(producer, [(topic, b"k", b"{}")]))
    await asyncio.sleep(0.3)  # the record is retried, again and again
    monkeypatch.setattr(kafka_helpers, "_STOP_TIMEOUT_SECONDS", 0.5)
    accumulator = producer._message_accumulator
    queued = [*chain.from_iterable(accumulator._batches.values()), *accumulator._pending_batches]
    await stop_client(producer)
    # The caller is answered, not left waiting: its record, tried again and again, may
    # have been written by a try whose answer was lost.
    with pytest.raises(SentUnacknowledged):
        await asyncio.wait_for(sending, 2)
    await _assert_nothing_left(producer, before)
    # Nor is an error left behind that nobody reads (asyncio logs it when collected).
    assert queued
    assert not any(batch._drain_waiter._log_traceback for batch in queued)


async def test_a_stopped_client_opens_no_connection_for_a_request_still_on_its_way(
    settings: Settings,
) -> None:
    producer = make_producer(settings)
    await start_client(producer, settings)
    await send_all(producer, [(topics_for(settings).changes, b"k", b"{}")])
    inner = producer.client
    node_id = next(iter(inner.cluster.brokers())).nodeId
    await stop_client(producer)
    # A task that still held the client when it stopped asks it for the broker.
    with pytest.raises(NodeNotReadyError):
        await inner.send(node_id, MetadataRequest([]))
    assert [conn for conn in inner._conns.values() if conn.connected()] == []


async def test_a_start_cancelled_while_the_broker_is_slow_to_answer_leaves_no_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off inside aiokafka's first metadata request, the start would leave that
    bootstrap connection open with nothing holding it: the start is let go on first, even
    while a stop cancels again every half second."""
    asked: list[AIOKafkaConnection] = []
    waiting = asyncio.Event()
    real_send = AIOKafkaConnection.send

    def slow_metadata(conn: AIOKafkaConnection, request: Any, **kwargs: Any) -> Any:
        if isinstance(request, MetadataRequest) and not asked:
            asked.append(conn)
            waiting.set()

            async def answered_late() -> Any:
                await asyncio.sleep(0.8)  # after the stop's second cancel
                return await real_send(conn, request, **kwargs)

            return answered_late()
        return real_send(conn, request, **kwargs)

    monkeypatch.setattr(AIOKafkaConnection, "send", slow_metadata)
    # Wide enough for a loaded machine; the answer still comes after the second cancel.
    monkeypatch.setattr(kafka_helpers, "_START_SETTLE_SECONDS", 3.0)
    producer = make_producer(settings)
    starting = asyncio.create_task(start_client(producer, settings))
    async with asyncio.timeout(10):
        await waiting.wait()
    await cancel_and_wait(starting)  # a stop while the broker has not answered yet
    assert starting.cancelled()
    assert not asked[0].connected()
    assert [conn for conn in producer.client._conns.values() if conn.connected()] == []


async def test_a_connection_being_opened_when_the_client_stops_is_closed_as_it_arrives(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = make_producer(settings)
    await start_client(producer, settings)
    inner = producer.client
    node_id = next(iter(inner.cluster.brokers())).nodeId
    opening = asyncio.Event()
    stopped = asyncio.Event()
    real_create_conn = aiokafka_client.create_conn

    async def slow_to_connect(*args: Any, **kwargs: Any) -> AIOKafkaConnection:
        opening.set()
        await stopped.wait()
        return await real_create_conn(*args, **kwargs)

    monkeypatch.setattr(aiokafka_client, "create_conn", slow_to_connect)
    # A request on its way (a coordinator lookup, say) is opening a connection.
    asking = asyncio.create_task(
        inner.send(node_id, MetadataRequest([]), group=ConnectionGroup.COORDINATION)
    )
    async with asyncio.timeout(10):
        await opening.wait()
    await stop_client(producer)
    stopped.set()
    with pytest.raises(KafkaConnectionError):
        await asking
    assert [conn for conn in inner._conns.values() if conn.connected()] == []


async def test_when_one_of_several_starts_fails_the_others_end_and_close(
    settings: Settings,
) -> None:
    before = asyncio.all_tasks()
    topic = topics_for(settings).events
    joining = make_consumer(settings, topic, group_id=f"{settings.topic_prefix}joining")
    failing = make_consumer(settings, topic, group_id=f"{settings.topic_prefix}failing")
    joined = asyncio.Event()

    async def slow_join() -> None:
        joined.set()
        await asyncio.Event().wait()

    async def failing_start() -> None:
        await joined.wait()
        raise KafkaError("the broker refused")

    joining._subscription.wait_for_assignment = slow_join
    failing.start = failing_start  # type: ignore[method-assign]
    with pytest.raises(DependencyUnavailable):
        await start_all([joining, failing], settings)
    await _assert_nothing_left(joining, before)
