"""Following the changes topic: every record handled, a failed fetch survived, and knowing
when everything there at the start has been handled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError

from services.shared import (
    Change,
    ChangeFollower,
    EmbeddedBroker,
    Metrics,
    Settings,
    Topics,
    _changes,
    cancel_and_wait,
    ensure_topics,
    load_settings,
    make_patient_consumer,
    make_producer,
    send_all,
    start_client,
    stop_client,
    utcnow,
)
from services.shared._changes import follow_changes, one_at_a_time
from tests.conftest import (
    Receiver,
    Stack,
    drop_topics,
    metadata_as_kafka_answers,
    records_in,
)


@pytest.fixture
async def kafka_settings(broker: EmbeddedBroker) -> AsyncIterator[Settings]:
    settings = load_settings(
        kafka_bootstrap=broker.bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        kafka_partitions=3,
        kafka_session_timeout_ms=3000,
        kafka_heartbeat_interval_ms=300,
    )
    await ensure_topics(settings)
    yield settings
    await drop_topics(broker.bootstrap, settings.topic_prefix)


async def _publish_changes(settings: Settings, ids: list[str], key: bytes | None = None) -> None:
    producer = make_producer(settings)
    await start_client(producer, settings)
    topic = Topics(settings.topic_prefix).changes
    try:
        await send_all(
            producer,
            [
                (
                    topic,
                    key or entity_id.encode(),
                    Change(
                        entity="webhook", entity_id=entity_id, action="updated", at=utcnow()
                    ).to_bytes(),
                )
                for entity_id in ids
            ],
        )
    finally:
        await stop_client(producer)


class _FailingOnce:
    """The consumer, whose first fetch fails as when the broker connection drops."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    async def getmany(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise KafkaConnectionError("connection reset")
        return await self._consumer.getmany(*args, **kwargs)


async def test_a_failed_fetch_does_not_end_following(kafka_settings: Settings) -> None:
    consumer = make_patient_consumer(
        kafka_settings, Topics(kafka_settings.topic_prefix).changes, group_id=None
    )
    await start_client(consumer, kafka_settings)
    flaky = _FailingOnce(consumer)
    handled: list[str] = []
    following = asyncio.create_task(
        follow_changes(
            flaky,  # type: ignore[arg-type]
            one_at_a_time(lambda change: handled.append(change.entity_id)),
        )
    )
    try:
        await _publish_changes(kafka_settings, ["wh_after_failure"])
        deadline = asyncio.get_running_loop().time() + 10
        while handled != ["wh_after_failure"]:
            assert not following.done(), following.exception()
            assert asyncio.get_running_loop().time() < deadline, handled
            await asyncio.sleep(0.05)
        assert flaky.failed
    finally:
        await cancel_and_wait(following)
        await stop_client(consumer)


async def test_caught_up_only_once_every_earlier_record_is_handled(
    kafka_settings: Settings,
) -> None:
    ids = [f"wh_{n}" for n in range(60)]
    await _publish_changes(kafka_settings, ids)
    handled: list[str] = []

    async def slowly(change: Change) -> None:
        await asyncio.sleep(0.005)
        handled.append(change.entity_id)

    follower = ChangeFollower(kafka_settings, slowly)
    await follower.start()
    try:
        assert await follower.wait_caught_up(20)
        assert sorted(handled) == sorted(ids)
    finally:
        await follower.stop()


async def test_an_empty_topic_is_caught_up_at_once(kafka_settings: Settings) -> None:
    follower = ChangeFollower(kafka_settings, lambda change: None)
    await follower.start()
    try:
        started = asyncio.get_running_loop().time()
        assert await follower.wait_caught_up(10)
        assert asyncio.get_running_loop().time() - started < 8  # not the wait's 10 s
    finally:
        await follower.stop()


