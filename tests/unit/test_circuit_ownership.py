"""The delivery handler's circuits: a delivery whose partition moved away while it was in
flight leaves no circuit behind (the endpoint's deliveries, and its circuit, are another
process's now), and the first attempts an open circuit puts off wake in their order."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import cast

import pytest
from aiokafka import ConsumerRecord

from services.dispatcher import handler as handler_module
from services.dispatcher.handler import DeliveryHandler
from services.shared import Attempt, Delivery, Metrics, load_settings, utcnow
from tests.unit._dispatch_doubles import (
    deliveries_record,
    delivery_to_wh_1,
    failing_webhook_handler,
)


def _record(partition: int, offset: int, written_ms: int = 0) -> ConsumerRecord[bytes, bytes]:
    """The first attempt of delivery ``msg_<offset>``, at that offset."""
    return deliveries_record(
        delivery_to_wh_1(str(offset)), partition=partition, offset=offset, written_ms=written_ms
    )


async def test_failures_count_toward_a_circuit_only_from_partitions_still_owned() -> None:
    settings = load_settings(service_credential="x", token_pepper="y")
    metrics = Metrics("test_circuit_ownership")
    handler = failing_webhook_handler(settings, metrics)

    def circuits_open() -> float | None:
        return metrics.registry.get_sample_value("hookwire_test_circuit_ownership_circuits_open")

    threshold = settings.circuit_failure_threshold
    for offset in range(threshold):
        await handler.outcome_records(_record(1, offset))  # partition 1 moved away
    assert circuits_open() == 0
    for offset in range(threshold):
        await handler.outcome_records(_record(0, offset))
    assert circuits_open() == 1


async def test_first_attempts_put_off_to_one_reopening_wake_a_microsecond_apart() -> None:
    """The retry timer wakes records by their time, so their order holds wherever in the
    retry partition one is moved to."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_put_off_order"))
    threshold = settings.circuit_failure_threshold
    for offset in range(threshold):
        await handler.outcome_records(_record(0, offset))
    put_off = [
        Delivery.model_validate_json(value)
        for offset in range(threshold, threshold + 4)
        for topic, _, value in await handler.outcome_records(_record(0, offset))
        if topic.startswith("t.retry.")
    ]
    assert [d.id for d in put_off] == [f"msg_{n}" for n in range(threshold, threshold + 4)]
    times = [d.not_before for d in put_off]
    assert all(time is not None for time in times)
    first = cast(datetime, times[0])
    assert times == [first + timedelta(microseconds=n) for n in range(4)]


async def _circuit_opened(handler: DeliveryHandler, threshold: int) -> list[datetime]:
    """Open wh_1's circuit; the times two deliveries behind it are put off to."""
    for offset in range(threshold):
        await handler.outcome_records(_record(0, offset))
    return [await _put_off_time(handler, offset) for offset in (100, 101)]


async def _put_off_time(handler: DeliveryHandler, offset: int, written_ms: int = 0) -> datetime:
    [(topic, _, value), (logged_to, _, logged)] = await handler.outcome_records(
        _record(0, offset, written_ms)
    )
    assert topic.startswith("t.retry.")
    not_before = Delivery.model_validate_json(value).not_before
    # The delivery log hears of it, and when the delivery goes next.
    assert logged_to == "t.attempts"
    deferred = Attempt.model_validate_json(logged)
    assert (deferred.outcome, deferred.next_retry_at, deferred.final) == (
        "deferred",
        not_before,
        False,
    )
    return cast(datetime, not_before)


async def test_other_webhooks_put_off_long_ago_do_not_restart_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Remembering at most so many webhooks drops those whose time has passed, not a
    webhook whose deliveries still wait: its next one still wakes behind them."""
    monkeypatch.setattr(handler_module, "_WEBHOOKS_REMEMBERED", 3)
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_put_off_prune"))
    _, second = await _circuit_opened(handler, settings.circuit_failure_threshold)
    long_ago = utcnow() - timedelta(minutes=1)
    for n in range(2):
        handler._holds[f"wh_gone_{n}"] = handler_module._Hold(-1.0, long_ago)
    handler._hold("wh_new", -1.0, utcnow() + timedelta(seconds=5))  # a fourth webhook
    assert set(handler._holds) == {"wh_1", "wh_new"}
    assert await _put_off_time(handler, 102) == second + timedelta(microseconds=1)


async def test_a_delivery_waiting_for_a_lookup_wakes_behind_those_held_longer() -> None:
    """A failed lookup's short wait joins a later hold already there, at its end."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_put_off_lookup"))
    _, second = await _circuit_opened(handler, settings.circuit_failure_threshold)
    event = Delivery.model_validate_json(_record(0, 103).value)
    [(_, _, value), (_, _, logged)] = handler._waiting(event, 0.001)
    assert Delivery.model_validate_json(value).not_before == second + timedelta(microseconds=1)
    assert Attempt.model_validate_json(logged).error_class == "lookup_failed"


