"""Durable retries, back-off, dead letters, disabling, circuits and isolation of endpoints.

The retry schedule is shortened by configuration so each test takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from services.api.context import CONTEXT
from services.dispatcher import retry_timer, routed
from services.dispatcher.app import DispatcherService
from services.dispatcher.retry_timer import RetryTimer
from services.dispatcher.routing import WebhookRoute
from services.dispatcher.sender import Outcome, Sender
from services.shared import (
    RETRY_TIERS,
    Delivery,
    Event,
    Settings,
    Topics,
    bound_port,
    cancel_and_wait,
    ensure_topics,
    make_consumer,
    make_patient_consumer,
    make_producer,
    partition_of,
    send_all,
    start_client,
    start_site,
    stop_client,
    subscribe_handing_over,
    tables,
    topics_for,
    utcnow,
)
from tests.conftest import (
    Receiver,
    Stack,
    dead_letters,
    records_in,
    running_stack,
    topic_records,
)
from tests.integration.test_end_to_end import standard_webhooks_verify
from tests.samples import sample_event


@pytest.fixture
async def quick_stack(settings: Settings) -> AsyncIterator[Stack]:
    """A stack whose failed deliveries are retried after 0.2 s, three times."""
    quick = settings.model_copy(
        update={"retry_schedule_seconds": (0.2, 0.2, 0.2), "retry_jitter": 0.1}
    )
    async with running_stack(quick, with_dispatcher=True) as running:
        yield running


CREATED = ["object.created"]
CHANGES = ["object.created", "object.updated"]


async def _change(stack: Stack, object_id: str, n: int) -> None:
    """Set the object's ``n``: its events share one partition, so they keep their order."""
    async with stack.session.patch(
        f"{stack.api_url}/v1/teams/{stack.team_id}/objects/contact/{object_id}",
        headers=stack.headers(),
        json={"n": n},
    ) as response:
        assert response.status == 200, await response.text()


async def _eventually(check: Callable[[], Any], within: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _answering(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> AsyncIterator[str]:
    """A receiver answering every POST with ``handler``; yields its base URL."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = await start_site(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


async def _retry_by_hand(stack: Stack, delivery_id: str) -> None:
    """Ask the api to send the delivery again, once its log has it (404 until then)."""
    retry = f"{stack.api_url}/v1/teams/{stack.team_id}/deliveries/{delivery_id}/retry"

    async def retried() -> bool:
        async with stack.session.post(retry, headers=stack.headers()) as response:
            return response.status == 202

    await _eventually(retried)


async def _delivery(stack: Stack, delivery_id: str) -> dict[str, Any] | None:
    async with stack.session.get(
        f"{stack.api_url}/v1/teams/{stack.team_id}/deliveries/{delivery_id}",
        headers=stack.headers(),
    ) as response:
        return await response.json() if response.status == 200 else None


# The first failure opens a circuit that stays open for the test's length; retries come
# 30 s apart, after the test.
_TRIPS_AT_ONCE: dict[str, Any] = {
    "retry_schedule_seconds": (30.0,) * 10,
    "circuit_failure_threshold": 1,
    "circuit_open_seconds": 600.0,
}


def _failed(registry: Any) -> float | None:
    """The dispatcher's failed attempts so far."""
    return registry.get_sample_value("hookwire_dispatcher_deliveries_total", {"outcome": "failed"})


async def _edit_webhook(stack: Stack, webhook_id: str, body: dict[str, Any]) -> None:
    status, answer = await _webhook_call(stack, "PATCH", webhook_id, body)
    assert status == 200, answer


async def _is_disabled(stack: Stack, webhook_id: str) -> bool:
    async with stack.session.get(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook_id}",
        headers=stack.headers(),
    ) as response:
        return (await response.json())["active"] is False


async def test_fails_twice_then_delivered_with_the_same_webhook_id(
    quick_stack: Stack, receiver: Receiver
) -> None:
    stack = quick_stack
    webhook = await stack.create_webhook(receiver.url, CREATED)
    receiver.statuses = [500, 503]
    await stack.create_object()
    received = await receiver.wait_for(3)
    assert len({r.headers["webhook-id"] for r in received}) == 1
    assert len({r.body for r in received}) == 1
    for request in received:
        assert standard_webhooks_verify(webhook["secret"], request.headers, request.body)
    delivery_id = received[0].headers["webhook-id"]

    def delivered() -> Any:
        return _delivery(stack, delivery_id)

    async def done() -> dict[str, Any] | None:
        found = await delivered()
        return found if found and found["state"] == "delivered" else None

    logged = await _eventually(done)
    assert [(a["attempt"], a["status_code"]) for a in logged["attempts"]] == [
        (1, 500),
        (2, 503),
        (3, 200),
    ]
    assert [a["final"] for a in logged["attempts"]] == [False, False, True]
    assert all(a["next_retry_at"] for a in logged["attempts"][:2])
    registry = stack.dispatcher.metrics.registry
    for tier in ("1", "2"):
        assert (
            registry.get_sample_value("hookwire_dispatcher_retries_scheduled_total", {"tier": tier})
            == 1
        )
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 3, "nothing after the success"


async def _all_handled(stack: Stack) -> bool:
    """Whether the dispatcher has finished every record it was given: its delivery group
    has committed past every delivery record (each has its outcome, written before the
    commit) and its retry group past every retry record (each forwarded). Nothing is then
    left that could still call an endpoint."""
    settings = stack.settings
    topics = topics_for(settings)
    prefix = f"{settings.topic_prefix}dispatcher"
    watched = {
        f"{prefix}.delivery": [topics.deliveries],
        f"{prefix}.retry": [topics.retry(tier) for tier in range(1, RETRY_TIERS + 1)],
    }
    partitions = [
        TopicPartition(topic, p)
        for names in watched.values()
        for topic in names
        for p in range(settings.kafka_partitions)
    ]
    committed: dict[TopicPartition, int] = {}
    for group_id, names in watched.items():
        group = make_consumer(settings, group_id=group_id)
        await start_client(group, settings)
        try:
            for partition in partitions:
                if partition.topic in names:
                    committed[partition] = await group.committed(partition) or 0
        finally:
            await stop_client(group)
    # The ends are read after the commit points: an outcome (a retry) written before a
    # commit read above is counted below.
    reader = make_consumer(settings, group_id=None)
    await start_client(reader, settings)
    try:
        reader.assign(partitions)
        # The embedded broker's end_offsets() is wrong after a batch; a fetch's high-water
        # mark is right (as in records_in).
        async with asyncio.timeout(10):
            while None in (marks := [reader.highwater(p) for p in partitions]):
                await reader.getmany(timeout_ms=200)
    finally:
        await stop_client(reader)
    return all(committed[p] == mark for p, mark in zip(partitions, marks, strict=True))


async def test_always_failing_is_dead_lettered_after_the_last_attempt(
    quick_stack: Stack, receiver: Receiver
) -> None:
    stack = quick_stack
    await stack.create_webhook(receiver.url, CREATED)
    receiver.statuses = [500] * 10
    await stack.create_object()
    received = await receiver.wait_for(4)
    [letter] = await dead_letters(stack.settings, 1)
    assert letter["reason"].startswith("attempts_exhausted: attempt 4")
    assert orjson.loads(letter["payload"])["attempt"] == 4
    delivery_id = received[0].headers["webhook-id"]

    async def failed() -> dict[str, Any] | None:
        found = await _delivery(stack, delivery_id)
        return found if found and found["state"] == "failed" else None

    logged = await _eventually(failed)
    assert logged["attempt_count"] == 4
    # Once every delivery and retry record is handled, a fifth attempt (a retry written
    # beside the dead letter) would have been sent already, or would be waiting in view.
    await _eventually(lambda: _all_handled(stack), within=20)
    assert len(receiver.received) == 4, "no attempt after the last"
    registry = stack.dispatcher.metrics.registry
    assert (
        registry.get_sample_value(
            "hookwire_dispatcher_dead_letters_total", {"reason": "attempts_exhausted"}
        )
        == 1
    )


async def test_retry_after_is_honoured_as_a_floor(quick_stack: Stack) -> None:
    stack = quick_stack
    answers = [web.Response(status=429, headers={"Retry-After": "2"}), web.Response(text="ok")]
    times: list[float] = []
    arrived = asyncio.Event()

    async def limited(_: web.Request) -> web.Response:
        times.append(time.monotonic())
        arrived.set()
        return answers.pop(0)

    async with _answering(limited) as base:
        await stack.create_webhook(f"{base}/limited", CREATED)
        await stack.create_object()
        await _eventually(lambda: len(times) == 2, within=15)
    assert times[1] - times[0] >= 1.9, "the 0.2 s schedule was stretched to Retry-After"


async def test_retry_after_pauses_the_whole_endpoint(quick_stack: Stack) -> None:
    """A 429 with Retry-After: 2 pauses the endpoint, not only the delivery it answered:
    events made meanwhile are not attempted (each would use an attempt on another 429)
    until the two seconds are over, and then go out in order."""
    stack = quick_stack
    arrivals: list[tuple[float, int]] = []
    throttled = asyncio.Event()

    async def throttling(request: web.Request) -> web.Response:
        body = await request.json()
        arrivals.append((time.monotonic(), body["data"]["n"]))
        if len(arrivals) == 1:
            throttled.set()
            return web.Response(status=429, headers={"Retry-After": "2"})
        return web.Response(text="ok")

    async with _answering(throttling) as base:
        await stack.create_webhook(f"{base}/limited", CHANGES)
        object_id = await stack.create_object({"n": 0})
        await asyncio.wait_for(throttled.wait(), 15)
        for n in (1, 2, 3):
            await _change(stack, object_id, n)
        await _eventually(lambda: len(arrivals) == 5, within=20)
    paused_at = arrivals[0][0]
    assert all(at - paused_at >= 1.9 for at, _ in arrivals[1:]), arrivals
    assert [n for _, n in arrivals[1:] if n != 0] == [1, 2, 3]

    # Their attempt records say why they waited: the endpoint asked to, it is not failing.
    records = await topic_records(stack.settings, topics_for(stack.settings).attempts, 8)
    deferred = [r for r in records if r["outcome"] == "deferred"]
    # The first put off by the pause; those after it behind the first (their order).
    classes = [r["error_class"] for r in deferred]
    assert len(deferred) >= 3, records
    assert "retry_after" in classes, deferred
    assert set(classes) <= {"retry_after", "held"}, deferred


async def test_a_re_send_delivered_during_a_pause_lifts_it(quick_stack: Stack) -> None:
    """An endpoint asks for an hour of quiet (429, Retry-After: 3600); its operator fixes it
    and re-sends the delivery by hand, which is delivered: the next event goes at once
    instead of waiting out the hour."""
    stack = quick_stack
    arrivals: list[str] = []

    async def recovering(request: web.Request) -> web.Response:
        arrivals.append(request.headers["webhook-id"])
        if len(arrivals) == 1:
            return web.Response(status=429, headers={"Retry-After": "3600"})
        return web.Response(text="ok")

    async with _answering(recovering) as base:
        await stack.create_webhook(f"{base}/busy", CREATED)
        await stack.create_object()
        await _eventually(lambda: len(arrivals) == 1)
        await _retry_by_hand(stack, arrivals[0])
        await _eventually(lambda: len(arrivals) == 2)
        await stack.create_object()
        await _eventually(lambda: len(arrivals) == 3, within=15)
    assert arrivals[1] == arrivals[0], "the re-send"
    assert arrivals[2] != arrivals[0], "the next event, not held for the hour"


async def test_410_gone_disables_the_webhook_and_audits_why(
    quick_stack: Stack, receiver: Receiver
) -> None:
    stack = quick_stack
    webhook = await stack.create_webhook(receiver.url, CREATED)
    receiver.statuses = [410]
    await stack.create_object()
    await receiver.wait_for(1)

    await _eventually(lambda: _is_disabled(stack, webhook["id"]))
    status, audit = await stack.auth_call(
        "GET", f"/v1/audit-log?team_id={stack.team_id}&action=webhook.disabled"
    )
    assert status == 200
    [record] = audit["data"]
    assert record["target_id"] == webhook["id"]
    assert "410" in record["details"]["reason"]
    # The owner is told on the audit topic too, with the audit record's own id.
    [notice] = await topic_records(stack.settings, stack.dispatcher.topics.audit, 1)
    assert notice["id"] == record["id"]
    assert (notice["action"], notice["team_id"], notice["target_id"]) == (
        "webhook.disabled",
        stack.team_id,
        webhook["id"],
    )
    assert notice["details"] == record["details"]
    [letter] = await dead_letters(stack.settings, 1)
    assert letter["reason"].startswith("gone")
    await stack.create_object()
    # The later event is routed (to no webhook, or to one its handler then skips), and
    # every delivery record handled: had it been sent, the receiver would have it now.
    registry = stack.dispatcher.metrics.registry
    await _eventually(
        lambda: registry.get_sample_value("hookwire_dispatcher_events_routed_total") == 2
    )
    await _eventually(lambda: _all_handled(stack), within=20)
    assert len(receiver.received) == 1, "nothing is sent to a disabled webhook"


async def test_a_slow_endpoint_does_not_delay_a_healthy_one(
    settings: Settings, receiver: Receiver
) -> None:
    """Every delivery to the healthy endpoint is answered while the slow one, called all
    along, has answered none."""
    patient = settings.model_copy(
        update={
            "delivery_timeout_seconds": 60,
            "shutdown_grace_seconds": 0.5,
            # Both webhooks' deliveries share the one partition, every run: on separate
            # partitions (random ids, half the time) nothing of one could hold the other.
            "kafka_partitions": 1,
        }
    )
    slow = Receiver(gate=asyncio.Event())
    app = web.Application()
    app.router.add_post("/{tail:.*}", slow.handle)
    runner = await start_site(app, "127.0.0.1", 0)
    try:
        async with running_stack(patient, with_dispatcher=True) as stack:
            await stack.create_webhook(f"http://127.0.0.1:{bound_port(runner)}/slow", CREATED)
            await stack.create_webhook(receiver.url, CREATED)
            for _ in range(30):
                await stack.create_object()
            await receiver.wait_for(30, within=30)
            assert slow.received, "the slow endpoint was being called meanwhile"
            assert slow.open_calls == len(slow.received), "and has answered nothing yet"
            # Once the healthy ones have all been answered, the gauge counts exactly the
            # slow endpoint's open calls.
            registry = stack.dispatcher.metrics.registry
            await _eventually(
                lambda: (
                    registry.get_sample_value("hookwire_dispatcher_inflight_deliveries")
                    == slow.open_calls
                    > 0
                )
            )
    finally:
        assert slow.gate is not None
        slow.gate.set()
        await runner.cleanup()


async def test_an_endpoint_filling_its_partitions_share_holds_back_only_that_partition(
    settings: Settings, receiver: Receiver
) -> None:
    """The backlog bound is split between the partitions: a slow endpoint whose deliveries
    fill its partition's share stops fetching that partition, not the other one."""
    bounded = settings.model_copy(
        update={
            "delivery_backlog_max": 10,
            "delivery_concurrency_per_endpoint": 1,
            # The slow call stays open for the whole test and is not waited for at the end.
            "delivery_timeout_seconds": 60,
            "shutdown_grace_seconds": 0.5,
        }
    )
    slow = Receiver(gate=asyncio.Event())
    app = web.Application()
    app.router.add_post("/{tail:.*}", slow.handle)
    runner = await start_site(app, "127.0.0.1", 0)
    try:
        async with running_stack(bounded, with_dispatcher=True) as stack:
            slow_url = f"http://127.0.0.1:{bound_port(runner)}/slow"
            held = await stack.create_webhook(slow_url, CREATED, object_types=["slow"])
            held_partition = partition_of(held["id"].encode(), bounded.kafka_partitions)
            for number in range(20):
                healthy_type = f"fast{number}"
                healthy = await stack.create_webhook(
                    receiver.url, CREATED, object_types=[healthy_type]
                )
                if partition_of(healthy["id"].encode(), bounded.kafka_partitions) != (
                    held_partition
                ):
                    break
            else:
                pytest.fail("no webhook landed on the other partition")
            for _ in range(30):
                await stack.create_object(kind="slow")
            registry = stack.dispatcher.metrics.registry
            await _eventually(
                lambda: (
                    (registry.get_sample_value("hookwire_dispatcher_delivery_backlog") or 0) >= 5
                )
            )
            await asyncio.sleep(0.5)
            for _ in range(3):
                await stack.create_object(kind=healthy_type)
            # The slow endpoint answers nothing until the test ends: these arrive anyway.
            await receiver.wait_for(3, within=30)
            assert len(slow.received) == 1, "the slow endpoint gets one call at a time"
            # Its 30 deliveries were not all read into memory: the backlog stays in bounds.
            await _eventually(
                lambda: (
                    registry.get_sample_value("hookwire_dispatcher_delivery_backlog")
                    <= bounded.delivery_backlog_max
                )
            )
    finally:
        assert slow.gate is not None
        slow.gate.set()
        await runner.cleanup()


async def test_an_open_circuit_defers_without_calling(
    settings: Settings, receiver: Receiver
) -> None:
    tripping = settings.model_copy(
        update={
            "retry_schedule_seconds": (0.1,) * 10,
            "retry_jitter": 0.0,
            "circuit_failure_threshold": 2,
            "circuit_open_seconds": 1.5,
        }
    )
    async with running_stack(tripping, with_dispatcher=True) as stack:
        await stack.create_webhook(receiver.url, CREATED)
        receiver.statuses = [500, 500]
        await stack.create_object()
        await receiver.wait_for(2)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: registry.get_sample_value(
                "hookwire_dispatcher_deliveries_total", {"outcome": "deferred"}
            )
        )
        assert registry.get_sample_value("hookwire_dispatcher_circuits_open") == 1
        received = await receiver.wait_for(3, within=10)
        assert received[2].at - received[1].at >= 1.3, "the probe waited for the circuit"
        assert (
            receiver.received[2].headers["webhook-id"] == receiver.received[0].headers["webhook-id"]
        )
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 0
        )