async def test_bad_records_and_a_failing_handler_do_not_end_following(
    kafka_settings: Settings,
) -> None:
    """Garbage, an empty record, a record outside the contract, an id no store holds (a
    NUL in it) and a change whose handler raises are each passed over, the invalid ones
    counted; the valid change written after them is still handled."""
    consumer = make_patient_consumer(
        kafka_settings, Topics(kafka_settings.topic_prefix).changes, group_id=None
    )
    await start_client(consumer, kafka_settings)
    handled: list[str] = []

    def handle(change: Change) -> None:
        handled.append(change.entity_id)
        if change.entity_id == "wh_boom":
            raise RuntimeError("the cache could not take it")

    invalid: list[None] = []
    following = asyncio.create_task(
        follow_changes(consumer, one_at_a_time(handle), on_invalid=lambda: invalid.append(None))
    )
    topic = Topics(kafka_settings.topic_prefix).changes
    change = Change(entity="webhook", entity_id="wh_boom", action="updated", at=utcnow())
    producer = make_producer(kafka_settings)
    await start_client(producer, kafka_settings)
    try:
        # One key: one partition, so the valid change comes after every bad record.
        for value in (
            b"garbage",
            None,
            orjson.dumps({**orjson.loads(change.to_bytes()), "entity": "planet"}),
            change.model_copy(update={"entity_id": "wh_\x00"}).to_bytes(),
            change.to_bytes(),
            change.model_copy(update={"entity_id": "wh_after"}).to_bytes(),
        ):
            await producer.send_and_wait(topic, value=value, key=b"same-partition")
        deadline = asyncio.get_running_loop().time() + 10
        while "wh_after" not in handled:
            assert not following.done(), following.exception()
            assert asyncio.get_running_loop().time() < deadline, handled
            await asyncio.sleep(0.05)
        assert handled == ["wh_boom", "wh_after"]
        assert len(invalid) == 4
        assert not following.done()
    finally:
        await stop_client(producer)
        await cancel_and_wait(following)
        await stop_client(consumer)


async def test_a_follower_counts_the_change_records_it_skips(kafka_settings: Settings) -> None:
    metrics = Metrics("test_follower")
    follower = ChangeFollower(kafka_settings, lambda change: None, metrics=metrics)
    await follower.start()
    producer = make_producer(kafka_settings)
    await start_client(producer, kafka_settings)
    try:
        topic = Topics(kafka_settings.topic_prefix).changes
        await producer.send_and_wait(topic, value=b"garbage", key=b"k")
        name = "hookwire_test_follower_change_records_invalid_total"
        deadline = asyncio.get_running_loop().time() + 10
        while metrics.registry.get_sample_value(name) != 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    finally:
        await stop_client(producer)
        await follower.stop()


