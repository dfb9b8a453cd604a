"""A cluster that lost its topics (a broker back without its data): no client of ours
makes one again with the broker's defaults, a write to one fails rather than being taken
into a topic nothing reads, and a running service stops so that it starts again on the
topics `hookwire topics` makes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
import structlog
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.shared import (
    DependencyUnavailable,
    EmbeddedBroker,
    Metrics,
    Settings,
    ensure_topics,
    make_producer,
    start_client,
    stop_client,
    topics_for,
    watch_topics,
)
from services.shared import _kafka as kafka_module
from tests.conftest import stack_on_own_broker


async def _topics(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return {
            name for name in await admin.list_topics() if name.startswith(settings.topic_prefix)
        }
    finally:
        await admin.close()


async def _delete(settings: Settings, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


async def test_a_write_to_a_missing_topic_fails_and_creates_none(settings: Settings) -> None:
    """The broker, asked by aiokafka as it asks by default, made the topic with its own
    partition count and took the record: acknowledged, and read by nothing."""
    producer = make_producer(settings, request_timeout_ms=3000)
    await start_client(producer, settings)
    try:
        with pytest.raises(KafkaError):
            await producer.send_and_wait(f"{settings.topic_prefix}events", b"{}")
    finally:
        await stop_client(producer)
    assert await _topics(settings) == set()


async def test_the_topic_watch_ends_once_a_topic_is_gone(settings: Settings) -> None:
    """A warning at the first check that misses it, the error (which stops the process)
    at the second; a broker answering with the topics keeps it going, each answer
    marked as the time Kafka last answered."""
    await ensure_topics(settings)
    topics = topics_for(settings)
    producer = make_producer(settings)
    metrics = Metrics("test")
    await start_client(producer, settings)
    try:
        with structlog.testing.capture_logs() as logs:
            watch = asyncio.create_task(
                watch_topics(
                    producer, settings, [topics.events, topics.changes], metrics, every=0.3
                )
            )
            await asyncio.sleep(1.0)
            assert not watch.done()
            answered = metrics.registry.get_sample_value(
                "hookwire_test_kafka_answered_timestamp_seconds"
            )
            assert answered is not None
            assert time.time() - 0.5 < answered <= time.time()
            await _delete(settings, topics.events)
            with pytest.raises(DependencyUnavailable) as ended:
                await asyncio.wait_for(watch, 15)
    finally:
        await stop_client(producer)
    assert f"no longer has topic {topics.events} " in str(ended.value)
    assert "run `hookwire topics`" in str(ended.value)
    warned = [e for e in logs if e["event"] == "kafka_topics_missing"]
    assert warned
    assert warned[0]["topics"] == [topics.events]
    assert topics.events not in await _topics(settings)


async def test_a_change_on_a_broker_back_without_its_topics_is_undone_with_a_503(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker comes back empty on the same address: the api's write of the event
    made `events` with the broker's defaults and was acknowledged, an object created
    whose event nothing would ever read. Once the api's topic check has seen the topics
    gone (every 15 s, here every 0.2 s) its writes fail: 503, the object not kept, no
    topic made."""
    monkeypatch.setattr(kafka_module, "TOPIC_WATCH_SECONDS", 0.2)
    again: EmbeddedBroker | None = None
    try:
        async with stack_on_own_broker(settings, publish_timeout_seconds=3.0) as running:
            stack, broker = running
            url = f"{stack.api_url}/v1/teams/{stack.team_id}/objects/contact"
            async with stack.session.post(url, json={"v": 1}, headers=stack.headers()) as kept:
                assert kept.status == 201
            broker.stop()
            again = EmbeddedBroker(port=broker.port)
            again.start()
            await again.wait_ready()
            # The check has seen the topics gone (a loop that ends stops nothing here).
            # A write before that, to the old broker's partitions, is one Kafka refuses
            # (an unknown topic) and the embedded broker takes into nothing.
            await asyncio.sleep(1.0)
            async with stack.session.post(url, json={"v": 2}, headers=stack.headers()) as lost:
                assert lost.status == 503, await lost.text()
                assert (await lost.json())["error"]["code"] == "publish_unavailable"
            async with stack.session.get(url, headers=stack.headers()) as listed:
                assert [item["data"] for item in (await listed.json())["data"]] == [{"v": 1}]
            assert await _topics(stack.settings) == set()
    finally:
        if again is not None:
            again.stop()


async def test_a_topic_answered_with_another_error_is_not_lost(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A topic the broker names with an error of its own (not authorised after an ACL
    change, a leader being elected) is there: the watch goes on, and its clients say
    what is wrong. Taken for a lost topic, it stopped the process blaming the broker's
    data."""
    await ensure_topics(settings)
    topics = topics_for(settings)
    producer = make_producer(settings)
    await start_client(producer, settings)
    real_send = producer.client.send
    asked: list[int] = []

    async def troubled(node: int, request: Any, **kwargs: Any) -> Any:
        answer = await real_send(node, request, **kwargs)
        asked.append(node)
        # Error 29: topic authorisation failed; 5: leader not available.
        answer.topics = [
            (29 if n % 2 else 5, name, *rest) for n, (_, name, *rest) in enumerate(answer.topics)
        ]
        return answer

    monkeypatch.setattr(producer.client, "send", troubled)
    try:
        watch = asyncio.create_task(
            watch_topics(
                producer, settings, [topics.events, topics.changes], Metrics("t"), every=0.1
            )
        )
        await asyncio.sleep(1.0)
        assert len(asked) >= 3, "the watch asked"
        assert not watch.done()
        watch.cancel()
    finally:
        await stop_client(producer)


async def test_the_admin_client_asking_for_a_topic_creates_none(settings: Settings) -> None:
    """The admin client builds its own metadata requests: asked about a topic by name, it
    had the broker create it too."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(KafkaError):
            await admin.describe_topics([f"{settings.topic_prefix}asked"])
    finally:
        await admin.close()
    assert await _topics(settings) == set()
