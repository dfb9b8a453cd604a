"""The dispatcher's lag loop outlives a rebalance that lands while it waits."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError

from services.dispatcher import app as dispatcher_app
from services.dispatcher.app import DispatcherService
from services.dispatcher.offsets import OffsetTracker
from services.shared import create_engine, load_settings


class RebalancedWhileAsked:
    """Like the client: asking about a partition no longer owned fails. Each position()
    wait ends with the other partitions moved to another process."""

    def __init__(self) -> None:
        self.assigned = {TopicPartition("events", 0), TopicPartition("events", 1)}

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def position(self, partition: TopicPartition) -> int:
        if partition not in self.assigned:
            raise IllegalStateError(f"{partition} is not assigned")
        await asyncio.sleep(0)
        self.assigned = {partition}
        return 5

    def highwater(self, partition: TopicPartition) -> int:
        assert partition in self.assigned, "not assigned"
        return 8


class Unassigned:
    def assignment(self) -> set[TopicPartition]:
        return set()


class Reading:
    """A consumer owning one partition: it reads from ``position``, the log ends at
    ``highwater``."""

    def __init__(self, partition: TopicPartition, position: int, highwater: int) -> None:
        self.partition, self._position, self._highwater = partition, position, highwater

    def assignment(self) -> set[TopicPartition]:
        return {self.partition}

    async def position(self, partition: TopicPartition) -> int:
        return self._position

    def highwater(self, partition: TopicPartition) -> int:
        return self._highwater


def test_a_partition_nothing_was_read_from_has_no_lag_of_the_trackers_own() -> None:
    """Fetched, then paused before its records were handed over (a full backlog), it has a
    high-water mark and nothing tracked: not 0 behind, but unknown to the tracker."""
    partition = TopicPartition("deliveries", 2)
    tracker = OffsetTracker()
    assert tracker.lag(Reading(partition, 0, 5_000)) == {}  # type: ignore[arg-type]
    tracker.add(partition, 40)
    assert tracker.lag(Reading(partition, 41, 5_000)) == {partition: 4_960}  # type: ignore[arg-type]


async def test_an_unread_delivery_partition_reports_its_lag_from_its_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its lanes have read nothing of it yet: the lag is what lies between where its
    consumer reads next and the end of the log."""
    monkeypatch.setattr(dispatcher_app, "_LAG_SECONDS", 0.01)
    engine = create_engine("sqlite+aiosqlite://")
    service = DispatcherService(load_settings(service_credential="x", token_pepper="y"), engine)
    deliverer = Reading(TopicPartition("deliveries", 3), 1_000, 4_500)
    loop = asyncio.create_task(
        service._measure_lag_forever(Unassigned(), deliverer, Unassigned())  # type: ignore[arg-type]
    )
    try:
        await asyncio.sleep(0.2)
        lag = service.metrics.registry.get_sample_value(
            "hookwire_dispatcher_consumer_lag", {"topic": "deliveries", "partition": "3"}
        )
        assert lag == 3_500
    finally:
        loop.cancel()
        await engine.dispose()


async def test_a_rebalance_during_the_lag_reading_does_not_end_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatcher_app, "_LAG_SECONDS", 0.01)
    engine = create_engine("sqlite+aiosqlite://")
    service = DispatcherService(load_settings(service_credential="x", token_pepper="y"), engine)
    consumer = RebalancedWhileAsked()
    loop = asyncio.create_task(
        service._measure_lag_forever(consumer, Unassigned(), Unassigned())  # type: ignore[arg-type]
    )
    try:
        await asyncio.sleep(0.2)
        assert not loop.done(), loop.exception() if loop.done() else None
        [kept] = consumer.assigned
        lag = service.metrics.registry.get_sample_value(
            "hookwire_dispatcher_consumer_lag",
            {"topic": kept.topic, "partition": str(kept.partition)},
        )
        assert lag == 3
    finally:
        loop.cancel()
        await engine.dispose()
