"""Which webhooks an event goes to, and the delivery records it fans out into."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from services.shared import Delivery, Event


@dataclass(frozen=True)
class WebhookRoute:
    id: str
    team_id: str
    url: str
    topics: frozenset[str]
    object_types: frozenset[str] | None
    headers: tuple[tuple[str, str], ...]
    signing_keys: tuple[bytes, ...]
    active: bool

    def wants(self, event: Event) -> bool:
        return (
            self.active
            and event.team_id == self.team_id
            and event.type in self.topics
            and (self.object_types is None or event.object_type in self.object_types)
        )

    def signing_keys_at(self, _: datetime) -> tuple[bytes, ...]:
        return self.signing_keys


def delivery_id(event_id: str, webhook_id: str) -> str:
    # Deterministic, so that routing the same event twice (after a crash) yields the same
    # webhook-id and receivers can de-duplicate.
    digest = hashlib.sha256(f"{event_id}\x00{webhook_id}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def fan_out(event: Event, routes: list[WebhookRoute]) -> list[Delivery]:
    return [
        Delivery(id=delivery_id(event.id, route.id), webhook_id=route.id, attempt=1, event=event)
        for route in routes
        if route.wants(event)
    ]
