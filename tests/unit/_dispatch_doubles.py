"""Stand-ins around a delivery handler for one webhook, wh_1, whose endpoint fails every
request: enough of a table and a sender to open its circuit and watch what is put off."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from aiokafka import ConsumerRecord, TopicPartition

from services.dispatcher.handler import DeliveryHandler, DeliveryMetrics
from services.dispatcher.routing import WebhookRoute
from services.dispatcher.sender import Outcome
from services.shared import Delivery, Metrics, Settings, Topics
from tests.samples import sample_event, sample_route


class OneWebhookTable:
    """wh_1, active unless ``route`` is replaced; ``away``: the database cannot be read."""

    def __init__(self) -> None:
        self.route = sample_route(url="http://127.0.0.1:9/hook")
        self.away = False

    def get(self, webhook_id: str) -> WebhookRoute | None:
        return None if self.away else self.route

    async def refresh(self, webhook_id: str) -> None:
        if self.away:
            raise ConnectionError("database is away")


class FailingSender:
    async def send(self, route: WebhookRoute, delivery: Delivery) -> Outcome:
        return Outcome("failed", 500, 1.0, "HTTP 500", "http_status")


def failing_webhook_handler(
    settings: Settings,
    metrics: Metrics,
    table: OneWebhookTable | None = None,
    sender: object | None = None,
) -> DeliveryHandler:
    """A handler owning partition 0 of ``t.deliveries`` alone, whose every send fails
    (unless another ``sender`` is given). It has no sender of outcomes: tests read the
    records ``outcome_records`` returns."""
    owned = {TopicPartition("t.deliveries", 0)}
    return DeliveryHandler(
        settings=settings,
        table=cast(Any, OneWebhookTable() if table is None else table),
        sender=cast(Any, FailingSender() if sender is None else sender),
        outcomes=cast(Any, None),
        topics=Topics("t."),
        metrics=DeliveryMetrics(metrics),
        assigned=lambda: owned,
    )


def delivery_to_wh_1(name: str, attempt: int = 1, not_before: datetime | None = None) -> Delivery:
    """Delivery ``msg_<name>`` of event ``evt_<name>``."""
    event = sample_event(id=f"evt_{name}")
    return Delivery(
        id=f"msg_{name}", webhook_id="wh_1", attempt=attempt, event=event, not_before=not_before
    )


def deliveries_record(
    delivery: Delivery, *, partition: int = 0, offset: int = 0, written_ms: int = 0
) -> ConsumerRecord[bytes, bytes]:
    """``delivery`` as read from ``t.deliveries``, keyed by its webhook as the router
    writes it; ``written_ms``: the record's timestamp, when it was routed."""
    key, value = delivery.webhook_id.encode(), delivery.to_bytes()
    return ConsumerRecord(
        "t.deliveries", partition, offset, written_ms, 0, key, value, None, len(key), len(value), []
    )
