"""Which webhooks an event goes to, and the delivery records it fans out into."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import orjson

from services.shared import SCHEMA_VERSION, Event


class SigningKey(NamedTuple):
    key: bytes
    # A secret replaced by a rotation signs until its grace ends; the current one, always.
    expires_at: datetime | None = None


@dataclass(frozen=True)
class WebhookRoute:
    id: str
    team_id: str
    url: str
    topics: frozenset[str]
    object_types: frozenset[str] | None
    headers: tuple[tuple[str, str], ...]
    signing_keys: tuple[SigningKey, ...]
    active: bool
    # Deliveries a second at most; None: the operator's default for every endpoint.
    rate_limit: float | None = None
    # The database's last change of the webhook: a 410 to an attempt begun before it does
    # not stop it (the delivery log's writer does not disable it either).
    updated_at: datetime | None = None

    def wants(self, event: Event) -> bool:
        return (
            self.active
            and event.team_id == self.team_id
            and event.type in self.topics
            and (self.object_types is None or event.object_type in self.object_types)
        )

    def signing_keys_at(self, at: datetime) -> tuple[bytes, ...]:
        """The keys that sign a request made at ``at``: a rotated-out secret stops at the
        end of its grace, not at the next re-read of the webhook."""
        return tuple(
            signing.key
            for signing in self.signing_keys
            if signing.expires_at is None or signing.expires_at > at
        )


def delivery_id(event_id: str, webhook_id: str) -> str:
    # Deterministic, so that routing the same event twice (after a crash) yields the same
    # webhook-id and receivers can de-duplicate.
    digest = hashlib.sha256(f"{event_id}\x00{webhook_id}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def first_deliveries(event: Event, routes: list[WebhookRoute]) -> Iterator[tuple[str, bytes]]:
    """Per webhook that wants the event: its id and its first delivery's record, the bytes
    ``Delivery.to_bytes`` writes. The event is encoded once and each record put together
    around it: encoded per webhook, a fan-out to a thousand webhooks spent seconds of the
    loop on one batch. Yielded one by one, so that the caller can send a large fan-out in
    parts rather than hold all of it."""
    encoded: bytes | None = None
    for route in routes:
        if not route.wants(event):
            continue
        if encoded is None:
            encoded = event.to_bytes()
        yield (
            route.id,
            b"".join(
                (
                    b'{"schema":',
                    str(SCHEMA_VERSION).encode(),
                    b',"id":',
                    orjson.dumps(delivery_id(event.id, route.id)),
                    b',"webhook_id":',
                    orjson.dumps(route.id),
                    b',"attempt":1,"event":',
                    encoded,
                    b',"kind":"event"}',
                )
            ),
        )
