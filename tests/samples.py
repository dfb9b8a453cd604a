"""Sample records for tests: one place that knows what a valid event looks like."""

from __future__ import annotations

from typing import Any

from services.dispatcher.routing import SigningKey, WebhookRoute
from services.shared import Event, utcnow


def sample_event(**overrides: Any) -> Event:
    """A valid ``object.created`` event for a contact; ``overrides`` replace its fields."""
    fields: dict[str, Any] = {
        "id": "evt_1",
        "type": "object.created",
        "team_id": "team_1",
        "object_type": "contact",
        "object_id": "obj_1",
        "occurred_at": utcnow(),
        "data": {},
    }
    fields.update(overrides)
    return Event.model_validate(fields)


def sample_route(**overrides: Any) -> WebhookRoute:
    """An active webhook, as the dispatcher's table holds it, subscribed to
    ``object.created``; ``overrides`` replace its fields."""
    fields: dict[str, Any] = {
        "id": "wh_1",
        "team_id": "team_1",
        "url": "https://example.com/hook",
        "topics": frozenset({"object.created"}),
        "object_types": None,
        "headers": (),
        "signing_keys": (SigningKey(b"k"),),
        "active": True,
    }
    fields.update(overrides)
    return WebhookRoute(**fields)