async def test_deliveries_woken_with_a_probe_go_once_it_succeeds(
    settings: Settings, receiver: Receiver
) -> None:
    """Deliveries put off by an open circuit wake together when it half-opens: one is the
    probe, and the others wait for its answer. It succeeds, and they go at once rather
    than being put off again for the circuit's whole wait (they came 30 s after a
    successful probe)."""
    tripping = settings.model_copy(
        update={
            "retry_schedule_seconds": (60.0,) * 10,
            "retry_jitter": 0.0,
            "circuit_failure_threshold": 1,
            "circuit_open_seconds": 5.0,
        }
    )
    async with running_stack(tripping, with_dispatcher=True) as stack:
        await stack.create_webhook(receiver.url, CREATED)
        receiver.statuses = [500]
        await stack.create_object({"n": 0})
        await receiver.wait_for(1)
        registry = stack.dispatcher.metrics.registry
        for n in range(1, 5):
            await stack.create_object({"n": n})
        await _eventually(
            lambda: (
                registry.get_sample_value(
                    "hookwire_dispatcher_deliveries_total", {"outcome": "deferred"}
                )
                == 4
            )
        )
        received = await receiver.wait_for(5, within=20)
        probe, *behind = received[1:]
        assert sorted(orjson.loads(r.body)["data"]["n"] for r in received[1:]) == [1, 2, 3, 4]
        assert all(r.at - probe.at < 2.5 for r in behind), [r.at - probe.at for r in behind]
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 0
        )


async def test_deliveries_put_off_behind_an_open_circuit_are_in_the_log(
    settings: Settings, receiver: Receiver
) -> None:
    """The first failure opens the circuit; the events after it are put off without a
    request. The log lists them ``pending``, with no attempt and the time they go next
    (the circuit's reopening), beside the failed one ``retrying``."""
    tripping = settings.model_copy(update=_TRIPS_AT_ONCE)
    async with running_stack(tripping, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, CREATED)
        receiver.statuses = [500] * 10
        await stack.create_object()
        await receiver.wait_for(1)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 1
        )
        before = utcnow()
        for _ in range(2):
            await stack.create_object()
        path = f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook['id']}/deliveries"

        async def listed() -> list[dict[str, Any]] | None:
            async with stack.session.get(path, headers=stack.headers()) as response:
                found = (await response.json())["data"]
            return found if len(found) == 3 and found[0]["state"] == "pending" else None

        newest_first = await _eventually(listed)
        assert [d["state"] for d in newest_first] == ["pending", "pending", "retrying"]
        for put_off in newest_first[:2]:
            assert (put_off["attempt_count"], put_off["attempts"]) == (0, [])
            wakes = datetime.fromisoformat(put_off["next_retry_at"])
            # The circuit's 600 s, give or take the test's own time.
            assert before + timedelta(seconds=590) < wakes < utcnow() + timedelta(seconds=610)
        assert len(receiver.received) == 1


