"""Deliveries behind a half-open circuit's probe wait for its answer rather than being
put off for the circuit's whole wait, also when the probe began while they waited for
their slot to send."""

from __future__ import annotations

import asyncio

from services.dispatcher.lanes import Pace
from services.dispatcher.routing import WebhookRoute
from services.dispatcher.sender import Outcome
from services.shared import Delivery, Metrics, load_settings
from tests.unit._dispatch_doubles import (
    deliveries_record,
    delivery_to_wh_1,
    failing_webhook_handler,
)


class RecoveringSender:
    """Fails the first ``failures`` requests; then each waits for ``answer`` and is
    delivered."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.answer = asyncio.Event()
        self.sent: list[str] = []

    async def send(self, route: WebhookRoute, delivery: Delivery) -> Outcome:
        self.sent.append(delivery.id)
        if len(self.sent) <= self.failures:
            return Outcome("failed", 500, 1.0, "HTTP 500", "http_status")
        await self.answer.wait()
        return Outcome("delivered", 200, 1.0, None, None, {})


def _gated() -> tuple[asyncio.Event, Pace]:
    """A pace that lets its delivery send once the event is set."""
    go = asyncio.Event()

    async def pace(rate: float | None) -> bool:
        await go.wait()
        return True

    return go, pace


async def test_a_delivery_whose_slot_came_after_the_probe_began_waits_for_its_answer() -> None:
    settings = load_settings(service_credential="x", token_pepper="y", circuit_open_seconds=0.05)
    threshold = settings.circuit_failure_threshold
    sender = RecoveringSender(threshold)
    handler = failing_webhook_handler(settings, Metrics("test_probe_wait"), sender=sender)
    for offset in range(threshold):
        await handler.outcome_records(
            deliveries_record(delivery_to_wh_1(str(offset)), offset=offset)
        )
    await asyncio.sleep(0.1)  # the circuit half-opens
    go_probe, probe_pace = _gated()
    go_behind, behind_pace = _gated()
    probe = asyncio.create_task(
        handler.outcome_records(
            deliveries_record(delivery_to_wh_1("probe"), offset=100),
            probe_pace,
        )
    )
    behind = asyncio.create_task(
        handler.outcome_records(
            deliveries_record(delivery_to_wh_1("behind"), offset=101),
            behind_pace,
        )
    )
    await asyncio.sleep(0.01)  # both wait for their slot, no probe out yet
    go_probe.set()
    await asyncio.sleep(0.01)  # the probe is out
    assert sender.sent[-1] == "msg_probe"
    go_behind.set()
    await asyncio.sleep(0.05)  # the other reaches the circuit while the probe is out
    sender.answer.set()
    await probe
    records = await behind
    assert sender.sent[-2:] == ["msg_probe", "msg_behind"]
    assert not any(topic.startswith("t.retry.") for topic, _, _ in records)