async def test_a_follower_starts_after_the_changes_its_caches_reflect(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Days of ``changes`` are not read again at every start: reading begins at the first
    record from the given moment on, and every partition without one at its end."""
    monkeypatch.setattr(_changes, "_CLOCK_SKEW_MARGIN_MS", 0)
    older = [f"wh_old_{n}" for n in range(12)]
    for entity_id in older:  # one record per batch: the embedded broker's end is then exact
        await _publish_changes(kafka_settings, [entity_id], key=b"same-partition")
    await asyncio.sleep(0.3)
    moment_ms = int(utcnow().timestamp() * 1000)
    await asyncio.sleep(0.05)
    for entity_id in ("wh_new_1", "wh_new_2"):
        await _publish_changes(kafka_settings, [entity_id], key=b"same-partition")
    handled: list[str] = []
    follower = ChangeFollower(kafka_settings, lambda change: handled.append(change.entity_id))
    await follower.start(newer_than_ms=moment_ms)
    try:
        assert await follower.wait_caught_up(10)
        assert handled == ["wh_new_1", "wh_new_2"]
        # The other partitions, if any, are empty: they start at 0.
        assert sum(follower.started_at.values()) == max(follower.started_at.values()) == 12
    finally:
        await follower.stop()

    quiet = ChangeFollower(kafka_settings, lambda change: handled.append(change.entity_id))
    await quiet.start()  # nothing since this call: every partition starts at its end
    try:
        # With nothing to read, not even the first fetch is waited for.
        assert quiet.caught_up
        assert await quiet.wait_caught_up(10)
        assert sum(quiet.started_at.values()) == max(quiet.started_at.values()) == 14
        assert handled == ["wh_new_1", "wh_new_2"]
    finally:
        await quiet.stop()


async def test_a_follower_reads_partitions_added_after_it_started(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower is assigned its partitions by hand (so it can place them before its first
    fetch), yet a partition added to ``changes`` later is read from its start, and the
    partitions it had keep their place. The embedded broker cannot add partitions: the
    topic has two, and the follower's metadata shows only the first until the "adding"."""
    settings = kafka_settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})
    topic = Topics(settings.topic_prefix).changes
    await ensure_topics(settings, layout={topic: 2})
    monkeypatch.setattr(_changes, "_CLOCK_SKEW_MARGIN_MS", 0)
    added = asyncio.Event()
    every_partition = AIOKafkaConsumer.partitions_for_topic

    def as_before_the_adding(consumer: AIOKafkaConsumer, name: str) -> set[int] | None:
        known = every_partition(consumer, name)
        return known if added.is_set() or known is None else {0}

    monkeypatch.setattr(AIOKafkaConsumer, "partitions_for_topic", as_before_the_adding)
    every_partition_of = _changes.partitions_of

    async def start_before_the_adding(consumer: AIOKafkaConsumer, name: str) -> list[Any]:
        return (await every_partition_of(consumer, name))[:1]

    monkeypatch.setattr(_changes, "partitions_of", start_before_the_adding)
    producer = make_producer(settings)
    await start_client(producer, settings)
    handled: list[str] = []
    follower = ChangeFollower(settings, lambda change: handled.append(change.entity_id))

    async def publish(entity_id: str, partition: int) -> None:
        change = Change(entity="webhook", entity_id=entity_id, action="updated", at=utcnow())
        await producer.send_and_wait(topic, value=change.to_bytes(), partition=partition)

    async def handled_by_now(entity_id: str) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while entity_id not in handled:
            assert asyncio.get_running_loop().time() < deadline, handled
            await asyncio.sleep(0.05)

    try:
        await publish("wh_before_start", 0)
        await asyncio.sleep(0.3)
        await follower.start()
        assert follower.started_at == {0: 1}
        await publish("wh_first_partition", 0)
        await publish("wh_new_partition", 1)
        await handled_by_now("wh_first_partition")
        added.set()
        await handled_by_now("wh_new_partition")
        await publish("wh_first_partition_again", 0)
        await handled_by_now("wh_first_partition_again")
        assert handled == ["wh_first_partition", "wh_new_partition", "wh_first_partition_again"]
    finally:
        await follower.stop()
        await stop_client(producer)
        await drop_topics(settings.kafka_bootstrap or "", settings.topic_prefix)