async def test_a_reload_forgets_the_circuit_of_a_webhook_whose_change_was_lost(
    settings: Settings, receiver: Receiver
) -> None:
    """A webhook deactivated without its change record reaching the dispatcher is found by
    the next whole reload; its open circuit goes with it, not counted open for ever."""
    tripping = settings.model_copy(update=_TRIPS_AT_ONCE)
    async with running_stack(tripping, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, CREATED)
        receiver.statuses = [500]
        await stack.create_object()
        await receiver.wait_for(1)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 1
        )
        # Straight in the database: no change record is written.
        async with stack.api.engine.begin() as conn:
            await conn.execute(
                update(tables.webhooks)
                .where(tables.webhooks.c.id == webhook["id"])
                .values(active=False)
            )
        stack.dispatcher._resync_wanted.set()
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 0
        )


async def test_first_attempts_deferred_by_an_open_circuit_keep_their_order(
    settings: Settings, receiver: Receiver
) -> None:
    """At concurrency 1, events deferred while the circuit is open reach the receiver in
    the order they were routed once it closes. (Changes to one object: events about
    different objects travel on different partitions, in no order between them.)"""
    tripping = settings.model_copy(
        update={
            "retry_schedule_seconds": (30.0,) * 10,
            "retry_jitter": 0.0,
            "circuit_failure_threshold": 1,
            # Long enough for all twelve to be created while it is open, on a busy machine.
            "circuit_open_seconds": 8.0,
            "delivery_concurrency_per_endpoint": 1,
        }
    )
    async with running_stack(tripping, with_dispatcher=True) as stack:
        await stack.create_webhook(receiver.url, CHANGES)
        receiver.statuses = [500]
        object_id = await stack.create_object({"n": -1})
        await receiver.wait_for(1)
        for n in range(12):
            await _change(stack, object_id, n)
        received = await receiver.wait_for(13, within=30)
        later = [orjson.loads(r.body)["data"]["n"] for r in received[1:]]
        assert later == list(range(12))


async def test_a_circuit_closed_early_does_not_let_new_events_overtake_deferred_ones(
    settings: Settings, receiver: Receiver
) -> None:
    """A manual retry that succeeds closes the circuit before the deferred first attempts
    wake: an event after it waits for them instead of going first."""
    tripping = settings.model_copy(
        update={
            "retry_schedule_seconds": (30.0,) * 10,
            "retry_jitter": 0.0,
            "circuit_failure_threshold": 1,
            # Long enough for the delivery log to record the failure and the manual retry
            # to go out while the circuit is still open, on a busy machine.
            "circuit_open_seconds": 20.0,
            "delivery_concurrency_per_endpoint": 1,
        }
    )
    async with running_stack(tripping, with_dispatcher=True) as stack:
        await stack.create_webhook(receiver.url, CHANGES)
        receiver.statuses = [500]
        object_id = await stack.create_object({"n": 0})
        [first] = await receiver.wait_for(1)
        for n in (1, 2):
            await _change(stack, object_id, n)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: (
                registry.get_sample_value(
                    "hookwire_dispatcher_deliveries_total", {"outcome": "deferred"}
                )
                == 2
            )
        )
        await _retry_by_hand(stack, first.headers["webhook-id"])
        await receiver.wait_for(2)
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 0
        )
        await _change(stack, object_id, 3)
        received = await receiver.wait_for(5, within=40)
        assert [orjson.loads(r.body)["data"]["n"] for r in received[2:]] == [1, 2, 3]


async def test_a_dispatcher_taking_over_keeps_new_events_behind_first_attempts_put_off(
    settings: Settings, receiver: Receiver
) -> None:
    """The first attempts one dispatcher put off behind an open circuit are read back by
    the one that takes their partition over (here, as in a deploy, a replacement): an event
    arriving once the endpoint is back waits behind them instead of going first."""
    open_seconds = 20.0
    tripping = settings.model_copy(
        update={
            "retry_schedule_seconds": (120.0,) * 10,
            "retry_jitter": 0.0,
            "circuit_failure_threshold": 1,
            "circuit_open_seconds": open_seconds,
            "delivery_concurrency_per_endpoint": 1,
        }
    )
    async with running_stack(tripping, with_dispatcher=True) as stack:
        await stack.create_webhook(receiver.url, CHANGES)
        receiver.statuses = [500]  # then 200: the endpoint is back at once
        object_id = await stack.create_object({"n": 0})
        await receiver.wait_for(1)
        wakes = time.monotonic() + open_seconds
        for n in (1, 2):
            await _change(stack, object_id, n)
        deferred = ("hookwire_dispatcher_deliveries_total", {"outcome": "deferred"})
        first = stack.dispatcher
        await _eventually(lambda: first.metrics.registry.get_sample_value(*deferred) == 2)
        await first.stop()
        # Already waiting when the next dispatcher takes the partitions over.
        await _change(stack, object_id, 3)
        second = DispatcherService(tripping, stack.api.engine)
        await second.start()
        stack.dispatcher_or_none = second
        try:
            await _eventually(lambda: second.metrics.registry.get_sample_value(*deferred) == 1)
            # Put off while the first two still waited: without the takeover it would have
            # been sent at once, before them.
            assert time.monotonic() < wakes, "the put-offs woke before the test could check"
            received = await receiver.wait_for(4, within=60)
            assert [orjson.loads(r.body)["data"]["n"] for r in received[1:]] == [1, 2, 3]
        finally:
            await second.stop()


async def test_a_rebalance_waits_for_the_deliveries_in_flight_instead_of_sending_them_twice(
    settings: Settings, receiver: Receiver
) -> None:
    """A second dispatcher joins while a delivery to each partition is in flight and more
    wait behind them: the first lets those in flight finish, starts no other until the
    partitions have moved, and commits, so the new owner sends none of them again."""
    one_at_a_time = settings.model_copy(
        update={
            "delivery_concurrency_per_endpoint": 1,
            # A hand-over of 4 s rather than 1.2: the answer, its record and the commit
            # after the gate opens fit in it on a loaded machine too.
            "kafka_session_timeout_ms": 10_000,
            "kafka_heartbeat_interval_ms": 1_000,
        }
    )
    async with running_stack(one_at_a_time, with_dispatcher=True) as stack:
        first = stack.dispatcher
        webhooks = await _one_webhook_per_partition(stack, receiver.url)
        gate = receiver.gate = asyncio.Event()
        events = 3
        for _ in range(events):
            await stack.create_object()
        await receiver.wait_for(len(webhooks))  # one in flight per webhook, two waiting
        hand_over = first._deliverer_hand_over
        assert hand_over is not None
        revoke = hand_over.before_revoke
        assert revoke is not None

        async def answered_while_revoking(within: float) -> None:
            # The endpoint answers a moment into the rebalance, well within its wait.
            asyncio.get_running_loop().call_later(0.2, gate.set)
            await revoke(within)

        hand_over.before_revoke = answered_while_revoking
        second = DispatcherService(one_at_a_time, stack.api.engine)
        await second.start()
        try:
            deliverer = second._consumers[1]
            # One partition moved to the newcomer.
            await _eventually(lambda: len(deliverer.assignment()) == 1)
            await receiver.wait_for(events * len(webhooks))
            await asyncio.sleep(2)  # time enough for a second copy to arrive
            ids = [r.headers["webhook-id"] for r in receiver.received]
            assert len(ids) == events * len(webhooks) == len(set(ids)), ids
        finally:
            await second.stop()


async def _one_webhook_per_partition(stack: Stack, url: str) -> list[str]:
    on_partition: dict[int, str] = {}
    while len(on_partition) < stack.settings.kafka_partitions:
        webhook = await stack.create_webhook(url, CREATED)
        partition = partition_of(webhook["id"].encode(), stack.settings.kafka_partitions)
        if partition in on_partition:
            async with stack.session.delete(
                f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook['id']}",
                headers=stack.headers(),
            ) as response:
                assert response.status == 204
            continue
        on_partition[partition] = webhook["id"]
    return list(on_partition.values())


async def test_a_circuit_moves_away_with_its_partition(
    settings: Settings, receiver: Receiver
) -> None:
    """Two failing endpoints on different partitions, both circuits open; a second
    dispatcher joins and takes one partition: the first counts only the circuit it still
    owns (the other is the newcomer's to probe)."""
    tripping = settings.model_copy(
        update={"circuit_failure_threshold": 1, "circuit_open_seconds": 120.0}
    )
    async with running_stack(tripping, with_dispatcher=True) as stack:
        receiver.statuses = [500] * 10
        await _one_webhook_per_partition(stack, receiver.url)
        await stack.create_object()
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 2
        )
        second = DispatcherService(tripping, stack.api.engine)
        await second.start()
        try:
            await _eventually(
                lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 1,
                within=30,
            )
        finally:
            await second.stop()


async def test_private_addresses_are_refused_without_the_allow_flag(
    stack: Stack, receiver: Receiver
) -> None:
    """The api let these in (tests allow private URLs); a dispatcher without the flag
    refuses both an IP literal and a name that resolves to loopback, at connect time."""
    await stack.dispatcher.stop()
    strict = stack.settings.model_copy(update={"allow_private_urls": False})
    dispatcher = DispatcherService(strict, stack.api.engine)
    await dispatcher.start()
    try:
        port = receiver.url.split(":")[2].split("/")[0]
        for url in (receiver.url, f"http://localhost:{port}/hook"):
            webhook = await _webhook_for(stack, dispatcher, url)
            await stack.create_object()

            async def refused(webhook_id: str = webhook["id"]) -> dict[str, Any] | None:
                async with stack.session.get(
                    f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook_id}/deliveries",
                    headers=stack.headers(),
                ) as response:
                    found = (await response.json())["data"]
                return found[0] if found else None

            logged = await _eventually(refused)
            [attempt] = logged["attempts"]
            assert attempt["error_class"] == "refused", attempt
            assert "non-public" in attempt["error"]
            if "localhost" in url:
                # Whoever reads the delivery log learns nothing of the internal network.
                assert "127.0.0.1" not in attempt["error"], attempt["error"]
            await _edit_webhook(stack, webhook["id"], {"active": False})
        assert receiver.received == []
        # The literal was refused before any request, so its "attempt" took no time worth
        # timing; the name was looked up and its connection refused, and is timed.
        timed = dispatcher.metrics.registry.get_sample_value(
            "hookwire_dispatcher_delivery_attempt_seconds_count"
        )
        assert timed == 1
    finally:
        await dispatcher.stop()
        stack.dispatcher_or_none = None


