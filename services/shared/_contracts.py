"""Kafka topic names and the JSON records that travel on them.

Every record carries ``schema`` (its contract version). External producers write the same
``Event`` envelope to the events topic, so decoding is strict: a record that does not
match is dead-lettered with the reason, never half-processed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._errors import InvalidRecord

SCHEMA_VERSION: Literal[1] = 1

EventType = Literal["object.created", "object.updated", "object.deleted", "object.send"]
EVENT_TYPES: tuple[str, ...] = ("object.created", "object.updated", "object.deleted", "object.send")
_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


@dataclass(frozen=True)
class Topics:
    prefix: str = "hookwire."

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def deliveries(self) -> str:
        return f"{self.prefix}deliveries"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead-letter"

    @property
    def attempts(self) -> str:
        return f"{self.prefix}attempts"

    @property
    def changes(self) -> str:
        return f"{self.prefix}changes"

    @property
    def audit(self) -> str:
        return f"{self.prefix}audit"

    def retry(self, tier: int) -> str:
        return f"{self.prefix}retry.{tier}"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: Literal[1] = Field(default=SCHEMA_VERSION, alias="schema")

    def to_bytes(self) -> bytes:
        # Absent optional fields stay absent on the wire rather than arriving as nulls.
        return orjson.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


class Event(Record):
    """An object changed; the envelope every webhook receives."""

    id: str = Field(pattern=_ID)
    type: EventType
    team_id: str = Field(pattern=_ID)
    object_type: str = Field(pattern=_ID)
    object_id: str = Field(pattern=_ID)
    occurred_at: datetime
    data: dict[str, Any]
    # object.updated: the previous values of the fields that changed (new values are in data).
    previous: dict[str, Any] | None = None
    # object.send: what was sent, to whom.
    sent: dict[str, Any] | None = None


class Delivery(Record):
    """One event owed to one webhook; its ``id`` is the stable ``webhook-id`` header."""

    id: str
    webhook_id: str
    attempt: int = Field(ge=1)
    event: Event


class Attempt(Record):
    delivery_id: str
    event_id: str
    webhook_id: str
    team_id: str
    attempt: int
    attempted_at: datetime
    outcome: Literal["delivered", "failed", "skipped"]
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    final: bool


class Change(Record):
    """An entity changed; caches holding it must drop or reload it."""

    entity: Literal["webhook", "token", "user", "team", "membership", "permission_group"]
    entity_id: str
    action: Literal["created", "updated", "deleted"]
    team_id: str | None = None
    # A token's state after the change (active, inactive, expired, revoked); verifiers of
    # access tokens keep a revocation set from it.
    state: str | None = None
    at: datetime


class DeadLetter(Record):
    reason: str
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    payload: str
    at: datetime


R = TypeVar("R", bound=Record)


def decode(model: type[R], raw: bytes | None) -> R:
    if raw is None:
        raise InvalidRecord("record has no value")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidRecord(reasons) from exc