async def test_a_follower_asks_for_its_topics_metadata(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Kafka a client's first metadata (asked for an empty list of topics) names no
    topic; the embedded broker's names them all. Made to answer like Kafka, the follower
    still finds the partitions of ``changes`` and places itself in them."""
    metadata_as_kafka_answers(monkeypatch, f"{kafka_settings.topic_prefix}absent")
    monkeypatch.setattr(_changes, "_CLOCK_SKEW_MARGIN_MS", 0)
    await _publish_changes(kafka_settings, ["wh_before_start"])
    await asyncio.sleep(0.3)
    handled: list[str] = []
    follower = ChangeFollower(kafka_settings, lambda change: handled.append(change.entity_id))
    await follower.start()
    try:
        assert follower.started_at == {0: 1}
        assert follower.caught_up
        await _publish_changes(kafka_settings, ["wh_after_start"])
        deadline = asyncio.get_running_loop().time() + 10
        while not handled:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert handled == ["wh_after_start"]
    finally:
        await follower.stop()


async def test_a_failed_look_for_new_partitions_loses_no_change(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look for partitions added to the topic comes after the fetch's changes are
    handled: when it fails, they are not lost with it."""

    async def metadata_unreadable(consumer: AIOKafkaConsumer, topic: str) -> bool:
        raise KafkaConnectionError("the broker is away")

    monkeypatch.setattr(_changes, "_take_new_partitions", metadata_unreadable)
    handled: list[str] = []
    follower = ChangeFollower(kafka_settings, lambda change: handled.append(change.entity_id))
    await follower.start()
    try:
        await _publish_changes(kafka_settings, ["wh_seen"])
        deadline = asyncio.get_running_loop().time() + 10
        while not handled:
            assert asyncio.get_running_loop().time() < deadline, "the change was lost"
            await asyncio.sleep(0.05)
        assert handled == ["wh_seen"]
        assert follower.running
    finally:
        await follower.stop()


async def test_a_change_written_after_the_start_is_handled_whatever_its_clock(
    kafka_settings: Settings,
) -> None:
    """A record's time is its producer's clock: one written after the follower started is
    handled even when that clock is a minute behind. One written before the start and
    older than it is still skipped, though it follows a newer record the start was placed
    at by time."""
    topic = Topics(kafka_settings.topic_prefix).changes
    producer = make_producer(kafka_settings)
    await start_client(producer, kafka_settings)
    handled: list[str] = []
    follower = ChangeFollower(kafka_settings, lambda change: handled.append(change.entity_id))

    async def publish(entity_id: str, *, minutes_behind: int = 0) -> None:
        change = Change(entity="webhook", entity_id=entity_id, action="updated", at=utcnow())
        timestamp_ms = int(utcnow().timestamp() * 1000) - minutes_behind * 60_000
        # One key: one partition, the records in the order sent, one batch each (the
        # embedded broker's end is then exact).
        await producer.send_and_wait(
            topic, value=change.to_bytes(), key=b"same-partition", timestamp_ms=timestamp_ms
        )

    try:
        await publish("wh_before_start")
        await publish("wh_before_start_clock_behind", minutes_behind=1)
        await follower.start()
        assert await follower.wait_caught_up(10)
        await publish("wh_after_start_clock_behind", minutes_behind=1)
        await publish("wh_after_start")
        deadline = asyncio.get_running_loop().time() + 10
        while "wh_after_start" not in handled:
            assert asyncio.get_running_loop().time() < deadline, handled
            await asyncio.sleep(0.05)
        assert handled == ["wh_before_start", "wh_after_start_clock_behind", "wh_after_start"]
    finally:
        await follower.stop()
        await stop_client(producer)


async def test_a_change_of_another_schema_is_skipped_by_every_service_and_the_next_applied(
    stack: Stack, receiver: Receiver
) -> None:
    """A change record of a schema version no process knows, on the changes topic every
    auth, api and dispatcher process reads: each logs it (``change_record_invalid``, with
    its offset and the reason), counts it and skips it, nothing dead-lettered; the change
    written after it (a new webhook) is still applied, and the event for it delivered."""
    topic = Topics(stack.settings.topic_prefix).changes
    change = Change(entity="webhook", entity_id="wh_schema_99", action="updated", at=utcnow())
    services: dict[str, Any] = {
        "auth": stack.auth,
        "api": stack.api,
        "dispatcher": stack.dispatcher,
    }
    producer = make_producer(stack.settings)
    await start_client(producer, stack.settings)
    with structlog.testing.capture_logs() as logs:
        try:
            sent = await producer.send_and_wait(
                topic,
                value=orjson.dumps({**orjson.loads(change.to_bytes()), "schema": 99}),
                key=change.entity_id.encode(),
            )
        finally:
            await stop_client(producer)
        deadline = asyncio.get_running_loop().time() + 10
        counted: dict[str, float | None] = {}
        while True:
            counted = {
                name: service.metrics.registry.get_sample_value(
                    f"hookwire_{name}_change_records_invalid_total"
                )
                for name, service in services.items()
            }
            if all(count == 1 for count in counted.values()):
                break
            assert asyncio.get_running_loop().time() < deadline, counted
            await asyncio.sleep(0.05)
    skipped = [entry for entry in logs if entry["event"] == "change_record_invalid"]
    assert len(skipped) == len(services)
    assert {entry["offset"] for entry in skipped} == {sent.offset}
    assert {entry["reason"] for entry in skipped} == {"schema: Input should be 1"}
    assert {entry["log_level"] for entry in skipped} == {"warning"}

    webhook = await stack.create_webhook(receiver.url, ["object.created"])
    assert stack.dispatcher.table.get(webhook["id"]) is not None
    for service in services.values():
        assert service._follower.running
    await stack.create_object()
    [delivery] = await receiver.wait_for(1)
    assert delivery.headers["webhook-id"].startswith("msg_")
    dead_letter = Topics(stack.settings.topic_prefix).dead_letter
    assert await records_in(stack.settings, dead_letter) == 0
