"""Dispatchers as real processes: killed with SIGKILL mid-flight, and two sharing the work."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka.partitioner import DefaultPartitioner

from services.shared import Settings, free_port, make_producer, send_all, topics_for
from tests.conftest import Receiver, Stack, running_stack
from tests.samples import sample_event

HOOKWIRE = str(Path(sys.executable).parent / "hookwire")


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Stack]:
    """Auth and api in the test; dispatchers are started as processes by each test."""
    async with running_stack(settings, with_dispatcher=False) as running:
        yield running


@contextmanager
def dispatcher_process(settings: Settings) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKWIRE_")}
    env.update(
        HOOKWIRE_DATABASE_URL=settings.effective_database_url,
        HOOKWIRE_KAFKA_BOOTSTRAP=settings.kafka_bootstrap or "",
        HOOKWIRE_TOPIC_PREFIX=settings.topic_prefix,
        HOOKWIRE_KAFKA_PARTITIONS=str(settings.kafka_partitions),
        HOOKWIRE_KAFKA_SESSION_TIMEOUT_MS="3000",
        HOOKWIRE_KAFKA_HEARTBEAT_INTERVAL_MS="300",
        HOOKWIRE_DISPATCHER_PORT=str(port),
        HOOKWIRE_ALLOW_PRIVATE_URLS="true",
        HOOKWIRE_SERVICE_CREDENTIAL="test-service-credential",
        HOOKWIRE_TOKEN_PEPPER="test-pepper",
        HOOKWIRE_LOG_FORMAT="json",
        HOOKWIRE_LOG_LEVEL="warning",
    )
    process = subprocess.Popen(
        [HOOKWIRE, "dispatcher"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()


async def _ready(session: aiohttp.ClientSession, port: int, within: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert asyncio.get_running_loop().time() < deadline, "dispatcher never became ready"
        await asyncio.sleep(0.2)


async def _webhook(stack: Stack, url: str) -> str:
    # The dispatchers are other processes: nothing here to wait on for routing.
    webhook = await stack.create_webhook(url, ["object.created"], routed=False)
    return str(webhook["id"])


async def _publish_events(stack: Stack, count: int, first: int = 0) -> None:
    """As an external producer would: the event envelope straight onto the events topic."""
    producer = make_producer(stack.settings)
    await producer.start()
    try:
        records = []
        for n in range(first, first + count):
            event = sample_event(
                id=f"evt_bulk_{n}",
                team_id=stack.team_id,
                object_id=f"c{n}",
                occurred_at=datetime.now(UTC),
                data={"n": n},
            )
            records.append((topics_for(stack.settings).events, event.id.encode(), event.to_bytes()))
        await send_all(producer, records)
    finally:
        await producer.stop()


async def _until_distinct(receiver: Receiver, count: int, within: float) -> set[str]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        distinct = {r.headers["webhook-id"] for r in receiver.received}
        if len(distinct) >= count:
            return distinct
        assert asyncio.get_running_loop().time() < deadline, (
            f"only {len(distinct)} of {count} distinct deliveries arrived"
        )
        await asyncio.sleep(0.1)


async def _delivered_by(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('hookwire_dispatcher_deliveries_total{outcome="delivered"}'):
            return float(line.split()[-1])
    return 0.0


async def _lag_series(session: aiohttp.ClientSession, port: int) -> set[str]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    prefix = "hookwire_dispatcher_consumer_lag{"
    return {line.split("}")[0] for line in text.splitlines() if line.startswith(prefix)}


async def test_sigkill_mid_flight_loses_no_delivery(
    services: Stack, receiver: Receiver, capsys: Any
) -> None:
    stack = services
    await _webhook(stack, receiver.url)
    with dispatcher_process(stack.settings) as (first, port):
        await _ready(stack.session, port)
        await _publish_events(stack, 1000)
        await receiver.wait_for(100, within=60)
        first.send_signal(signal.SIGKILL)
        first.wait()
        before_kill = len(receiver.received)
    assert before_kill < 1000, "the kill came before the end of the run"
    with dispatcher_process(stack.settings) as (_, port):
        await _ready(stack.session, port)
        distinct = await _until_distinct(receiver, 1000, within=90)
    duplicates = len(receiver.received) - len(distinct)
    with capsys.disabled():
        print(
            f"\nSIGKILL after {before_kill} requests: 1000 of 1000 events delivered, "
            f"{duplicates} duplicates"
        )
    # Every event arrived, each under one webhook-id however often it was sent.
    events = {json.loads(r.body)["id"] for r in receiver.received}
    assert events == {f"evt_bulk_{n}" for n in range(1000)}
    assert len(distinct) == 1000


async def test_two_processes_share_the_partitions(services: Stack, receiver: Receiver) -> None:
    stack = services
    # Deliveries are keyed by webhook id: add webhooks until their keys cover both partitions.
    every = list(range(stack.settings.kafka_partitions))
    partitions: set[int] = set()
    webhooks = 0
    while len(partitions) < len(every):
        webhook_id = await _webhook(stack, f"{receiver.url}/{webhooks}")
        webhooks += 1
        partitions.add(DefaultPartitioner()(webhook_id.encode(), every, every))
        assert webhooks < 30, "webhook ids never covered both partitions"
    with (
        dispatcher_process(stack.settings) as (_, one),
        dispatcher_process(stack.settings) as (_, two),
    ):
        await asyncio.gather(_ready(stack.session, one), _ready(stack.session, two))
        # Ready is not yet joined: publish in waves until the group has settled and both
        # processes have delivered, then check that together they delivered everything.
        published = 0
        shares = [0.0, 0.0]
        while not all(shares):
            assert published < 3000, f"one process did all the work: {shares}"
            await _publish_events(stack, 100, first=published)
            published += 100
            await _until_distinct(receiver, published * webhooks, within=90)
            shares = [await _delivered_by(stack.session, port) for port in (one, two)]
    assert sum(shares) >= published * webhooks
    assert len({r.headers["webhook-id"] for r in receiver.received}) == published * webhooks


async def test_a_partition_that_moved_away_leaves_no_lag_behind(services: Stack) -> None:
    """The first process reports every partition's lag; once a second joins and takes
    some, the first stops reporting those (a frozen series would add phantom lag)."""
    stack = services

    async def lag_series_until(port: int, check: Any) -> set[str]:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            series = await _lag_series(stack.session, port)
            if check(series):
                return series
            assert asyncio.get_running_loop().time() < deadline, f"lag series: {series}"
            await asyncio.sleep(0.2)

    events = topics_for(stack.settings).events
    every = {f'partition="{p}",topic="{events}"' for p in range(stack.settings.kafka_partitions)}

    def events_series(series: set[str]) -> set[str]:
        return {line for line in series if f'topic="{events}"' in line}

    def covers_every_partition(series: set[str]) -> bool:
        return {
            line.removeprefix("hookwire_dispatcher_consumer_lag{") for line in events_series(series)
        } >= every

    with dispatcher_process(stack.settings) as (_, one):
        await _ready(stack.session, one)
        await lag_series_until(one, covers_every_partition)
        with dispatcher_process(stack.settings) as (_, two):
            await _ready(stack.session, two)
            await lag_series_until(two, lambda series: bool(events_series(series)))
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                first = events_series(await _lag_series(stack.session, one))
                second = events_series(await _lag_series(stack.session, two))
                if first and not first & second:
                    break
                assert asyncio.get_running_loop().time() < deadline, (first, second)
                await asyncio.sleep(0.2)