async def _webhook_for(stack: Stack, dispatcher: DispatcherService, url: str) -> dict[str, Any]:
    webhook = await stack.create_webhook(url, CREATED, routed=False)
    await _eventually(lambda: dispatcher.table.get(webhook["id"]))
    return webhook


async def test_no_success_for_the_configured_period_disables_the_webhook(
    settings: Settings, receiver: Receiver
) -> None:
    impatient = settings.model_copy(
        update={
            "retry_schedule_seconds": (0.3,) * 20,
            "retry_jitter": 0.0,
            "circuit_failure_threshold": 100,
            "endpoint_disable_after_days": 1 / 86400,  # one second
        }
    )
    async with running_stack(impatient, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, CREATED)
        receiver.statuses = [500] * 100
        await stack.create_object()

        await _eventually(lambda: _is_disabled(stack, webhook["id"]))
        status, audit = await stack.auth_call(
            "GET", f"/v1/audit-log?team_id={stack.team_id}&action=webhook.disabled"
        )
        assert status == 200
        [disabled] = audit["data"]
        assert "no successful delivery for" in disabled["details"]["reason"]
        [notice] = await topic_records(stack.settings, stack.dispatcher.topics.audit, 1)
        assert (notice["id"], notice["action"]) == (disabled["id"], "webhook.disabled")
        # Not before a second without a success had passed since the first failure.
        found = await _delivery(stack, receiver.received[0].headers["webhook-id"])
        assert found is not None
        began = min(datetime.fromisoformat(a["attempted_at"]) for a in found["attempts"])
        assert datetime.fromisoformat(notice["at"]) - began >= timedelta(seconds=1), notice
        # Once the dispatcher knows, the retry already scheduled is skipped, not sent.
        await _eventually(lambda: not stack.dispatcher.table.get(webhook["id"]).active)
        attempts = len(receiver.received)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: registry.get_sample_value(
                "hookwire_dispatcher_deliveries_total", {"outcome": "skipped"}
            )
        )
        assert len(receiver.received) == attempts, "no attempt after disabling"


async def test_sigterm_drains_a_delivery_in_flight(stack: Stack, receiver: Receiver) -> None:
    """Stopping waits for the request in flight and records it; a new dispatcher does not
    send it again."""
    await stack.create_webhook(receiver.url, CREATED)
    # The receiver answers when the test says (well within the 10 s grace).
    receiver.gate = asyncio.Event()
    await stack.create_object()
    [request] = await receiver.wait_for(1)
    stopping = asyncio.create_task(stack.dispatcher.stop())
    # The drain can be watched: /metrics still answers, with the delivery in flight.
    async with stack.session.get(f"{stack.dispatcher_url}/metrics") as response:
        assert response.status == 200
        assert "hookwire_dispatcher_inflight_deliveries 1.0" in await response.text()
    await asyncio.sleep(0.5)
    assert not stopping.done(), "stop waits for the delivery in flight"
    receiver.gate.set()
    await stopping
    stack.dispatcher_or_none = None
    delivery_id = request.headers["webhook-id"]

    async def delivered() -> dict[str, Any] | None:
        found = await _delivery(stack, delivery_id)
        return found if found and found["state"] == "delivered" else None

    await _eventually(delivered)
    successor = DispatcherService(stack.settings, stack.api.engine)
    await successor.start()
    try:
        # A later event for the same webhook shares the drained one's partition and comes
        # after it: had the drained delivery not been committed, it would arrive again
        # first.
        await stack.create_object()
        await receiver.wait_for(2, within=30)
        await asyncio.sleep(0.5)
    finally:
        await successor.stop()
    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert len(ids) == 2, ids
    assert ids[1] != delivery_id, "the drained delivery was committed"


async def test_per_endpoint_rate_limit_spaces_requests(
    settings: Settings, receiver: Receiver
) -> None:
    paced = settings.model_copy(update={"delivery_rate_per_endpoint": 10.0})
    async with running_stack(paced, with_dispatcher=True) as stack:
        await stack.create_webhook(receiver.url, CREATED)
        for _ in range(10):
            await stack.create_object()
        await receiver.wait_for(10, within=15)
        times = [r.at for r in receiver.received]
        assert times[-1] - times[0] >= 0.8, "10 requests at 10/s span about a second"
        registry = stack.dispatcher.metrics.registry
        topics = topics_for(stack.settings)

        def caught_up(topic: str) -> bool:
            lags = [
                registry.get_sample_value(
                    "hookwire_dispatcher_consumer_lag", {"topic": topic, "partition": str(p)}
                )
                for p in range(stack.settings.kafka_partitions)
            ]
            return any(lag is not None for lag in lags) and all(not lag for lag in lags)

        # The delivery lanes, the router and the retry timer each report their partitions.
        for topic in (topics.deliveries, topics.events, topics.retry(1)):
            await _eventually(lambda topic=topic: caught_up(topic))


async def test_a_webhooks_own_rate_limit_spaces_its_requests_and_no_others(
    stack: Stack, receiver: Receiver
) -> None:
    """Created with a rate limit of 2 a second, a webhook gets six events spread over at
    least 2.5 s, while one without a limit (and no default set) gets the same six at once;
    cleared with PATCH, the limit no longer spaces the next ones."""
    base = receiver.url.rsplit("/", 1)[0]
    limited = await stack.create_webhook(f"{base}/limited", CREATED, rate_limit=2)
    assert limited["rate_limit"] == 2
    assert (await stack.create_webhook(f"{base}/free", CREATED))["rate_limit"] is None
    producer = make_producer(stack.settings)
    await start_client(producer, stack.settings)

    async def six_events(batch: str) -> None:
        events = [sample_event(id=f"evt_{batch}_{n}", team_id=stack.team_id) for n in range(6)]
        topic = topics_for(stack.settings).events
        await send_all(producer, [(topic, b"k", event.to_bytes()) for event in events])

    def span(path: str, since: int) -> float:
        """From the second arrival to the last: the first may come late by its connection's
        setup (a fraction of a second on a loaded machine), the others reuse it."""
        times = [r.at for r in receiver.received[since:] if r.path == path]
        assert len(times) == 6
        return times[-1] - times[1]

    try:
        await six_events("a")
        await receiver.wait_for(12, within=15)
        # 2 s from the second to the last, less how late the second arrived after its slot.
        assert span("/limited", 0) >= 1.6, "six at two a second: 2 s from second to last"
        assert span("/free", 0) < 1.5
        status, cleared = await _webhook_call(stack, "PATCH", limited["id"], {"rate_limit": None})
        assert (status, cleared["rate_limit"]) == (200, None)
        await _eventually(lambda: stack.dispatcher.table.get(limited["id"]).rate_limit is None)
        await six_events("b")
        await receiver.wait_for(24, within=15)
        assert span("/limited", 12) < 1.5
    finally:
        await stop_client(producer)


async def test_a_rate_limit_lifted_reaches_the_deliveries_already_waiting(
    stack: Stack, receiver: Receiver
) -> None:
    """At one delivery every five seconds, the four events after the first hold slots up
    to 20 s away; the limit lifted with PATCH, they arrive within a few seconds (the
    change reaches the dispatcher within one), not at the slots taken before."""
    limited = await stack.create_webhook(receiver.url, CREATED, rate_limit=0.2)
    producer = make_producer(stack.settings)
    await start_client(producer, stack.settings)
    try:
        events = [sample_event(id=f"evt_lift_{n}", team_id=stack.team_id) for n in range(5)]
        topic = topics_for(stack.settings).events
        await send_all(producer, [(topic, b"k", event.to_bytes()) for event in events])
        await receiver.wait_for(1, within=15)
        await asyncio.sleep(0.5)  # the next four are waiting for their slots by now
        assert len(receiver.received) == 1
        status, lifted = await _webhook_call(stack, "PATCH", limited["id"], {"rate_limit": None})
        assert (status, lifted["rate_limit"]) == (200, None)
        lifted_at = time.monotonic()
        await receiver.wait_for(5, within=10)
        # The slots taken at the old rate were 5 to 20 s away.
        assert time.monotonic() - lifted_at < 8.0
    finally:
        await stop_client(producer)


async def test_a_410_skips_the_deliveries_waiting_for_their_rate_slots_at_once(
    stack: Stack, receiver: Receiver
) -> None:
    """A 410 stops the webhook here at once; its four deliveries waiting for slots up to
    20 s away are skipped then, not each at its slot, and none reaches the endpoint."""
    await stack.create_webhook(receiver.url, CREATED, rate_limit=0.2)
    receiver.statuses = [410]
    producer = make_producer(stack.settings)
    await start_client(producer, stack.settings)
    registry = stack.dispatcher.metrics.registry

    def skipped() -> float:
        labels = {"outcome": "skipped"}
        return registry.get_sample_value("hookwire_dispatcher_deliveries_total", labels) or 0

    try:
        events = [sample_event(id=f"evt_gone_{n}", team_id=stack.team_id) for n in range(5)]
        topic = topics_for(stack.settings).events
        await send_all(producer, [(topic, b"k", event.to_bytes()) for event in events])
        await receiver.wait_for(1, within=15)
        gone_at = time.monotonic()
        await _eventually(lambda: skipped() == 4)
        # Their slots were 5 to 20 s away.
        assert time.monotonic() - gone_at < 8.0
        assert len(receiver.received) == 1
    finally:
        await stop_client(producer)


async def _webhook_call(
    stack: Stack, method: str, webhook_id: str, body: dict[str, Any]
) -> tuple[int, Any]:
    async with stack.session.request(
        method,
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook_id}",
        headers=stack.headers(),
        json=body,
    ) as response:
        return response.status, await response.json()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 request off a raw socket, body and all; returns its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return head