async def test_a_later_time_asked_while_a_hold_is_ahead_joins_it() -> None:
    """A new hold made while the current one is ahead would wake its put-offs before
    those of the current one, held or deferred again behind them: the later time joins
    the current hold instead (woken early, such a delivery is put off once more)."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_put_off_join_hold"))
    first, second = await _circuit_opened(handler, settings.circuit_failure_threshold)
    joined = handler._hold("wh_1", -1.0, first + timedelta(minutes=5))
    assert joined is handler._holds["wh_1"]
    assert joined.ends == second + timedelta(microseconds=1)


async def test_a_later_hold_starts_after_the_last_delivery_of_the_current_one() -> None:
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_put_off_next_hold"))
    await _circuit_opened(handler, settings.circuit_failure_threshold)
    current = handler._holds["wh_1"]
    current.until = utcnow() - timedelta(microseconds=10)  # its time has come
    later = handler._hold("wh_1", -1.0, current.until - timedelta(seconds=1))
    assert later is not current
    assert later.until == current.ends


async def test_past_its_time_a_hold_keeps_new_events_behind_it_while_its_put_offs_return() -> None:
    """Woken put-offs come back through the retry timer and the deliveries topic; a new
    event arriving meanwhile, with the circuit closed, is put off behind them. The woken
    ones are not held again (they answer to the circuit), and once they can have come
    back, new events go straight out."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_hold_return"))
    first, _ = await _circuit_opened(handler, settings.circuit_failure_threshold)
    handler._circuit.forget("wh_1")  # closed early, say by a probe that succeeded
    hold = handler._holds["wh_1"]
    now = utcnow()
    hold.until = now - timedelta(seconds=5)
    assert await _put_off_time(handler, 102) == hold.until + timedelta(microseconds=2)

    [(topic, _, _), *_] = await handler.outcome_records(_woken(100, first))
    assert topic == "t.attempts"

    hold.until = now - timedelta(seconds=20)
    now_ms = int(now.timestamp() * 1000)
    [(topic, _, _), *_] = await handler.outcome_records(_record(0, 103, now_ms))
    assert topic == "t.attempts"
    # Routed before they could have come back, and only handled now (a backlog): it may
    # be ahead of them in the partition, and waits behind them.
    routed_ms = int((hold.until - timedelta(seconds=1)).timestamp() * 1000)
    assert await _put_off_time(handler, 104, routed_ms) == hold.until + timedelta(microseconds=3)


def _woken(offset: int, wakes: datetime, attempt: int = 1) -> ConsumerRecord[bytes, bytes]:
    """The delivery at ``offset`` back from a retry topic, due at ``wakes``."""
    woken = Delivery.model_validate_json(_record(0, offset).value).model_copy(
        update={"not_before": wakes, "attempt": attempt}
    )
    return dataclasses.replace(_record(0, offset), value=woken.to_bytes())


async def test_a_woken_put_off_waits_only_behind_a_hold_made_after_it_woke() -> None:
    """Its circuit opened again or a lookup failed, and the ones woken with it were put
    off to a later hold: it joins them there, even with the circuit closed meanwhile,
    rather than going before them."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_hold_woken"))
    await _circuit_opened(handler, settings.circuit_failure_threshold)
    woken = handler._holds["wh_1"]
    woken.until = utcnow() - timedelta(seconds=1)
    later = handler._hold("wh_1", -1.0, utcnow() + timedelta(seconds=5))
    handler._circuit.forget("wh_1")
    second = woken.until + timedelta(microseconds=1)
    [(topic, _, value), _] = await handler.outcome_records(_woken(101, second))
    assert topic.startswith("t.retry.")
    assert Delivery.model_validate_json(value).not_before == later.until
    # Woken from the later hold itself: answers to the circuit alone.
    [(topic, _, _), *_] = await handler.outcome_records(_woken(101, later.until))
    assert topic == "t.attempts"


async def test_holds_taken_over_keep_new_events_behind_the_last_put_off() -> None:
    """A hold read back from the retry topic (its put-offs may be due already, not yet
    forwarded) orders new events behind its last put-off, and does not replace a hold
    of this process's that ends later."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_hold_taken_over"))
    # Long past, yet perhaps not forwarded: the retry partitions may be changing hands.
    last = utcnow() - timedelta(minutes=2)
    handler.take_over_holds({"wh_1": last})
    assert await _put_off_time(handler, 0) == last + timedelta(microseconds=1)
    handler.take_over_holds({"wh_1": last - timedelta(seconds=1)})
    assert await _put_off_time(handler, 1) == last + timedelta(microseconds=2)


async def test_the_put_offs_a_hold_was_taken_over_from_are_not_held_by_it() -> None:
    """Woken by another host whose clock runs ahead, they arrive before the hold's time;
    they go out (the circuit allowing), while new events still wait behind them."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_hold_taken_over_own"))
    last = utcnow() + timedelta(seconds=5)
    handler.take_over_holds({"wh_1": last})
    [(topic, _, _), *_] = await handler.outcome_records(_woken(100, last))
    assert topic == "t.attempts"
    assert await _put_off_time(handler, 101) == last + timedelta(microseconds=1)


async def test_a_hold_made_after_one_taken_over_keeps_its_floor() -> None:
    """The put-offs read may still wait unforwarded: a failed lookup's hold, made on top,
    keeps new events behind them as long."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_hold_floor"))
    handler.take_over_holds({"wh_1": utcnow() - timedelta(minutes=2)})
    taken = handler._holds["wh_1"]
    later = handler._hold("wh_1", -1.0, utcnow() + timedelta(milliseconds=1))
    assert later is not taken
    assert later.floor == taken.floor
    assert later.in_force(utcnow() + timedelta(seconds=20))


async def test_past_the_bound_the_holds_kept_longest_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler_module, "_WEBHOOKS_REMEMBERED", 4)
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_hold_bound"))
    now = utcnow()
    handler.take_over_holds({f"wh_{n}": now + timedelta(minutes=n) for n in range(5)})
    assert set(handler._holds) == {"wh_3", "wh_4"}


async def test_put_offs_due_long_ago_are_not_taken_over() -> None:
    """Forwarded long since (a dead endpoint can hold the retry partition's commit point
    for hours): new events for their webhook go straight out."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler = failing_webhook_handler(settings, Metrics("test_hold_stale"))
    handler.take_over_holds({"wh_1": utcnow() - timedelta(minutes=10)})
    [(topic, _, _), *_] = await handler.outcome_records(_record(0, 0))
    assert topic == "t.attempts"
