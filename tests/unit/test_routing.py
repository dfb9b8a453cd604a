"""Routing events to webhooks, a pure function of the event and the table."""

from __future__ import annotations

from datetime import UTC, datetime

from services.dispatcher.routing import WebhookRoute, delivery_id, fan_out
from services.shared import Event
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
    deliveries = fan_out(_event(), routes)
    assert [d.webhook_id for d in deliveries] == ["wh_match", "wh_filtered_in"]
    assert all(d.attempt == 1 and d.event.id == "evt_1" for d in deliveries)


def test_delivery_ids_are_stable_per_event_and_webhook() -> None:
    """Routing the same event twice yields the same webhook-id, so receivers can de-duplicate."""
    assert delivery_id("evt_1", "wh_1") == delivery_id("evt_1", "wh_1")
    assert delivery_id("evt_1", "wh_1") != delivery_id("evt_1", "wh_2")
    assert delivery_id("evt_1", "wh_1") != delivery_id("evt_2", "wh_1")
    first = fan_out(_event(), [_route("wh_1")])
    again = fan_out(_event(), [_route("wh_1")])
    assert first[0].id == again[0].id