def _webhook_ids(heads: list[bytes]) -> set[str]:
    return {
        line.split(b":", 1)[1].strip().decode()
        for head in heads
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"webhook-id:")
    }


async def _logged_from_raw_receiver(stack: Stack, answer_with: bytes, *, pause: float = 0) -> Any:
    """The delivery log's entry for an event delivered to a raw socket receiver that
    answers ``answer_with`` (after ``pause`` seconds, whatever follows its first line
    break pair) and closes."""
    requests: list[bytes] = []
    head, _, rest = answer_with.partition(b"\r\n\r\n")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await _read_request(reader))
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(pause)
        writer.write(rest)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await stack.create_webhook(f"http://127.0.0.1:{port}/hook", CREATED)
        await stack.create_object()
        await _eventually(lambda: len(requests) >= 1)
        [delivery_id] = _webhook_ids(requests)

        async def logged() -> dict[str, Any] | None:
            found = await _delivery(stack, delivery_id)
            return found if found and found["attempts"] else None

        return await _eventually(logged)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_2xx_whose_body_breaks_off_is_delivered(stack: Stack) -> None:
    """The receiver answers 200 and then a body that cannot be read (broken chunk framing):
    the answer was a 2xx, so the delivery is delivered, not failed and sent again."""
    delivery = await _logged_from_raw_receiver(
        stack,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nnot a chunk\r\n",
        pause=0.2,  # the status is read before the body breaks
    )
    assert delivery["state"] == "delivered", delivery
    assert [(a["outcome"], a["status_code"]) for a in delivery["attempts"]] == [("delivered", 200)]


