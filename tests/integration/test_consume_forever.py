"""The batch loop every service consumes with: what it commits, and when."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CoordinatorNotAvailableError, GroupAuthorizationFailedError

from services.shared import (
    EmbeddedBroker,
    Settings,
    cancel_and_wait,
    consume_forever,
    ensure_topics,
    load_settings,
    make_consumer,
    make_producer,
    partition_of,
    send_all,
    start_client,
    stop_client,
    subscribe_handing_over,
)
from tests.conftest import drop_topics


@pytest.fixture
async def kafka_settings(broker: EmbeddedBroker) -> AsyncIterator[Settings]:
    settings = load_settings(
        kafka_bootstrap=broker.bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        kafka_partitions=1,
        kafka_session_timeout_ms=3000,
        kafka_heartbeat_interval_ms=300,
    )
    yield settings
    await drop_topics(broker.bootstrap, settings.topic_prefix)


@pytest.fixture
async def topic(kafka_settings: Settings) -> str:
    await ensure_topics(kafka_settings)
    return f"{kafka_settings.topic_prefix}events"


@pytest.fixture
async def consumer(kafka_settings: Settings, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    client = make_consumer(kafka_settings, topic, group_id=f"{kafka_settings.topic_prefix}g")
    await start_client(client, kafka_settings)
    yield client
    await stop_client(client)


async def _publish(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        await send_all(producer, [(topic, b"k", value) for value in values])
    finally:
        await stop_client(producer)


async def _until(condition: asyncio.Event) -> None:
    await asyncio.wait_for(condition.wait(), 15)


async def test_handled_batches_are_committed_together_and_on_stop(
    kafka_settings: Settings, topic: str, consumer: AIOKafkaConsumer
) -> None:
    """No commit per batch within the interval; stopping commits everything handled."""
    seen: list[bytes] = []
    all_seen = asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> None:
        seen.extend(record.value for record in records)
        if len(seen) >= 6:
            all_seen.set()

    loop = asyncio.create_task(
        consume_forever(consumer, handle, max_records=2, commit_interval_seconds=3600)
    )
    await _publish(kafka_settings, topic, [b"%d" % n for n in range(6)])
    await _until(all_seen)
    partition = TopicPartition(topic, 0)
    # Three batches of two handled, none committed yet: the interval has not passed.
    assert await consumer.committed(partition) is None
    await cancel_and_wait(loop)
    assert await consumer.committed(partition) == 6
    assert seen == [b"%d" % n for n in range(6)]


async def test_handled_offsets_are_committed_once_the_interval_passes(
    kafka_settings: Settings, topic: str, consumer: AIOKafkaConsumer
) -> None:
    """Without more records and without a stop, what was handled is committed."""

    async def handle(records: list[ConsumerRecord]) -> None:
        return None

    loop = asyncio.create_task(consume_forever(consumer, handle, commit_interval_seconds=0.2))
    try:
        await _publish(kafka_settings, topic, [b"0", b"1", b"2"])
        partition = TopicPartition(topic, 0)
        async with asyncio.timeout(15):
            # The broker is asked: no event marks a commit reaching it.
            while await consumer.committed(partition) != 3:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        await cancel_and_wait(loop)


async def test_a_failed_batch_is_handed_again_and_the_ones_before_it_are_kept(
    kafka_settings: Settings, topic: str, consumer: AIOKafkaConsumer
) -> None:
    handed: list[list[bytes]] = []
    failed_once = False
    done = asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> None:
        nonlocal failed_once
        values = [record.value for record in records]
        handed.append(values)
        if values == [b"2", b"3"] and not failed_once:
            failed_once = True
            raise RuntimeError("the database is away")
        if values[-1] == b"5":
            done.set()

    loop = asyncio.create_task(
        consume_forever(
            consumer,
            handle,
            max_records=2,
            retry_delay_seconds=0.05,
            commit_interval_seconds=3600,
        )
    )
    await _publish(kafka_settings, topic, [b"%d" % n for n in range(6)])
    await _until(done)
    partition = TopicPartition(topic, 0)
    committed_while_running = await consumer.committed(partition)
    await cancel_and_wait(loop)
    # The batch before the failure was committed when it failed, so it is not handed again.
    assert committed_while_running == 2
    assert handed == [[b"0", b"1"], [b"2", b"3"], [b"2", b"3"], [b"4", b"5"]]
    assert await consumer.committed(partition) == 6


async def test_a_failed_fetch_does_not_end_the_loop(
    kafka_settings: Settings,
    topic: str,
    consumer: AIOKafkaConsumer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A coordinator fault on a fetch (it cannot be arranged on demand on a real broker, so
    it is injected once) is waited out; the records are handled after it."""
    real_getmany = consumer.getmany
    failures = 0

    async def getmany_failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise CoordinatorNotAvailableError()
        return await real_getmany(*args, **kwargs)

    monkeypatch.setattr(consumer, "getmany", getmany_failing_once)
    seen: list[bytes] = []
    done = asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> None:
        seen.extend(record.value for record in records)
        if len(seen) >= 2:
            done.set()

    loop = asyncio.create_task(consume_forever(consumer, handle, retry_delay_seconds=0.05))
    try:
        await _publish(kafka_settings, topic, [b"0", b"1"])
        await _until(done)
    finally:
        await cancel_and_wait(loop)
    assert failures == 1
    assert seen == [b"0", b"1"]


