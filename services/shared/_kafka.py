"""Kafka clients built one way for every service, and the topic layout they rely on.

Settings chosen for both real Kafka and the embedded broker: idempotence stays off (the
embedded broker rejects it; every consumer de-duplicates by id instead), new groups start
from ``earliest`` (``latest`` is unreliable there), and commits are always explicit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from ._contracts import Topics
from ._errors import DependencyUnavailable
from ._settings import Settings

RETRY_TIERS = 7
_TOPIC_EXISTS = 36


def topics_for(settings: Settings) -> Topics:
    return Topics(settings.topic_prefix)


def topic_layout(settings: Settings) -> dict[str, int]:
    """Topic name → partition count; fan-out topics get the configured parallelism."""
    topics = topics_for(settings)
    wide = settings.kafka_partitions
    layout = {
        topics.events: wide,
        topics.deliveries: wide,
        topics.attempts: wide,
        topics.dead_letter: 1,
        topics.changes: 1,
        topics.audit: 1,
    }
    layout.update({topics.retry(tier): wide for tier in range(1, RETRY_TIERS + 1)})
    return layout


def bootstrap_servers(settings: Settings) -> str:
    if not settings.kafka_bootstrap:
        raise DependencyUnavailable("HOOKWIRE_KAFKA_BOOTSTRAP is not set and no broker was started")
    return settings.kafka_bootstrap


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": 2,
        "request_timeout_ms": 10_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    settings: Settings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "max_poll_records": 500,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def _unreachable(settings: Settings, exc: Exception) -> DependencyUnavailable:
    return DependencyUnavailable(f"Kafka is unreachable at {settings.kafka_bootstrap}: {exc}")


async def start_client(client: AIOKafkaProducer | AIOKafkaConsumer, settings: Settings) -> None:
    try:
        await client.start()
    except (KafkaError, OSError) as exc:
        await stop_client(client)
        raise _unreachable(settings, exc) from exc


async def ensure_topics(settings: Settings, layout: dict[str, int] | None = None) -> None:
    """Create missing topics; an existing topic is not an error."""
    wanted = layout if layout is not None else topic_layout(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers(settings), request_timeout_ms=10_000
    )
    try:
        await admin.start()
    except (KafkaError, OSError) as exc:
        await admin.close()
        raise _unreachable(settings, exc) from exc
    try:
        response = await admin.create_topics(
            [
                NewTopic(name, partitions, settings.kafka_replication_factor)
                for name, partitions in wanted.items()
            ]
        )
        failed = [
            (topic, code)
            for topic, code, *_ in response.topic_errors
            if code not in (0, _TOPIC_EXISTS)
        ]
        if failed:
            raise DependencyUnavailable(f"could not create Kafka topics: {failed}")
    finally:
        await admin.close()


async def send_all(
    producer: AIOKafkaProducer, records: Iterable[tuple[str, bytes | None, bytes]]
) -> None:
    """Send (topic, key, value) records and wait until the broker acknowledged each one."""
    futures = [await producer.send(topic, value=value, key=key) for topic, key, value in records]
    if futures:
        await asyncio.gather(*futures)


async def stop_client(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Close a client even when the broker is gone.

    With the broker down, aiokafka's own fetch tasks can surface a CancelledError out of
    ``stop()``; that must not abort a shutdown, unless this task itself is being cancelled.
    """
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except KafkaError as exc:
        structlog.get_logger().warning("kafka_client_stop_failed", error=str(exc))
