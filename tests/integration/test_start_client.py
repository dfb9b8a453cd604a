"""A Kafka client whose first connection is refused (a broker busy for a moment) starts on
a later try; one that never gets through is reported unreachable, naming the address."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from services.shared import (
    DependencyUnavailable,
    Settings,
    ensure_topics,
    free_port,
    make_consumer,
    make_producer,
    send_all,
    start_client,
    stop_client,
    topics_for,
)


@pytest.fixture(autouse=True)
async def _topics(settings: Settings) -> None:
    """The topics these clients use: no client of ours has the broker make one."""
    await ensure_topics(settings)


@pytest.mark.parametrize("kind", ["producer", "consumer"])
async def test_a_refused_first_bootstrap_is_tried_again(
    settings: Settings, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = topics_for(settings).changes
    client: Any = (
        make_producer(settings)
        if kind == "producer"
        else make_consumer(settings, topic, group_id=None)
    )
    inner = client.client if kind == "producer" else client._client
    real_bootstrap = inner.bootstrap
    refusals = [KafkaConnectionError("Unable to bootstrap (busy)")]

    async def busy_once() -> None:
        if refusals:
            raise refusals.pop()
        await real_bootstrap()

    monkeypatch.setattr(inner, "bootstrap", busy_once)
    await start_client(client, settings)
    try:
        assert not refusals
        if kind == "producer":
            await send_all(client, [(topic, b"k", b"{}")])
    finally:
        await stop_client(client)


async def test_a_broker_that_never_answers_is_named(settings: Settings) -> None:
    address = f"127.0.0.1:{free_port()}"
    nowhere = settings.model_copy(update={"kafka_bootstrap": address})
    with pytest.raises(DependencyUnavailable) as caught:
        await start_client(make_producer(nowhere), nowhere)
    assert address in caught.value.message