async def test_a_refusal_no_retry_can_change_ends_the_loop(
    consumer: AIOKafkaConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group the cluster does not let this process join (the embedded broker has no
    ACLs, so Kafka's answer is injected) ends the loop with that refusal, for the process
    to fail its health check; a fault that a retry can mend does not (test above)."""

    async def refused(*_: Any, **__: Any) -> Any:
        raise GroupAuthorizationFailedError()

    async def handle(records: list[ConsumerRecord]) -> None:
        raise AssertionError("nothing is fetched")

    monkeypatch.setattr(consumer, "getmany", refused)
    with pytest.raises(GroupAuthorizationFailedError):
        await asyncio.wait_for(consume_forever(consumer, handle, retry_delay_seconds=0.05), 5)


async def test_a_slow_last_commit_is_not_cut_short_by_the_stop(
    kafka_settings: Settings,
    topic: str,
    consumer: AIOKafkaConsumer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stop cancels repeatedly; a commit slower than that (a busy coordinator, here
    delayed by a second) still completes, so a clean stop re-delivers nothing."""
    real_commit = consumer.commit

    async def slow_commit(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.0)
        return await real_commit(*args, **kwargs)

    monkeypatch.setattr(consumer, "commit", slow_commit)
    done = asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> None:
        if records[-1].value == b"2":
            done.set()

    loop = asyncio.create_task(consume_forever(consumer, handle, commit_interval_seconds=3600))
    await _publish(kafka_settings, topic, [b"0", b"1", b"2"])
    await _until(done)
    await cancel_and_wait(loop)
    assert await _committed(consumer, topic) == 3


async def test_a_stop_during_a_periodic_commit_still_commits(
    kafka_settings: Settings,
    topic: str,
    consumer: AIOKafkaConsumer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stop lands while the interval's commit is on its way (slowed by a second): the
    offsets it carried are not lost with it, the stop's last commit makes them."""
    real_commit = consumer.commit
    committing = asyncio.Event()

    async def slow_commit(*args: Any, **kwargs: Any) -> Any:
        committing.set()
        await asyncio.sleep(1.0)
        return await real_commit(*args, **kwargs)

    monkeypatch.setattr(consumer, "commit", slow_commit)

    async def handle(records: list[ConsumerRecord]) -> None:
        return None

    loop = asyncio.create_task(consume_forever(consumer, handle, commit_interval_seconds=0.1))
    await _publish(kafka_settings, topic, [b"0", b"1", b"2"])
    await _until(committing)
    await cancel_and_wait(loop)
    assert await _committed(consumer, topic) == 3


async def _committed(consumer: AIOKafkaConsumer, topic: str) -> int | None:
    return await consumer.committed(TopicPartition(topic, 0))


async def test_a_rebalance_commits_what_was_handled_and_the_batch_in_hand(
    kafka_settings: Settings,
) -> None:
    """A second member joins while the last batch is being handled: the loop finishes it
    and commits everything handled before the partitions move (the commit interval has not
    passed), so the member taking one over handles none of it again (decision 56)."""
    settings = kafka_settings.model_copy(update={"kafka_partitions": 2})
    await ensure_topics(settings)
    topic = f"{settings.topic_prefix}events"
    group = f"{settings.topic_prefix}g"
    keys = [
        next(k for k in (b"%d" % n for n in range(100)) if partition_of(k, 2) == p) for p in (0, 1)
    ]
    producer = make_producer(settings)
    await start_client(producer, settings)
    try:
        await send_all(producer, [(topic, key, b"v") for key in keys for _ in range(2)])
    finally:
        await stop_client(producer)
    first = make_consumer(settings, group_id=group)
    hand_over = subscribe_handing_over(first, settings, topic)
    await start_client(first, settings)
    handled: list[int] = []
    in_hand, release = asyncio.Event(), asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> None:
        handled.extend(record.partition for record in records)
        # The batch with the last record is held (an earlier one is handled, not committed).
        if len(handled) == 4:
            in_hand.set()
            await release.wait()

    loop = asyncio.create_task(
        consume_forever(first, handle, hand_over=hand_over, commit_interval_seconds=3600)
    )
    second = make_consumer(settings, topic, group_id=group)
    try:
        await _until(in_hand)
        commit_before_revoke = hand_over.before_revoke
        assert commit_before_revoke is not None
        revoking = asyncio.Event()

        async def noting_the_revoke(within: float) -> None:
            revoking.set()
            await commit_before_revoke(within)

        hand_over.before_revoke = noting_the_revoke
        joining = asyncio.create_task(start_client(second, settings))
        await _until(revoking)
        release.set()
        await asyncio.wait_for(joining, 30)
        assert sorted(handled) == [0, 0, 1, 1]
        partitions = [TopicPartition(topic, p) for p in (0, 1)]
        assert [await second.committed(p) for p in partitions] == [2, 2]
        assert len(second.assignment()) == 1, "the partitions were shared"
        batches = await second.getmany(timeout_ms=1000)
        assert [r for b in batches.values() for r in b] == [], "handled again"
    finally:
        release.set()
        await cancel_and_wait(loop)
        await stop_client(second)
        await stop_client(first)


async def test_a_stop_finishes_the_batch_in_hand_and_takes_no_more(
    kafka_settings: Settings, topic: str
) -> None:
    """The stop's hand-over: the batch being handled is finished and committed before the
    loop is cancelled, and what is fetched after is left for the next owner."""
    consumer = make_consumer(kafka_settings, group_id=f"{kafka_settings.topic_prefix}g")
    hand_over = subscribe_handing_over(consumer, kafka_settings, topic)
    await start_client(consumer, kafka_settings)
    handled: list[bytes] = []
    in_hand, release = asyncio.Event(), asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> None:
        in_hand.set()
        await release.wait()
        handled.extend(record.value for record in records)

    loop = asyncio.create_task(
        consume_forever(consumer, handle, hand_over=hand_over, commit_interval_seconds=3600)
    )
    try:
        await _publish(kafka_settings, topic, [b"first"])
        await _until(in_hand)
        stopping = asyncio.create_task(hand_over.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done(), "the stop did not wait for the batch in hand"
        release.set()
        await asyncio.wait_for(stopping, 10)
        partition = TopicPartition(topic, 0)
        assert await consumer.committed(partition) == 1
        await _publish(kafka_settings, topic, [b"after the stop"])
        await asyncio.sleep(1.0)
        assert handled == [b"first"]
        await cancel_and_wait(loop)
        assert await consumer.committed(partition) == 1, "committed past a record not handled"
    finally:
        release.set()
        await cancel_and_wait(loop)
        await stop_client(consumer)
