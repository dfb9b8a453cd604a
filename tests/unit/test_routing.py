"""Routing events to webhooks, a pure function of the event and the table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.dispatcher.routing import WebhookRoute, delivery_id, first_deliveries
from services.shared import Delivery, Event, decode
from tests.samples import sample_event, sample_route


def _event(**overrides: object) -> Event:
    fields: dict[str, object] = {
        "team_id": "team_a",
        "occurred_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    return sample_event(**(fields | overrides))


def _route(webhook_id: str, **overrides: object) -> WebhookRoute:
    fields: dict[str, object] = {"id": webhook_id, "team_id": "team_a"}
    return sample_route(**(fields | overrides))


def test_only_matching_webhooks_get_a_delivery() -> None:
    """Team, topic, object-type filter and the active flag all decide."""
    routes = [
        _route("wh_match"),
        _route("wh_other_team", team_id="team_b"),
        _route("wh_other_topic", topics=frozenset({"object.deleted"})),
        _route("wh_filtered_out", object_types=frozenset({"invoice"})),
        _route("wh_filtered_in", object_types=frozenset({"contact", "invoice"})),
        _route("wh_inactive", active=False),
    ]
    deliveries = [
        (webhook_id, decode(Delivery, value))
        for webhook_id, value in first_deliveries(_event(), routes)
    ]
    assert [(webhook_id, d.webhook_id) for webhook_id, d in deliveries] == [
        ("wh_match", "wh_match"),
        ("wh_filtered_in", "wh_filtered_in"),
    ]
    assert all(d.attempt == 1 and d.event == _event() for _, d in deliveries)


def test_delivery_ids_are_stable_per_event_and_webhook() -> None:
    """Routing the same event twice yields the same webhook-id, so receivers can de-duplicate."""
    assert delivery_id("evt_1", "wh_1") == delivery_id("evt_1", "wh_1")
    assert delivery_id("evt_1", "wh_1") != delivery_id("evt_1", "wh_2")
    assert delivery_id("evt_1", "wh_1") != delivery_id("evt_2", "wh_1")
    first = list(first_deliveries(_event(), [_route("wh_1")]))
    again = list(first_deliveries(_event(), [_route("wh_1")]))
    assert first == again
    assert decode(Delivery, first[0][1]).id == delivery_id("evt_1", "wh_1")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"version": 7, "type": "object.updated"},
        {"data": {"name": 'Zoë "quoted" \\ \n\u2028 😀', "n": 1e15, "big": 2**63 - 1}},
        {"data": {"nested": {"list": [1, 2.5, None, True, {"deep": []}]}, "empty": ""}},
        {"occurred_at": datetime(2026, 1, 1, 12, 30, 15, 123456, tzinfo=UTC)},
    ],
)
def test_a_delivery_record_is_what_the_delivery_model_writes(overrides: dict[str, Any]) -> None:
    """Put together around the event's one encoding, each record is byte for byte the
    record the contract writes for that delivery."""
    event = _event(**overrides)
    topics = frozenset({"object.created", "object.updated"})
    routes = [_route("wh_1", topics=topics), _route("wh_2", topics=topics)]
    records = list(first_deliveries(event, routes))
    assert records == [
        (
            route.id,
            Delivery(
                id=delivery_id(event.id, route.id), webhook_id=route.id, attempt=1, event=event
            ).to_bytes(),
        )
        for route in routes
    ]


def test_the_event_is_encoded_once_for_all_its_webhooks(monkeypatch: pytest.MonkeyPatch) -> None:
    encodings = 0
    encode = Event.to_bytes

    def counted(self: Event) -> bytes:
        nonlocal encodings
        encodings += 1
        return encode(self)

    monkeypatch.setattr(Event, "to_bytes", counted)
    routes = [_route(f"wh_{n}") for n in range(50)]
    assert len(list(first_deliveries(_event(), routes))) == 50
    assert encodings == 1
    assert list(first_deliveries(_event(), [_route("wh_x", active=False)])) == []
    assert encodings == 1
