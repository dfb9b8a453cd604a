"""A retry of a delivery a manual re-send delivered since is not sent again: the handler
that sent the re-send remembers it, within a bound, and looks again after a wait."""

from __future__ import annotations

from typing import Any

import pytest

from services.dispatcher import handler as handler_module
from services.dispatcher.handler import DeliveryHandler
from services.dispatcher.routing import WebhookRoute
from services.dispatcher.sender import Outcome
from services.shared import (
    Attempt,
    Delivery,
    DeliveryKind,
    Metrics,
    OutRecord,
    decode,
    load_settings,
)
from tests.unit._dispatch_doubles import (
    deliveries_record,
    delivery_to_wh_1,
    failing_webhook_handler,
)


class _ScriptedSender:
    """Answers each delivery id as told (200 unless listed), and notes what it sent."""

    def __init__(self, failing: set[str] | None = None) -> None:
        self.failing = failing or set()
        self.sent: list[tuple[str, str]] = []

    async def send(self, route: WebhookRoute, delivery: Delivery) -> Outcome:
        self.sent.append((delivery.id, delivery.kind))
        if delivery.id in self.failing:
            return Outcome("failed", 500, 1.0, "HTTP 500", "http_status", request_headers={})
        return Outcome("delivered", 200, 1.0, None, None, request_headers={})


def _handler(sender: _ScriptedSender) -> DeliveryHandler:
    settings = load_settings(service_credential="x", token_pepper="y")
    return failing_webhook_handler(settings, Metrics("test_resent_deliveries"), sender=sender)


def _attempt(records: list[OutRecord]) -> Attempt:
    [attempt] = [decode(Attempt, value) for topic, _, value in records if topic == "t.attempts"]
    return attempt


async def _handle(
    handler: DeliveryHandler, name: str, kind: DeliveryKind, attempt: int, pace: Any = None
) -> Attempt:
    delivery = delivery_to_wh_1(name, attempt=attempt).model_copy(update={"kind": kind})
    return _attempt(await handler.outcome_records(deliveries_record(delivery), pace))


async def test_only_a_re_send_that_delivered_stops_the_retries_after_it() -> None:
    sender = _ScriptedSender(failing={"msg_refused"})
    handler = _handler(sender)
    await _handle(handler, "ok", "manual", 2)
    await _handle(handler, "refused", "manual", 2)
    await _handle(handler, "tested", "test", 1)
    skipped = await _handle(handler, "ok", "event", 2)
    assert (skipped.outcome, skipped.error_class, skipped.final) == ("skipped", "resent", True)
    assert (await _handle(handler, "refused", "event", 2)).outcome == "failed"
    assert (await _handle(handler, "tested", "event", 2)).outcome == "delivered"
    # A re-send asked for again is sent: only the dispatcher's own attempts are skipped.
    assert (await _handle(handler, "ok", "manual", 3)).outcome == "delivered"
    assert sender.sent.count(("msg_ok", "event")) == 0
    assert ("msg_refused", "event") in sender.sent


async def test_the_oldest_re_sends_are_forgotten_past_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handler_module, "_RESENDS_REMEMBERED", 2)
    sender = _ScriptedSender()
    handler = _handler(sender)
    for name in ("a", "b", "c"):
        await _handle(handler, name, "manual", 2)
    assert (await _handle(handler, "a", "event", 2)).outcome == "delivered"
    assert (await _handle(handler, "b", "event", 2)).outcome == "skipped"
    assert (await _handle(handler, "c", "event", 2)).outcome == "skipped"


async def test_a_retry_waiting_for_its_rate_slot_while_a_re_send_delivers_is_not_sent() -> None:
    sender = _ScriptedSender()
    handler = _handler(sender)

    async def slot_after_the_re_send(rate: float | None) -> bool:
        # The re-send goes out and is answered while this retry waits for its slot.
        await _handle(handler, "waited", "manual", 3)
        return True

    retry = await _handle(handler, "waited", "event", 2, pace=slot_after_the_re_send)
    assert (retry.outcome, retry.error_class) == ("skipped", "resent")
    assert sender.sent == [("msg_waited", "manual")]
