"""The dispatcher's lag loop outlives a rebalance that lands while it waits."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError

from services.dispatcher import app as dispatcher_app
from services.dispatcher.app import DispatcherService
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


async def test_a_rebalance_during_the_lag_reading_does_not_end_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatcher_app, "_LAG_SECONDS", 0.01)
    engine = create_engine("sqlite+aiosqlite://")
    service = DispatcherService(load_settings(service_credential="x", token_pepper="y"), engine)
    consumer = RebalancedWhileAsked()
    loop = asyncio.create_task(service._measure_lag_forever(consumer))  # type: ignore[arg-type]
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
