"""Dispatchers as real processes: killed with SIGKILL mid-flight, and two sharing the work."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from services.shared import (
    Settings,
    free_port,
    make_consumer,
    make_producer,
    send_all,
    start_client,
    stop_client,
    topics_for,
)
from tests.conftest import Receiver, Stack, running_stack
from tests.samples import sample_event

HOOKWIRE = str(Path(sys.executable).parent / "hookwire")


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Stack]:
    """Auth and api in the test; dispatchers are started as processes by each test."""
    async with running_stack(settings, with_dispatcher=False) as running:
        yield running


# Of a child's stderr, what a failing test prints.
_LOG_TAIL_LINES = 60


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def dispatcher_process(settings: Settings) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A dispatcher process; its stderr goes to a file (a pipe nobody reads would block a
    chatty child once full), whose tail is printed when the test fails inside the block."""
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
    descriptor, name = tempfile.mkstemp(
        prefix="dispatcher-", suffix=".stderr", dir=settings.data_dir
    )
    log = Path(name)
    # The child holds its own copy of the descriptor; ours is not needed past the start.
    with os.fdopen(descriptor, "wb") as stderr:
        process = subprocess.Popen(
            [HOOKWIRE, "dispatcher"], env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    failed = False
    try:
        yield process, port
    except BaseException:
        failed = True
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if failed:
            # Read once the process is gone: its last words are in the file by then.
            # Printed, pytest shows it with the failure.
            print(
                f"--- dispatcher pid {process.pid} (exit {process.returncode}), "
                f"last {_LOG_TAIL_LINES} lines of stderr ---\n{_tail(log)}"
            )


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


async def _committed(group: AIOKafkaConsumer, topic: str, partitions: int) -> list[int]:
    """The group's commit point on each of ``topic``'s partitions (0: none yet)."""
    return [await group.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)]


def _dispatcher_group(settings: Settings, loop: str) -> AIOKafkaConsumer:
    """A consumer that only reads the commit points of one of the dispatcher's groups
    (``router``, ``delivery``): it never subscribes, so it never joins the group."""
    return make_consumer(settings, group_id=f"{settings.topic_prefix}dispatcher.{loop}")


async def test_sigkill_mid_flight_loses_no_delivery(
    services: Stack, receiver: Receiver, capsys: Any
) -> None:
    stack = services
    settings = stack.settings
    topics = topics_for(settings)
    partitions = settings.kafka_partitions
    await _webhook(stack, receiver.url)
    # Answered at once, the first hundred requests came before the delivery group had
    # committed anything, and the restart replayed from offset 0. A short wait keeps
    # deliveries open while commits go on (the lanes commit every 0.1 s).
    receiver.delay_seconds = 0.02
    router_group = _dispatcher_group(settings, "router")
    delivery_group = _dispatcher_group(settings, "delivery")
    await start_client(router_group, settings)
    await start_client(delivery_group, settings)
    try:
        with dispatcher_process(settings) as (first, port):
            await _ready(stack.session, port)
            await _publish_events(stack, 1000)
            # The kill lands once every event is routed (a replayed routing would make
            # duplicates that say nothing of the delivery group's resume) and the delivery
            # group has committed part of the deliveries, with requests still open.
            deadline = asyncio.get_running_loop().time() + 90
            while True:
                routed = sum(await _committed(router_group, topics.events, partitions))
                committed = await _committed(delivery_group, topics.deliveries, partitions)
                # At least twice the requests that can be open at once (10): the resent
                # ones, past the commit, are then fewer than those sent before the kill.
                if routed == 1000 and 20 <= sum(committed) < 1000 and receiver.open_calls:
                    break
                assert sum(committed) < 1000, "every delivery was committed before the kill"
                assert asyncio.get_running_loop().time() < deadline, (
                    f"no kill point: {routed} events routed, deliveries committed {committed}, "
                    f"{receiver.open_calls} requests open"
                )
                await asyncio.sleep(0.02)
            # Nothing awaited since the check: the requests counted open are still open.
            first.send_signal(signal.SIGKILL)
            first.wait()
            before_kill = len(receiver.received)
    finally:
        await stop_client(router_group)
        await stop_client(delivery_group)
    committed_at_kill = sum(committed)
    assert before_kill < 1000, "the kill came before the end of the run"
    # Checked inside the block: a failure prints the second process's log.
    with dispatcher_process(settings) as (_, port):
        await _ready(stack.session, port)
        distinct = await _until_distinct(receiver, 1000, within=90)
        duplicates = len(receiver.received) - len(distinct)
        with capsys.disabled():
            print(
                f"\nSIGKILL after {before_kill} requests, {committed_at_kill} deliveries "
                f"committed: 1000 of 1000 events delivered, {duplicates} duplicates"
            )
        # Every event arrived, each under one webhook-id however often it was sent.
        events = {json.loads(r.body)["id"] for r in receiver.received}
        assert events == {f"evt_bulk_{n}" for n in range(1000)}
        assert len(distinct) == 1000
        # The second process resumed from the commit, not from the start: only what was
        # sent past the commit point (and what was still open at the kill) is sent again.
        assert duplicates < before_kill, (
            f"{duplicates} duplicates, {before_kill} sent before the kill, "
            f"{committed_at_kill} committed"
        )


def _owned_deliveries(series: set[str], deliveries: str) -> set[str]:
    """Of a process's lag series, the deliveries partitions it reports (those it owns)."""
    return {
        line.removeprefix("hookwire_dispatcher_consumer_lag{")
        for line in series
        if f'topic="{deliveries}"' in line
    }


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
    deliveries = topics_for(stack.settings).deliveries
    all_partitions = {f'partition="{p}",topic="{deliveries}"' for p in every}
    with (
        dispatcher_process(stack.settings) as (_, one),
        dispatcher_process(stack.settings) as (_, two),
    ):
        await asyncio.gather(_ready(stack.session, one), _ready(stack.session, two))
        # Ready is not yet joined: wait until each reports deliveries partitions of its
        # own. The second to report has joined a generation that counts both, so the group
        # has settled. (The first may still report a partition it lost, for a second.)
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            owned = [
                _owned_deliveries(await _lag_series(stack.session, port), deliveries)
                for port in (one, two)
            ]
            if all(owned) and owned[0] | owned[1] == all_partitions:
                break
            assert asyncio.get_running_loop().time() < deadline, f"partitions owned: {owned}"
            await asyncio.sleep(0.2)
        before = [await _delivered_by(stack.session, port) for port in (one, two)]
        wave = 100
        await _publish_events(stack, wave)
        expected = wave * webhooks
        await _until_distinct(receiver, expected, within=90)
        # A delivery is counted once its answer is in, after the receiver has it.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            after = [await _delivered_by(stack.session, port) for port in (one, two)]
            gains = [a - b for a, b in zip(after, before, strict=True)]
            if sum(gains) >= expected:
                break
            assert asyncio.get_running_loop().time() < deadline, f"delivered counts: {gains}"
            await asyncio.sleep(0.1)
        # Checked inside the block: a failure prints both processes' logs.
        # Each delivery was sent by one process only: with a group of its own, each
        # process would have sent every one.
        sent = Counter(r.headers["webhook-id"] for r in receiver.received)
        assert len(sent) == expected
        twice = {webhook_id: n for webhook_id, n in sent.items() if n > 1}
        assert not twice, f"{len(twice)} of {expected} deliveries sent more than once"
        assert sum(gains) == expected, gains
        assert all(gain > 0 for gain in gains), f"one process did all the work: {gains}"


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
