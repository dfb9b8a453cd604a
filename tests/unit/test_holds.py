"""A webhook's hold keeps its first attempts in order: a later wake time asked for while
the hold is still ahead does not start a new hold that the put-offs of the current one
would be queued behind, and a webhook deactivated and reactivated keeps its hold."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import cast

import pytest

from services.dispatcher import handler as handler_module
from services.dispatcher.handler import DeliveryHandler
from services.shared import Delivery, Metrics, Settings, load_settings, utcnow
from tests.unit._dispatch_doubles import (
    OneWebhookTable,
    deliveries_record,
    delivery_to_wh_1,
    failing_webhook_handler,
)

_MICROSECOND = timedelta(microseconds=1)


class _Clock:
    """The handler's wall clock, moved on by ``ahead`` (the circuit's stays real)."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.ahead


def _handler(settings: Settings, name: str) -> tuple[DeliveryHandler, OneWebhookTable]:
    table = OneWebhookTable()
    return failing_webhook_handler(settings, Metrics(name), table), table


async def _handle(handler: DeliveryHandler, delivery: Delivery) -> tuple[str, Delivery | None]:
    """("sent", None), or ("put_off", the copy written to a retry topic)."""
    # Routed now by the real clock, whatever the handler's ``_Clock`` has been moved to.
    routed_ms = int(utcnow().timestamp() * 1000)
    record = deliveries_record(delivery, written_ms=routed_ms)
    [(topic, _, value), *_] = await handler.outcome_records(record)
    if topic.startswith("t.retry."):
        return "put_off", Delivery.model_validate_json(value)
    assert topic == "t.attempts"
    return "sent", None


async def _wake(handler: DeliveryHandler, clock: _Clock, waiting: list[Delivery]) -> list[str]:
    """Hand the handler what is due, in the order the retry timer forwards it (by time),
    put back what it puts off, until nothing is due; the order the first attempts go
    out or wake in then."""
    sent: list[Delivery] = []
    while due := sorted(
        (d for d in waiting if cast(datetime, d.not_before) <= clock()),
        key=lambda d: cast(datetime, d.not_before),
    ):
        waiting.remove(due[0])
        _, put_off = await _handle(handler, due[0])
        if put_off is None:
            sent.append(due[0])
        else:
            waiting.append(put_off)
    later = sorted(waiting, key=lambda d: cast(datetime, d.not_before))
    return [d.id for d in [*sent, *later] if d.attempt == 1]


async def test_a_later_circuit_hold_does_not_put_new_events_before_the_put_offs_taken_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Concurrency 1, the endpoint down during a deploy: the hold taken over (due in 20 s)
    covers P0..P4; the webhook's retries are sent here, fail, and open the circuit for
    30 s; the next deferral asks for a later time than the hold's. A new event put off
    then must still wake after P0..P4, not be given a slot they are queued behind."""
    clock = _Clock()
    monkeypatch.setattr(handler_module, "utcnow", clock)
    settings = load_settings(service_credential="x", token_pepper="y")
    handler, _ = _handler(settings, "test_holds_taken_over_later")
    last = clock() + timedelta(seconds=20)
    handler.take_over_holds({"wh_1": last})
    taken_over = [
        delivery_to_wh_1(f"p{n}", not_before=last - (4 - n) * _MICROSECOND) for n in range(5)
    ]

    due_retry = clock() - timedelta(seconds=1)
    for n in range(settings.circuit_failure_threshold):
        assert await _handle(handler, delivery_to_wh_1(f"r{n}", 2, due_retry)) == ("sent", None)
    waiting: list[Delivery] = []
    for delivery in (delivery_to_wh_1("r_deferred", 2, due_retry), delivery_to_wh_1("e6")):
        what, put_off = await _handle(handler, delivery)
        assert what == "put_off"
        waiting.append(cast(Delivery, put_off))

    clock.ahead = timedelta(seconds=21)  # the taken-over put-offs wake; the circuit is open
    order = await _wake(handler, clock, [*taken_over, *waiting])
    assert order == ["msg_p0", "msg_p1", "msg_p2", "msg_p3", "msg_p4", "msg_e6"]


async def test_a_failed_lookups_longer_wait_does_not_put_new_events_before_the_put_offs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The circuit's hold is 2 s ahead, with P0 and P1 put off to it; a new event's lookup
    fails (a 5 s wait), another follows. When P0 and P1 wake (the circuit still open),
    they must stay ahead of both."""
    clock = _Clock()
    monkeypatch.setattr(handler_module, "utcnow", clock)
    settings = load_settings(service_credential="x", token_pepper="y").model_copy(
        update={"circuit_open_seconds": 2.0}
    )
    handler, table = _handler(settings, "test_holds_lookup_later")
    for n in range(settings.circuit_failure_threshold):
        assert await _handle(handler, delivery_to_wh_1(f"f{n}")) == ("sent", None)
    waiting: list[Delivery] = []
    for name in ("p0", "p1", "e_lookup", "e_next"):
        table.away = name == "e_lookup"
        what, put_off = await _handle(handler, delivery_to_wh_1(name))
        assert what == "put_off"
        waiting.append(cast(Delivery, put_off))

    # P0 and P1 are due; the circuit, on the real clock, is still open.
    clock.ahead = timedelta(seconds=3)
    order = await _wake(handler, clock, waiting)
    assert order == ["msg_p0", "msg_p1", "msg_e_lookup", "msg_e_next"]


async def _put_off_behind_open_circuit(handler: DeliveryHandler, threshold: int) -> datetime:
    """Open wh_1's circuit and put three first attempts off; when the last one wakes."""
    for n in range(threshold):
        assert await _handle(handler, delivery_to_wh_1(f"f{n}")) == ("sent", None)
    wakes: list[datetime] = []
    for n in range(3):
        what, put_off = await _handle(handler, delivery_to_wh_1(f"p{n}"))
        assert what == "put_off"
        wakes.append(cast(datetime, cast(Delivery, put_off).not_before))
    return wakes[-1]


@pytest.mark.parametrize("forgotten_by", ["change_record", "whole_reload"])
async def test_a_webhook_reactivated_keeps_new_events_behind_its_put_offs(
    forgotten_by: str,
) -> None:
    """Its circuit open, first attempts put off for minutes; the owner deactivates it,
    fixes the receiver and reactivates it. The circuit is forgotten, the hold is not: a
    new event waits behind the put-offs instead of going out before them."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler, table = _handler(settings, f"test_holds_reactivated_{forgotten_by}")
    last = await _put_off_behind_open_circuit(handler, settings.circuit_failure_threshold)

    active = table.route
    table.route = dataclasses.replace(active, active=False)
    if forgotten_by == "change_record":
        handler.forget_endpoint("wh_1")  # as the dispatcher does for a change record
    else:
        handler.forget_endpoints_not(lambda webhook_id: False)
    assert handler._circuit.endpoints() == []
    table.route = active

    what, put_off = await _handle(handler, delivery_to_wh_1("e_new"))
    assert what == "put_off"
    assert cast(Delivery, put_off).not_before == last + _MICROSECOND


async def test_a_partition_lost_still_takes_its_holds_along() -> None:
    """Its webhooks' deliveries are another process's now: a hold left here would order
    nothing but this process's memory (and a partition coming back is read again)."""
    settings = load_settings(service_credential="x", token_pepper="y")
    handler, _ = _handler(settings, "test_holds_partition_lost")
    await _put_off_behind_open_circuit(handler, settings.circuit_failure_threshold)
    handler.forget_partitions({0}, 1)
    assert handler._holds == {}
    assert handler._circuit.endpoints() == []