async def test_a_status_below_100_is_a_failed_attempt_not_a_dead_letter(stack: Stack) -> None:
    """``HTTP/1.1 099`` reads as a status; it is no HTTP status the attempt record holds, so
    the attempt is logged as failed by its text and scheduled again, not set aside as a
    fault of the dispatcher."""
    delivery = await _logged_from_raw_receiver(
        stack, b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    first = delivery["attempts"][-1]
    assert (first["attempt"], first["outcome"], first["status_code"]) == (1, "failed", None)
    assert (first["error"], first["error_class"]) == ("HTTP 099", "http_status")
    assert delivery["state"] == "retrying"
    registry = stack.dispatcher.metrics.registry
    faults = registry.get_sample_value(
        "hookwire_dispatcher_dead_letters_total", {"reason": "handler_failed"}
    )
    assert not faults


async def test_a_fault_while_handling_dead_letters_the_delivery_and_the_rest_go_on(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while handling one delivery (not bad input) sets it aside as a dead letter
    with the reason instead of holding its partition's commits back for good; the
    deliveries behind it are delivered and their offsets committed."""
    original = Sender.send
    faults = [RuntimeError("a bug")]

    async def faulty(self: Sender, route: WebhookRoute, delivery: Delivery) -> Outcome:
        if faults:
            raise faults.pop()
        return await original(self, route, delivery)

    monkeypatch.setattr(Sender, "send", faulty)
    await stack.create_webhook(receiver.url, CREATED)
    await stack.create_object()
    await stack.create_object()
    await receiver.wait_for(1)
    [letter] = await dead_letters(stack.settings, 1)
    assert letter["reason"] == "handler_failed: RuntimeError: a bug"
    assert orjson.loads(letter["payload"])["attempt"] == 1
    registry = stack.dispatcher.metrics.registry
    assert (
        registry.get_sample_value(
            "hookwire_dispatcher_dead_letters_total", {"reason": "handler_failed"}
        )
        == 1
    )
    lanes = stack.dispatcher._lanes
    assert lanes is not None
    await _eventually(lambda: lanes.backlog == 0)  # nothing left unfinished, so committed


async def _own_topics(settings: Settings, name: str, **overrides: Any) -> tuple[Settings, Topics]:
    """Topics apart from the stack's, for a retry timer driven by the test alone."""
    own = settings.model_copy(
        update={"topic_prefix": f"{settings.topic_prefix}{name}.", **overrides}
    )
    await ensure_topics(own)
    return own, topics_for(own)


async def _forwarded_ids(deliveries: AIOKafkaConsumer) -> list[str]:
    """The delivery ids a fetch of the deliveries topic brings."""
    batches = await deliveries.getmany(timeout_ms=200)
    return [orjson.loads(r.value)["id"] for b in batches.values() for r in b]


def _event(name: str) -> Event:
    return sample_event(id=f"evt_{name}", team_id=f"team_{name}")


async def test_far_off_retries_filling_the_timer_leave_room_for_a_due_one(
    settings: Settings,
) -> None:
    """One endpoint's retries, due in an hour, fill the timer's memory; another endpoint's
    retry on another tier, due now, is still read and sent on."""
    quick, topics = await _own_topics(settings, "timer", kafka_partitions=1)
    event = _event("timer")

    def retry(delivery_id: str, webhook_id: str, due: datetime) -> bytes:
        return Delivery(
            id=delivery_id, webhook_id=webhook_id, attempt=2, event=event, not_before=due
        ).to_bytes()

    producer = make_producer(quick)
    await start_client(producer, quick)
    later = utcnow() + timedelta(hours=1)
    await send_all(
        producer,
        [(topics.retry(7), b"wh_busy", retry(f"msg_far_{n}", "wh_busy", later)) for n in range(60)],
    )
    retries = make_patient_consumer(
        quick,
        *(topics.retry(tier) for tier in range(1, RETRY_TIERS + 1)),
        group_id=f"{quick.topic_prefix}retry",
    )
    await start_client(retries, quick)
    timer = RetryTimer(retries, producer, topics, pending_max=20)
    running = asyncio.create_task(timer.run())
    deliveries = make_consumer(quick, topics.deliveries, group_id=None)
    await start_client(deliveries, quick)
    try:
        await _eventually(lambda: timer.pending >= 10)
        await send_all(
            producer, [(topics.retry(1), b"wh_calm", retry("msg_due", "wh_calm", utcnow()))]
        )
        forwarded: list[str] = []

        async def forwarded_due() -> bool:
            forwarded.extend(await _forwarded_ids(deliveries))
            return "msg_due" in forwarded

        await _eventually(forwarded_due)
        assert forwarded == ["msg_due"]
        assert timer.pending <= 20
    finally:
        await cancel_and_wait(running)
        await stop_client(deliveries)
        await stop_client(retries)
        await stop_client(producer)


async def test_a_retry_the_broker_will_never_take_is_dead_lettered_not_tried_for_ever(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A due retry refused for its size, even sent alone, would hold its partition's
    commit point and be tried every second for ever: it becomes a dead letter (counted
    through the callback), and the retry beside it is forwarded once."""
    quick, topics = await _own_topics(settings, "too-large", kafka_partitions=1)
    event = _event("large")
    now = utcnow()
    producer = make_producer(quick)
    await start_client(producer, quick)
    await send_all(
        producer,
        [
            (
                topics.retry(1),
                b"wh_x",
                Delivery(
                    id=f"msg_{name}", webhook_id="wh_x", attempt=2, event=event, not_before=now
                ).to_bytes(),
            )
            for name in ("big", "small")
        ],
    )

    def refusing(real: Any) -> Any:
        async def send_each(to: Any, records: list[Any]) -> dict[int, BaseException]:
            refused: dict[int, BaseException] = {
                index: MessageSizeTooLargeError()
                for index, (topic, _, value) in enumerate(records)
                if topic == topics.deliveries and b"msg_big" in value
            }
            taken = [r for i, r in enumerate(records) if i not in refused]
            assert not await real(to, taken)
            return refused

        return send_each

    monkeypatch.setattr(retry_timer, "send_each", refusing(retry_timer.send_each))
    monkeypatch.setattr(routed, "send_each", refusing(routed.send_each))
    retries = make_patient_consumer(
        quick,
        *(topics.retry(tier) for tier in range(1, RETRY_TIERS + 1)),
        group_id=f"{quick.topic_prefix}retry",
    )
    await start_client(retries, quick)
    set_aside: list[tuple[int, str]] = []
    timer = RetryTimer(
        retries,
        producer,
        topics,
        pending_max=100,
        on_set_aside=lambda record, reason: set_aside.append((record.offset, reason)),
    )
    running = asyncio.create_task(timer.run())
    try:
        [letter] = await topic_records(quick, topics.dead_letter, 1)
        assert letter["source_topic"] == topics.retry(1)
        assert orjson.loads(letter["payload"])["id"] == "msg_big"
        assert letter["reason"].startswith(f"its record for wh_x on {topics.deliveries} is refused")
        assert set_aside == [(0, letter["reason"])]
        [forwarded] = await topic_records(quick, topics.deliveries, 1)
        assert forwarded["id"] == "msg_small"
        await _eventually(lambda: timer.pending == 0 and not any(timer.lag().values()))
        assert await records_in(quick, topics.deliveries) == 1
    finally:
        await cancel_and_wait(running)
        await stop_client(retries)
        await stop_client(producer)


async def test_a_rebalance_commits_the_retries_being_forwarded_before_they_move(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry in each partition of the first tier is being forwarded (the send held) when
    a second member joins the retry group: the timer lets the send finish and commits
    before the partitions move, so the member taking one over forwards neither again
    (decision 56)."""
    # A hand-over of 4 s: the half second below stays well inside it on a loaded machine.
    quick, topics = await _own_topics(
        settings,
        "handover",
        kafka_partitions=2,
        kafka_session_timeout_ms=10_000,
        kafka_heartbeat_interval_ms=1_000,
    )
    event = _event("handover")
    # Due a moment from now: both are read before either is due (joining the group alone
    # takes about 1.5 s), and go in one send.
    due = utcnow() + timedelta(seconds=5)
    keys = [
        next(f"wh_{n}" for n in range(100) if partition_of(f"wh_{n}".encode(), 2) == p)
        for p in (0, 1)
    ]
    producer = make_producer(quick)
    await start_client(producer, quick)
    await send_all(
        producer,
        [
            (
                topics.retry(1),
                key.encode(),
                Delivery(
                    id=f"msg_{key}", webhook_id=key, attempt=2, event=event, not_before=due
                ).to_bytes(),
            )
            for key in keys
        ],
    )
    every_tier = [topics.retry(tier) for tier in range(1, RETRY_TIERS + 1)]
    group = f"{quick.topic_prefix}retry"
    retries = make_patient_consumer(quick, group_id=group)
    hand_over = subscribe_handing_over(retries, quick, *every_tier)
    await start_client(retries, quick)
    timer = RetryTimer(retries, producer, topics, pending_max=100)
    revoking, handed_over = asyncio.Event(), asyncio.Event()

    async def noting_the_revoke(within: float) -> None:
        revoking.set()
        await timer.hand_over(within)
        handed_over.set()

    hand_over.before_revoke = noting_the_revoke
    sending, release = asyncio.Event(), asyncio.Event()
    real_send_each = retry_timer.send_each

    async def held_send_each(to: Any, records: list[Any]) -> Any:
        if len(records) == 2 and not release.is_set():
            sending.set()
            await release.wait()
        return await real_send_each(to, records)

    monkeypatch.setattr(retry_timer, "send_each", held_send_each)
    running = asyncio.create_task(timer.run())
    other = make_patient_consumer(quick, *every_tier, group_id=group)
    try:
        await asyncio.wait_for(sending.wait(), 20)
        joining = asyncio.create_task(start_client(other, quick))
        await asyncio.wait_for(revoking.wait(), 15)
        # Within the hand-over's 4 s (half the session less a heartbeat). The embedded
        # broker itself holds a join about half the session, so only this shows the wait.
        await asyncio.sleep(0.5)
        assert not handed_over.is_set(), "the revoke did not wait for the send in hand"
        release.set()
        await asyncio.wait_for(joining, 30)
        first_tier = [TopicPartition(topics.retry(1), p) for p in (0, 1)]
        assert [await other.committed(p) for p in first_tier] == [1, 1]
        assert len(other.assignment()) == RETRY_TIERS, "the partitions were shared"
        batches = await other.getmany(timeout_ms=1000)
        assert [r for b in batches.values() for r in b] == [], "forwarded again"
    finally:
        await cancel_and_wait(running)
        await stop_client(other)
        await stop_client(retries)
        await stop_client(producer)


async def test_a_stop_lets_the_retry_forward_in_hand_finish_and_commits_it(
    quick_stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while a due retry is being forwarded: the forward is on the broker already,
    only its acknowledgement is awaited. The stop waits for it and commits it; cut short,
    the retry would be forwarded again by the next dispatcher (a second attempt)."""
    stack = quick_stack
    receiver.statuses = [500] * 10
    sent, release = asyncio.Event(), asyncio.Event()
    real_send_each = retry_timer.send_each

    async def acknowledged_late(to: Any, records: list[Any]) -> Any:
        failed = await real_send_each(to, records)
        sent.set()
        await release.wait()
        return failed

    monkeypatch.setattr(retry_timer, "send_each", acknowledged_late)
    await stack.create_webhook(receiver.url, CREATED)
    await stack.create_object()
    await asyncio.wait_for(sent.wait(), 20)
    stopping = asyncio.create_task(stack.dispatcher.stop())
    await asyncio.sleep(0.3)
    assert not stopping.done(), "the stop did not wait for the forward in hand"
    release.set()
    await asyncio.wait_for(stopping, 30)
    topics = topics_for(stack.settings)
    group = make_consumer(stack.settings, group_id=f"{stack.settings.topic_prefix}dispatcher.retry")
    await start_client(group, stack.settings)
    try:
        first_tier = [
            TopicPartition(topics.retry(1), p) for p in range(stack.settings.kafka_partitions)
        ]
        committed = [await group.committed(partition) or 0 for partition in first_tier]
        assert sum(committed) == 1, "the forwarded retry was not committed"
    finally:
        await stop_client(group)


async def test_a_timer_handing_over_forwards_nothing_until_the_new_assignment(
    settings: Settings,
) -> None:
    """After its hand-over the partitions may be moving: a retry that comes due meanwhile
    waits (its next owner would forward it again), and goes once the assignment is in."""
    quick, topics = await _own_topics(settings, "held", kafka_partitions=1)
    producer = make_producer(quick)
    await start_client(producer, quick)
    retries = make_patient_consumer(quick, topics.retry(1), group_id=f"{quick.topic_prefix}r")
    await start_client(retries, quick)
    timer = RetryTimer(retries, producer, topics, pending_max=10)
    running = asyncio.create_task(timer.run())
    deliveries = make_consumer(quick, topics.deliveries, group_id=None)
    await start_client(deliveries, quick)
    try:
        await timer.hand_over(1.0)
        record = Delivery(id="msg_held", webhook_id="wh_held", attempt=2, event=_event("held"))
        await send_all(producer, [(topics.retry(1), b"wh_held", record.to_bytes())])
        await _eventually(lambda: timer.pending == 1)
        batches = await deliveries.getmany(timeout_ms=700)
        assert [r for b in batches.values() for r in b] == [], "forwarded while handing over"
        timer.reassigned()
        forwarded: list[str] = []

        async def was_forwarded() -> bool:
            forwarded.extend(await _forwarded_ids(deliveries))
            return bool(forwarded)

        await _eventually(was_forwarded)
        assert forwarded == ["msg_held"]
    finally:
        await cancel_and_wait(running)
        await stop_client(deliveries)
        await stop_client(retries)
        await stop_client(producer)


async def test_a_stop_during_the_commit_still_commits_what_was_forwarded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop cancels the timer while it commits a forwarded retry (the commit slowed by
    a second): the commit is made anyway, so a restart does not forward the retry again."""
    quick, topics = await _own_topics(settings, "stop", kafka_partitions=1)
    event = _event("stop")
    producer = make_producer(quick)
    await start_client(producer, quick)
    record = Delivery(id="msg_stop", webhook_id="wh_stop", attempt=2, event=event)
    await send_all(producer, [(topics.retry(1), b"wh_stop", record.to_bytes())])
    group = f"{quick.topic_prefix}retry"
    retries = make_patient_consumer(quick, topics.retry(1), group_id=group)
    await start_client(retries, quick)
    committing = asyncio.Event()
    real_commit = retries.commit

    async def slow_commit(*args: Any, **kwargs: Any) -> Any:
        committing.set()
        await asyncio.sleep(1.0)
        return await real_commit(*args, **kwargs)

    monkeypatch.setattr(retries, "commit", slow_commit)
    running = asyncio.create_task(RetryTimer(retries, producer, topics, pending_max=10).run())
    try:
        await asyncio.wait_for(committing.wait(), 15)
        await cancel_and_wait(running)
        assert await retries.committed(TopicPartition(topics.retry(1), 0)) == 1
    finally:
        await cancel_and_wait(running)
        await stop_client(retries)
        await stop_client(producer)


async def test_far_off_records_move_behind_the_retries_forwarded_past_it(
    settings: Settings,
) -> None:
    """A retry due in an hour and a webhook's first attempts put off behind an open circuit
    sit before retries due now. Once those are forwarded, the far-off ones are written
    again at the end of the partition (the webhook's first attempts all together, in the
    order they wake), and the commit point passes what was forwarded: the next reader
    forwards none of it again."""
    quick, topics = await _own_topics(settings, "move", kafka_partitions=1)
    event = _event("move")
    now, later = utcnow(), utcnow() + timedelta(hours=1)
    written = [  # offsets 0 to 6
        ("far", "wh_far", 8, later),
        ("near_1", "wh_near", 8, now),
        ("first", "wh_first", 1, later),
        ("near_2", "wh_near", 8, now),
        ("first_2", "wh_first", 1, later + timedelta(microseconds=1)),
        ("near_3", "wh_near", 8, now),
        ("other", "wh_other", 8, later),
    ]
    producer = make_producer(quick)
    await start_client(producer, quick)
    await send_all(
        producer,
        [
            (
                topics.retry(7),
                webhook.encode(),
                Delivery(
                    id=delivery_id, webhook_id=webhook, attempt=attempt, event=event, not_before=due
                ).to_bytes(),
            )
            for delivery_id, webhook, attempt, due in written
        ],
    )
    tier = TopicPartition(topics.retry(7), 0)
    try:
        async with _timer_running(quick, producer) as (timer, retries):
            # far (0), first (2) and first_2 (4) are written again at 7 to 9; the commit
            # point passes the forwarded near ones and stops at "other" (6), which was
            # behind nothing forwarded.
            await _eventually(_committed_at(retries, tier, 6), within=20)
            await _eventually(lambda: timer.pending == 4)  # other and the three copies
        in_retry = await topic_records(quick, topics.retry(7), 10)
        assert [record["id"] for record in in_retry[7:]] == ["far", "first", "first_2"]

        async with _timer_running(quick, producer) as (timer, _):
            await _eventually(lambda: timer.pending == 4)
            await asyncio.sleep(1.0)  # a stray forward would be out by now
            assert timer.pending == 4
        forwarded = await topic_records(quick, topics.deliveries, 3)
        assert sorted(record["id"] for record in forwarded) == ["near_1", "near_2", "near_3"]
        assert await records_in(quick, topics.deliveries) == 3
        assert await records_in(quick, topics.retry(7)) == 10
    finally:
        await stop_client(producer)


async def test_a_moved_retry_read_with_its_copy_waits_once(settings: Settings) -> None:
    """A crash between writing a moved retry's copy and the commit leaves both in the
    partition: whoever reads them holds one, and forwards it once."""
    quick, topics = await _own_topics(settings, "copy", kafka_partitions=1)
    event = _event("copy")
    # Time enough for the consumer to join its group and read both before they are due.
    soon = utcnow() + timedelta(seconds=8)
    retry = Delivery(id="moved", webhook_id="wh_1", attempt=8, event=event, not_before=soon)
    other = retry.model_copy(update={"id": "other"})
    producer = make_producer(quick)
    await start_client(producer, quick)
    await send_all(
        producer,
        [(topics.retry(7), b"wh_1", record.to_bytes()) for record in (retry, other, retry)],
    )
    try:
        async with _timer_running(quick, producer) as (timer, retries):
            await _eventually(lambda: timer.pending == 2)
            tier = TopicPartition(topics.retry(7), 0)
            await _eventually(_committed_at(retries, tier, 3))
        forwarded = await topic_records(quick, topics.deliveries, 2)
        assert sorted(record["id"] for record in forwarded) == ["moved", "other"]
        assert await records_in(quick, topics.deliveries) == 2
    finally:
        await stop_client(producer)


@contextlib.asynccontextmanager
async def _timer_running(
    settings: Settings, producer: Any
) -> AsyncIterator[tuple[RetryTimer, Any]]:
    topics = topics_for(settings)
    retries = make_patient_consumer(
        settings,
        *(topics.retry(tier) for tier in range(1, RETRY_TIERS + 1)),
        group_id=f"{settings.topic_prefix}retry",
    )
    await start_client(retries, settings)
    timer = RetryTimer(retries, producer, topics, pending_max=1000, move_every_seconds=0.5)
    running = asyncio.create_task(timer.run())
    try:
        yield timer, retries
    finally:
        await cancel_and_wait(running)
        await stop_client(retries)


def _committed_at(consumer: Any, partition: TopicPartition, offset: int) -> Callable[[], Any]:
    async def check() -> bool:
        return bool(await consumer.committed(partition) == offset)

    return check


async def test_a_retry_forward_failing_on_one_partition_sends_no_second_copy_elsewhere(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two retries due at once, for webhooks on different deliveries partitions; the
    broker refuses the first partition's batch twice. The other retry is forwarded once,
    and the refused one once it is taken."""
    split, topics = await _own_topics(settings, "split")
    keys = {}
    for n in range(100):
        keys.setdefault(partition_of(f"wh_{n}".encode(), split.kafka_partitions), f"wh_{n}")
    refused_webhook, other_webhook = keys[0], keys[1]
    event = _event("split")
    producer = make_producer(split)
    await start_client(producer, split)
    # Due together, once the timer has read both.
    due = utcnow() + timedelta(seconds=2)
    await send_all(
        producer,
        [
            (
                topics.retry(1),
                webhook.encode(),
                Delivery(
                    id=f"msg_{webhook}",
                    webhook_id=webhook,
                    attempt=2,
                    event=event,
                    not_before=due,
                ).to_bytes(),
            )
            for webhook in (refused_webhook, other_webhook)
        ],
    )
    real_send_batch = producer.send_batch
    refusals = [KafkaTimeoutError(), KafkaTimeoutError()]

    async def refusing(batch: Any, topic: str, *, partition: int) -> Any:
        if topic == topics.deliveries and partition == 0 and refusals:
            # Taken, then never acknowledged (a leader away past the request timeout).
            unacknowledged: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            unacknowledged.set_exception(refusals.pop())
            return unacknowledged
        return await real_send_batch(batch, topic, partition=partition)

    monkeypatch.setattr(producer, "send_batch", refusing)
    retries = make_patient_consumer(
        split,
        *(topics.retry(tier) for tier in range(1, RETRY_TIERS + 1)),
        group_id=f"{split.topic_prefix}retry",
    )
    await start_client(retries, split)
    timer = RetryTimer(retries, producer, topics, pending_max=20)
    running = asyncio.create_task(timer.run())
    deliveries = make_consumer(split, topics.deliveries, group_id=None)
    await start_client(deliveries, split)
    try:
        forwarded: list[str] = []

        async def both_forwarded() -> bool:
            forwarded.extend(await _forwarded_ids(deliveries))
            return f"msg_{refused_webhook}" in forwarded

        await _eventually(both_forwarded)
        assert not refusals
        await asyncio.sleep(0.5)  # time enough for a stray copy to arrive, if one was sent
        forwarded.extend(await _forwarded_ids(deliveries))
        assert sorted(forwarded) == sorted(f"msg_{w}" for w in (refused_webhook, other_webhook))
    finally:
        await cancel_and_wait(running)
        await stop_client(deliveries)
        await stop_client(retries)
        await stop_client(producer)


async def test_the_retry_delay_runs_from_the_end_of_a_slow_attempt(
    settings: Settings, receiver: Receiver
) -> None:
    """A 1 s delay after an attempt that took 1.5 s: the retry comes 1 s after the answer,
    not at once (the delay is not spent while the attempt itself was waiting)."""
    slow = settings.model_copy(update={"retry_schedule_seconds": (1.0,), "retry_jitter": 0.0})
    async with running_stack(slow, with_dispatcher=True) as stack:
        await stack.create_webhook(receiver.url, CREATED)
        receiver.statuses, receiver.delay_seconds = [500], 1.5
        await stack.create_object()
        received = await receiver.wait_for(2, within=15)
        assert received[1].at - received[0].at >= 2.4


def _suppress_change_records(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher hears of new webhooks only by asking the database."""
    changes = stack.api.app[CONTEXT].changes  # type: ignore[index]

    async def not_told(*args: Any, **kwargs: Any) -> bool:
        return True

    monkeypatch.setattr(changes, "notify", not_told)


async def test_a_delivery_for_a_webhook_the_table_has_not_heard_of_is_delivered(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its change record is slow (here: never sent); a test event written straight to the
    deliveries topic must not be skipped for good: the dispatcher asks the database."""
    _suppress_change_records(stack, monkeypatch)
    webhook = await stack.create_webhook(receiver.url, CREATED, routed=False)
    assert stack.dispatcher.table.get(webhook["id"]) is None

    async def send_test() -> None:
        async with stack.session.post(
            f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook['id']}/test",
            headers=stack.headers(),
        ) as response:
            assert response.status == 202

    # Ten at once: those arriving while the first one's lookup is on its way wait for it
    # rather than being skipped as unknown.
    await asyncio.gather(*(send_test() for _ in range(10)))
    received = await receiver.wait_for(10)
    assert {orjson.loads(got.body)["type"] for got in received} == {"webhook.test"}
    registry = stack.dispatcher.metrics.registry
    assert not registry.get_sample_value(
        "hookwire_dispatcher_deliveries_total", {"outcome": "skipped"}
    )


async def test_a_delivery_whose_webhook_cannot_be_looked_up_waits_instead_of_being_skipped(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _suppress_change_records(stack, monkeypatch)
    table = stack.dispatcher.table
    real_refresh = table.refresh
    failures = [OperationalError("SELECT", {}, Exception("database is away"))]

    async def away_once(webhook_id: str) -> None:
        if failures:
            raise failures.pop()
        await real_refresh(webhook_id)

    monkeypatch.setattr(table, "refresh", away_once)
    webhook = await stack.create_webhook(receiver.url, CREATED, routed=False)
    async with stack.session.post(
        f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook['id']}/test",
        headers=stack.headers(),
    ) as response:
        assert response.status == 202
    [got] = await receiver.wait_for(1, within=20)
    assert not failures, "the first lookup failed"
    assert orjson.loads(got.body)["type"] == "webhook.test"
    registry = stack.dispatcher.metrics.registry
    assert (
        registry.get_sample_value("hookwire_dispatcher_deliveries_total", {"outcome": "deferred"})
        == 1
    )


async def test_a_database_that_fails_lookups_is_asked_once_a_second_not_per_delivery(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _suppress_change_records(stack, monkeypatch)
    table = stack.dispatcher.table
    real_refresh = table.refresh
    asked: list[float] = []
    away = True

    async def refusing(webhook_id: str) -> None:
        asked.append(time.monotonic())
        if away:
            raise OperationalError("SELECT", {}, Exception("connection refused"))
        await real_refresh(webhook_id)

    monkeypatch.setattr(table, "refresh", refusing)
    webhook = await stack.create_webhook(receiver.url, CREATED, routed=False)
    test_route = f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook['id']}/test"
    started = time.monotonic()
    for _ in range(20):
        async with stack.session.post(test_route, headers=stack.headers()) as response:
            assert response.status == 202
    registry = stack.dispatcher.metrics.registry
    await _eventually(
        lambda: (
            registry.get_sample_value(
                "hookwire_dispatcher_deliveries_total", {"outcome": "deferred"}
            )
            == 20
        )
    )
    window = time.monotonic() - started
    assert len(asked) <= window + 1, (len(asked), window)
    away = False
    await receiver.wait_for(20, within=20)


async def test_an_event_does_not_overtake_one_put_off_by_a_failed_lookup(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first event's lookup fails (put off 5 s); the webhook is learnt meanwhile; the
    second event waits behind the first instead of going first."""
    _suppress_change_records(stack, monkeypatch)
    table = stack.dispatcher.table
    real_refresh = table.refresh
    failures = [OperationalError("SELECT", {}, Exception("database is away"))]

    async def away_once(webhook_id: str) -> None:
        if failures:
            raise failures.pop()
        await real_refresh(webhook_id)

    monkeypatch.setattr(table, "refresh", away_once)
    webhook = await stack.create_webhook(receiver.url, CREATED, routed=False)
    producer = make_producer(stack.settings)
    await start_client(producer, stack.settings)

    async def deliver(n: int) -> None:
        event = sample_event(id=f"evt_order_{n}", team_id=stack.team_id, data={"n": n})
        record = Delivery(id=f"msg_order_{n}", webhook_id=webhook["id"], attempt=1, event=event)
        await send_all(
            producer,
            [(stack.dispatcher.topics.deliveries, webhook["id"].encode(), record.to_bytes())],
        )

    try:
        await deliver(1)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: (
                registry.get_sample_value(
                    "hookwire_dispatcher_deliveries_total", {"outcome": "deferred"}
                )
                == 1
            )
        )
        await real_refresh(webhook["id"])  # the change record, late
        await deliver(2)
        received = await receiver.wait_for(2, within=20)
        assert [orjson.loads(r.body)["data"]["n"] for r in received] == [1, 2]
    finally:
        await stop_client(producer)


async def test_after_a_410_a_webhook_stays_stopped_until_the_database_says_otherwise(
    settings: Settings, receiver: Receiver
) -> None:
    """The delivery log's writer (here: switched off) has not applied the disable yet, so
    the database still says active; the deliveries queued behind the 410 are skipped, not
    sent after a re-read. An edit after the 410 (a reactivation) is heeded."""
    unrecorded = settings.model_copy(
        update={"record_attempts": False, "delivery_concurrency_per_endpoint": 1}
    )
    async with running_stack(unrecorded, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, CREATED)
        receiver.statuses = [410]
        receiver.delay_seconds = 0.3  # the others queue up behind the first
        for _ in range(4):
            await stack.create_object()
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: (
                registry.get_sample_value(
                    "hookwire_dispatcher_deliveries_total", {"outcome": "skipped"}
                )
                == 3
            )
        )
        assert len(receiver.received) == 1
        # Past the once-a-second limit, a later delivery re-reads the webhook: still active
        # in the database, and still stopped here. (New events are not routed to it; a
        # test event is written straight to the deliveries.)
        await asyncio.sleep(1.1)
        async with stack.session.post(
            f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook['id']}/test",
            headers=stack.headers(),
        ) as response:
            assert response.status == 202
        await _eventually(
            lambda: (
                registry.get_sample_value(
                    "hookwire_dispatcher_deliveries_total", {"outcome": "skipped"}
                )
                == 4
            )
        )
        assert len(receiver.received) == 1
        await _edit_webhook(stack, webhook["id"], {"name": "back"})
        await _eventually(lambda: stack.dispatcher.table.get(webhook["id"]).active)
        await stack.create_object()
        await receiver.wait_for(2)


async def test_a_410_to_an_attempt_begun_before_an_edit_does_not_stop_the_webhook(
    settings: Settings, receiver: Receiver
) -> None:
    """The webhook is edited while a request is on its way, and the table has heard of the
    edit when the 410 comes back: the delivery log's writer will not disable it (edited
    after the attempt began), so the dispatcher does not stop it either. Stopped here, the
    events routed until the writer's refusal came back would get no delivery at all."""
    unrecorded = settings.model_copy(update={"record_attempts": False})
    async with running_stack(unrecorded, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, CREATED)
        table = stack.dispatcher.table
        before = table.get(webhook["id"])
        assert before is not None
        receiver.statuses = [410]
        receiver.delay_seconds = 1.5
        await stack.create_object()
        await receiver.wait_for(1)
        await _edit_webhook(stack, webhook["id"], {"name": "edited"})
        await _eventually(lambda: table.get(webhook["id"]).updated_at != before.updated_at)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: (
                registry.get_sample_value(
                    "hookwire_dispatcher_webhooks_disabled_total", {"reason": "gone"}
                )
                == 1
            )
        )
        assert table.get(webhook["id"]).active
        receiver.delay_seconds = 0.0
        await stack.create_object()
        await receiver.wait_for(2)


async def test_a_deactivated_webhooks_backlog_takes_no_rate_slots(
    settings: Settings, receiver: Receiver
) -> None:
    """At one delivery per 5 s, deliveries queued for a webhook deactivated meanwhile are
    skipped at once, not one per slot: nothing is sent, so no slot is spent."""
    paced = settings.model_copy(
        update={"delivery_rate_per_endpoint": 0.2, "delivery_concurrency_per_endpoint": 1}
    )
    async with running_stack(paced, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, CREATED)
        for _ in range(6):
            await stack.create_object()
        await receiver.wait_for(1)
        await _edit_webhook(stack, webhook["id"], {"active": False})
        registry = stack.dispatcher.metrics.registry
        # Taking slots, the five would need 20 s at least.
        await _eventually(
            lambda: (
                registry.get_sample_value(
                    "hookwire_dispatcher_deliveries_total", {"outcome": "skipped"}
                )
                == 5
            ),
            within=12,
        )
        assert len(receiver.received) == 1


async def test_a_retry_waiting_for_its_time_counts_as_lag(stack: Stack, receiver: Receiver) -> None:
    """The retry timer has read the record (its position is past it), but it is not
    forwarded yet: until then the partition is that far behind."""
    await stack.create_webhook(receiver.url, CREATED)
    receiver.statuses = [500]
    await stack.create_object()
    await receiver.wait_for(1)
    registry = stack.dispatcher.metrics.registry
    retry_topic = stack.dispatcher.topics.retry(1)

    def waiting() -> float:
        return sum(
            registry.get_sample_value(
                "hookwire_dispatcher_consumer_lag",
                {"topic": retry_topic, "partition": str(partition)},
            )
            or 0
            for partition in range(stack.settings.kafka_partitions)
        )

    await _eventually(lambda: stack.dispatcher._timer.pending == 1)  # type: ignore[union-attr]
    await _eventually(lambda: waiting() == 1)


async def test_a_410_from_the_url_a_webhook_was_moved_from_does_not_stop_it(
    quick_stack: Stack, receiver: Receiver
) -> None:
    """The webhook is pointed at a new URL and the dispatcher's table has not heard of it
    yet (here: no change record at all): the old receiver's 410 is what a move looks
    like. The webhook is not disabled, and the retry goes to the new URL."""
    stack = quick_stack
    webhook = await stack.create_webhook(f"{receiver.url}/old", CREATED)
    async with stack.api.engine.begin() as conn:
        await conn.execute(
            update(tables.webhooks)
            .where(tables.webhooks.c.id == webhook["id"])
            .values(url=f"{receiver.url}/new", updated_at=utcnow())
        )
    assert stack.dispatcher.table.get(webhook["id"]).url.endswith("/old")
    receiver.statuses = [410]
    await stack.create_object()
    received = await receiver.wait_for(2)
    assert [r.path for r in received] == ["/hook/old", "/hook/new"]
    assert received[0].headers["webhook-id"] == received[1].headers["webhook-id"]
    assert not await _is_disabled(stack, webhook["id"])
    registry = stack.dispatcher.metrics.registry
    assert not registry.get_sample_value(
        "hookwire_dispatcher_webhooks_disabled_total", {"reason": "gone"}
    )


async def test_failed_re_sends_and_tests_do_not_open_the_circuit(
    settings: Settings, receiver: Receiver
) -> None:
    """A receiver refusing test events (or old payloads re-sent) says nothing of the live
    traffic: with a threshold of one failure, the circuit stays closed."""
    tripping = settings.model_copy(
        update={"circuit_failure_threshold": 1, "circuit_open_seconds": 600.0}
    )
    async with running_stack(tripping, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(receiver.url, CREATED)
        receiver.statuses = [400]
        async with stack.session.post(
            f"{stack.api_url}/v1/teams/{stack.team_id}/webhooks/{webhook['id']}/test",
            headers=stack.headers(),
        ) as response:
            assert response.status == 202
        await receiver.wait_for(1)
        registry = stack.dispatcher.metrics.registry
        await _eventually(lambda: _failed(registry) == 1)
        assert registry.get_sample_value("hookwire_dispatcher_circuits_open") == 0
        await stack.create_object()
        await receiver.wait_for(2)  # sent, not deferred


async def test_pointing_a_webhook_elsewhere_forgets_the_old_urls_circuit(
    settings: Settings, receiver: Receiver
) -> None:
    """The circuit opened by the old URL does not keep the new one waiting."""
    tripping = settings.model_copy(update=_TRIPS_AT_ONCE)
    async with running_stack(tripping, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(f"{receiver.url}/old", CREATED)
        receiver.statuses = [500]
        await stack.create_object()
        await receiver.wait_for(1)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 1
        )
        await _edit_webhook(stack, webhook["id"], {"url": f"{receiver.url}/new"})
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 0
        )


async def test_an_answer_from_the_url_a_webhook_left_does_not_count_for_the_new_one(
    settings: Settings, receiver: Receiver
) -> None:
    """A request to the old URL is still out when the webhook moves; its failure, coming
    back after, neither opens the new URL's circuit nor keeps its deliveries waiting."""
    tripping = settings.model_copy(update=_TRIPS_AT_ONCE)
    async with running_stack(tripping, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(f"{receiver.url}/old", CREATED)
        receiver.gate = asyncio.Event()
        receiver.statuses = [500]
        await stack.create_object()
        await receiver.wait_for(1)
        await _edit_webhook(stack, webhook["id"], {"url": f"{receiver.url}/new"})
        table = stack.dispatcher.table
        await _eventually(lambda: table.get(webhook["id"]).url.endswith("/new"))
        receiver.gate.set()
        registry = stack.dispatcher.metrics.registry
        await _eventually(lambda: _failed(registry) == 1)
        assert registry.get_sample_value("hookwire_dispatcher_circuits_open") == 0
        await stack.create_object()
        received = await receiver.wait_for(2)
        assert received[1].path == "/hook/new"


async def test_a_reload_forgets_the_circuit_of_a_webhook_moved_without_its_change(
    settings: Settings, receiver: Receiver
) -> None:
    """The URL changed and its change record never came: the next whole reload finds the
    new URL, and the old one's circuit goes."""
    tripping = settings.model_copy(update=_TRIPS_AT_ONCE)
    async with running_stack(tripping, with_dispatcher=True) as stack:
        webhook = await stack.create_webhook(f"{receiver.url}/old", CREATED)
        receiver.statuses = [500]
        await stack.create_object()
        await receiver.wait_for(1)
        registry = stack.dispatcher.metrics.registry
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 1
        )
        async with stack.api.engine.begin() as conn:
            await conn.execute(
                update(tables.webhooks)
                .where(tables.webhooks.c.id == webhook["id"])
                .values(url=f"{receiver.url}/new")
            )
        stack.dispatcher._resync_wanted.set()
        await _eventually(
            lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 0
        )


async def test_a_late_410_from_the_url_a_webhook_left_leaves_the_new_urls_circuit(
    settings: Settings, receiver: Receiver
) -> None:
    """The old URL answers 410 after the webhook has moved and the new URL has opened its
    own circuit: that circuit stands (the table already holds the new URL)."""
    tripping = settings.model_copy(update=_TRIPS_AT_ONCE)
    old = Receiver(gate=asyncio.Event(), statuses=[410])
    app = web.Application()
    app.router.add_post("/{tail:.*}", old.handle)
    runner = await start_site(app, "127.0.0.1", 0)
    try:
        async with running_stack(tripping, with_dispatcher=True) as stack:
            old_url = f"http://127.0.0.1:{bound_port(runner)}/old"
            webhook = await stack.create_webhook(old_url, CREATED)
            await stack.create_object()
            await old.wait_for(1)
            await _edit_webhook(stack, webhook["id"], {"url": receiver.url})
            table = stack.dispatcher.table
            await _eventually(lambda: table.get(webhook["id"]).url == receiver.url)
            receiver.statuses = [500]
            await stack.create_object()
            await receiver.wait_for(1)
            registry = stack.dispatcher.metrics.registry
            await _eventually(
                lambda: registry.get_sample_value("hookwire_dispatcher_circuits_open") == 1
            )
            assert old.gate is not None
            old.gate.set()
            await _eventually(lambda: _failed(registry) == 2)
            await asyncio.sleep(0.3)
            assert registry.get_sample_value("hookwire_dispatcher_circuits_open") == 1
            assert not await _is_disabled(stack, webhook["id"])
    finally:
        await runner.cleanup()
