"""Kafka topic names and the JSON records that travel on them.

Every record carries ``schema`` (its contract version). External producers write the same
``Event`` envelope to the events topic, so decoding is strict: a record that does not
match is dead-lettered with the reason, never half-processed.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ._errors import InvalidRecord

SCHEMA_VERSION: Literal[1] = 1

# The largest record value sent: aiokafka refuses a request past 1 MiB (max_request_size)
# and Kafka a message past about 1 MB (message.max.bytes).
MAX_RECORD_BYTES = 1_000_000
# The largest event accepted. An event travels wrapped: in a delivery record (ids, a few
# hundred bytes), in an attempt record (up to 20 KB of custom headers and 64 KB of the
# receiver's answer) and in a dead letter (bounded separately); all must fit a record.
MAX_EVENT_BYTES = 900_000

EventType = Literal["object.created", "object.updated", "object.deleted", "object.send"]
EVENT_TYPES: tuple[str, ...] = ("object.created", "object.updated", "object.deleted", "object.send")
# Sent only by the api's "send a test event" route, straight to one webhook; the router
# refuses it on the events topic so no producer can fan it out.
TEST_EVENT_TYPE: Literal["webhook.test"] = "webhook.test"
DeliveryKind = Literal["event", "manual", "test"]
# "deferred": put off without a request (an open circuit, a Retry-After pause, a failed
# lookup): no attempt was made, so the log lists none; it shows when the delivery goes next.
AttemptOutcome = Literal["delivered", "failed", "skipped", "deferred"]
DeliveryState = Literal["pending", "delivered", "retrying", "failed", "skipped"]
DELIVERY_STATES: tuple[str, ...] = ("pending", "delivered", "retrying", "failed", "skipped")
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

    def is_retry(self, topic: str) -> bool:
        return topic.startswith(f"{self.prefix}retry.")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: Literal[1] = Field(default=SCHEMA_VERSION, alias="schema")

    @field_validator("schema_", mode="before")
    @classmethod
    def _schema_is_a_number(cls, value: object) -> object:
        # JSON's true and 1.0 equal 1 to a Literal, strict or not.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("schema must be a whole number such as 1")
        return value

    def to_bytes(self) -> bytes:
        # Absent optional fields stay absent on the wire rather than arriving as nulls.
        # Straight to JSON bytes: building the Python dict first costs a quarter more.
        return self.__pydantic_serializer__.to_json(self, by_alias=True, exclude_none=True)


# What every JSON reader on the way handles as an integer (the delivery log's, receivers');
# a larger one would be delivered and then break the log's view of it.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# orjson and pydantic refuse to encode past about 255 levels, and a reader's recursion
# runs out long before Python's does; no object of a real product nests this deep.
MAX_JSON_DEPTH = 100


def json_problem(value: Any) -> str | None:
    """Why a decoded JSON value cannot travel as (part of) an event, or None."""
    # A walk with its own stack: a hostile body must not reach Python's recursion limit.
    pending: list[tuple[Any, int]] = []
    problem = _problem_of(value, 1, pending)
    while problem is None and pending:
        container, depth = pending.pop()
        for child in container.values() if isinstance(container, dict) else container:
            # Every consumer walks every event it decodes: the exact types a JSON reader
            # makes are told apart here without a call, anything else below.
            kind = type(child)
            if kind is str or child is None or kind is bool:
                continue
            if kind is int:
                if not _INT_MIN <= child <= _INT_MAX:
                    return _TOO_LARGE
            else:
                problem = _problem_of(child, depth + 1, pending)
                if problem is not None:
                    return problem
    return problem


_TOO_LARGE = "integers must fit in 64 bits"


def _problem_of(item: Any, depth: int, pending: list[tuple[Any, int]]) -> str | None:
    """Why ``item`` cannot travel, by itself; a container is left on ``pending``."""
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        return None if _INT_MIN <= item <= _INT_MAX else _TOO_LARGE
    if isinstance(item, float):
        # pydantic's JSON reader takes NaN, Infinity and 1e999, and its writer turns
        # them into null: the receiver would get another value than was sent.
        if not math.isfinite(item):
            return "numbers must be finite (no NaN, Infinity or out-of-range values)"
    elif isinstance(item, dict | list):
        if depth > MAX_JSON_DEPTH:
            return f"must not nest deeper than {MAX_JSON_DEPTH} levels"
        pending.append((item, depth))
    return None


def _travels(value: dict[str, Any]) -> dict[str, Any]:
    problem = json_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# A JSON object an event may carry; request bodies that become events use it too, so a
# value that cannot travel is refused with the request (422) rather than when the event is
# built or, worse, when it is read back.
JsonObject = Annotated[dict[str, Any], AfterValidator(_travels)]


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


# Names and descriptions a client gives: PostgreSQL cannot store U+0000 in text, so it is
# refused on every database alike (a 422, not a 500 on one database and stored on another).
StoredText = Annotated[str, AfterValidator(_storable)]
# Lengths are set as string constraints, ahead of the validators: set after them,
# pydantic counts "items" rather than characters in its message.
Description = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_storable)]


def _one_line(value: str) -> str:
    for character in value:
        # Cc: controls (newline, escape); Zl, Zp: the line and paragraph separators.
        if unicodedata.category(character) in _BREAKING or character in _DIRECTION_CONTROLS:
            raise ValueError(
                f"must not contain control characters (found U+{ord(character):04X}): a name"
                " is one line, shown as typed in lists and on the command line"
            )
    return value


_BREAKING = frozenset({"Cc", "Zl", "Zp"})
# Characters that reorder the text shown around them (embeddings, overrides, isolates and
# marks): a name holding one can display as another name, or another key's state.
_DIRECTION_CONTROLS = frozenset(
    "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)

# A name people type: surrounding spaces dropped (" ro " and "ro" are one name, "   " is
# none), then 1 to 200 characters on one line, with nothing that reorders what is shown
# (a newline in a key's name printed a line of its own in `hookwire admin list-tokens`,
# one that could pass for another key's). Keys, permission groups, webhooks and the
# operator's command line all take names so.
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_storable),
    AfterValidator(_one_line),
]


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("must be a time that UTC can express (years 1 to 9999)") from exc


def later_than_since(until: datetime | None, info: ValidationInfo) -> datetime | None:
    """A validator for the ``until`` of a ``since``/``until`` window (``since`` declared
    first): a window that ends where it starts, or before, holds nothing, and answering
    "nothing there" would hide the swapped or mistyped bound."""
    since = info.data.get("since")
    if until is not None and since is not None and until <= since:
        raise ValueError("must be later than since")
    return until


def _rfc3339_text(value: object) -> object:
    # A number, or a string of digits, would parse as seconds (or milliseconds) since 1970.
    if isinstance(value, str):
        if not _RFC3339_DATE.match(value):
            raise ValueError("must be an RFC 3339 time, such as 2026-01-01T00:00:00Z")
    elif not isinstance(value, datetime):
        raise ValueError("must be an RFC 3339 time (a string), such as 2026-01-01T00:00:00Z")
    return value


def _rfc3339_time(value: object) -> object:
    """RFC 3339 text, read: a request model is strict, and strict validation refuses the
    text a check before it hands on (it takes a time from JSON, not from Python)."""
    if isinstance(_rfc3339_text(value), str):
        try:
            return _ANY_TIME.validate_python(value)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from None
    return value


_ANY_TIME: TypeAdapter[datetime] = TypeAdapter(datetime)
_RFC3339_DATE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]")
# A time on the wire: RFC 3339 text with its offset, not rewritten from anything else.
Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]

# A time a request gives with its offset, taken as the instant it names, in UTC: stored and
# compared like every other time, and a value past the calendar's ends is a 422, not a 500.
# RFC 3339 text too: "2026" or "20261122" would otherwise be read as seconds since 1970.
UtcDatetime = Annotated[AwareDatetime, BeforeValidator(_rfc3339_time), AfterValidator(_in_utc)]

# What an event's object_type may be, and so what a webhook may filter on.
ObjectType = Annotated[str, Field(pattern=_ID)]


class Event(Record):
    """An object changed; the envelope every webhook receives."""

    id: str = Field(pattern=_ID)
    type: EventType | Literal["webhook.test"]
    team_id: str = Field(pattern=_ID)
    object_type: ObjectType
    object_id: str = Field(pattern=_ID)
    # RFC 3339: with its offset. A time without one means nothing definite, and the delivery
    # log could not order it against the times it keeps.
    occurred_at: Rfc3339
    data: JsonObject
    # object.updated: the previous values of the fields that changed (new values are in data).
    previous: JsonObject | None = None
    # object.send: what was sent, to whom.
    sent: JsonObject | None = None
    # The object's version once this event's change is made (object.send: the version it
    # was sent at). Receivers apply an event only past the last version they applied, so a
    # retried older event cannot undo a newer one. Absent from external producers' events.
    # Strict: "5", 5.0 or true would be rewritten into a version the producer did not send.
    version: int | None = Field(default=None, ge=1, le=2**63 - 1, strict=True)


class Delivery(Record):
    """One event owed to one webhook; its ``id`` is the stable ``webhook-id`` header."""

    # Bounded like the attempt that reports it, so a delivery that decodes can be reported.
    id: str = Field(pattern=_ID, max_length=64)
    webhook_id: str = Field(pattern=_ID, max_length=64)
    attempt: int = Field(ge=1, le=1_000_000)
    event: Event
    # "manual" (a retry or replay asked for through the api) and "test" deliveries get one
    # attempt: a failure is reported in the delivery log, not rescheduled.
    kind: DeliveryKind = "event"
    # A retry waits on a retry topic until this time.
    not_before: Rfc3339 | None = None


class Attempt(Record):
    """One try at a delivery, as the delivery log stores it."""

    # Bounded like the columns that store them, so a record that fits the contract fits
    # the delivery log.
    delivery_id: str = Field(pattern=_ID, max_length=64)
    event_id: str = Field(pattern=_ID)
    webhook_id: str = Field(pattern=_ID, max_length=64)
    team_id: str = Field(pattern=_ID, max_length=64)
    attempt: int = Field(ge=1, le=1_000_000)
    attempted_at: Rfc3339
    outcome: AttemptOutcome
    status_code: int | None = Field(default=None, ge=100, le=999)
    latency_ms: float | None = None
    error: str | None = None
    # A stable word for dashboards and filters: timeout, connection, http_status, refused,
    # inactive, invalid_header, unsigned, resent.
    error_class: str | None = Field(default=None, max_length=32)
    # No further automatic attempt follows this one.
    final: bool
    next_retry_at: Rfc3339 | None = None
    kind: DeliveryKind = "event"
    # The delivery's event, so the log can show and re-send it.
    event: Event
    # What was sent, with signatures and credential-like header values redacted.
    request_headers: dict[str, str] = Field(default_factory=dict)
    # The first bytes of the receiver's answer, decoded leniently.
    response_body: str | None = None
    # Set when the dispatcher stopped delivering to the webhook (a 410): the delivery log's
    # writer disables the webhook and audits why.
    disable_reason: str | None = Field(default=None, max_length=500)

    @model_validator(mode="after")
    def _deferred_goes_later(self) -> Attempt:
        # A put-off is a promise of a later attempt: without its time, or final, the log
        # would show a delivery waiting for nothing.
        if self.outcome == "deferred" and (self.final or self.next_retry_at is None):
            raise ValueError("a deferred attempt has a next_retry_at and is not final")
        return self

    def to_bytes(self) -> bytes:
        """At most ``MAX_RECORD_BYTES`` for an event within ``MAX_EVENT_BYTES``: the
        receiver's answer, escaped (a control byte takes six), is cut to fit. An attempt
        the broker refuses would hold its delivery's partition for good."""
        value = super().to_bytes()
        body = self.response_body
        while len(value) > MAX_RECORD_BYTES and body:
            # Keep the share of the answer that fits, at the answer's own bytes per
            # character; an uneven answer may take another round.
            body_bytes = len(orjson.dumps(body))
            room = MAX_RECORD_BYTES - (len(value) - body_bytes) - 64
            body = body[: max(0, min(len(body) - 1, len(body) * room // body_bytes))]
            value = Record.to_bytes(self.model_copy(update={"response_body": body}))
        return value

    @property
    def state(self) -> DeliveryState:
        """The delivery's state once this attempt is the latest."""
        if self.outcome == "delivered":
            return "delivered"
        if self.outcome == "skipped":
            return "skipped"
        if self.outcome == "deferred":
            # Put off before its first attempt, it has not failed yet.
            return "pending" if self.attempt == 1 else "retrying"
        return "failed" if self.final else "retrying"


class Change(Record):
    """An entity changed; caches holding it must drop or reload it."""

    entity: Literal["webhook", "token", "user", "team", "membership", "permission_group"]
    # An id no store holds (one with a NUL, which PostgreSQL refuses) would fail the re-read
    # of every change fetched with it.
    entity_id: str = Field(pattern=_ID)
    action: Literal["created", "updated", "deleted"]
    team_id: str | None = None
    # A token's state after the change (active, inactive, expired, revoked); verifiers of
    # access tokens keep a revocation set from it.
    state: str | None = None
    at: Rfc3339


class AuditNotice(Record):
    """An audit record its owner must hear of (a webhook disabled), on the audit topic.

    The audit log keeps every record; this carries the few that ask for action, so a
    platform can tell a team without polling the log. ``id`` is the audit record's: a
    notice read twice is the same notice.
    """

    id: str = Field(pattern=_ID)
    at: Rfc3339
    action: str
    team_id: str | None = None
    target_type: str
    target_id: str
    details: dict[str, Any] | None = None


class DeadLetter(Record):
    reason: str
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    payload: str
    # "base64": the payload is the record's bytes in base64, for bytes that are not UTF-8
    # (read as text, their invalid bytes would be replaced, and the original lost).
    payload_encoding: Literal["base64"] | None = None
    at: Rfc3339

    def to_bytes(self) -> bytes:
        """At most ``MAX_RECORD_BYTES``: a payload that would not fit (a large record,
        its JSON escaped once more as a string) is cut, and the reason says so. A dead
        letter the broker refuses would stop its partition for good."""
        letter = self
        if len(self.reason) > _DEAD_LETTER_REASON_CHARS:
            letter = self.model_copy(update={"reason": _cut_reason(self.reason, keep_end=True)})
        value = Record.to_bytes(letter)
        while len(value) > MAX_RECORD_BYTES and letter.payload:
            keep = max(0, len(letter.payload) * MAX_RECORD_BYTES // len(value) - 4096)
            if self.payload_encoding == "base64":
                keep -= keep % 4  # whole groups: what is kept still decodes
            letter = self.model_copy(
                update={
                    "payload": self.payload[:keep],
                    "reason": f"{letter.reason} (payload cut to its first {keep} of"
                    f" {len(self.payload)} characters)",
                }
            )
            value = Record.to_bytes(letter)
        return value


# A reason names what was wrong, not every instance of it: a record with a hundred
# thousand bad values would otherwise make a reason (and a dead letter) of megabytes.
MAX_REASON_CHARS = 2_000
_REASONS_NAMED = 10
# Room for a decoding reason and the notes a dead letter adds after it (a key left out).
_DEAD_LETTER_REASON_CHARS = 2 * MAX_REASON_CHARS
_REASON_END_KEPT = 300


def _cut_reason(reason: str, *, keep_end: bool = False) -> str:
    """At most about ``MAX_REASON_CHARS``; ``keep_end`` keeps the notes at its end too."""
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    cut = f"… ({len(reason)} characters in all)"
    if not keep_end:
        return f"{reason[:MAX_REASON_CHARS]}{cut}"
    head = MAX_REASON_CHARS - _REASON_END_KEPT
    return f"{reason[:head]}{cut} …{reason[-_REASON_END_KEPT:]}"


R = TypeVar("R", bound=Record)


def decode(model: type[R], raw: bytes | None) -> R:
    if raw is None:
        raise InvalidRecord("record has no value")
    if not raw:
        # Not "EOF while parsing": the producer wrote a value of no bytes.
        raise InvalidRecord("record value is empty (0 bytes)")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            try:
                raw.decode()
            except UnicodeDecodeError as not_text:
                # JSON is UTF-8: "expected value at line 1 column 1" would not say so.
                at = not_text.start
                raise InvalidRecord(
                    f"record: not UTF-8 text (byte 0x{raw[at]:02x} at offset {at})"
                ) from exc
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg']}"
            for err in errors[:_REASONS_NAMED]
        )
        if len(errors) > _REASONS_NAMED:
            reasons += f"; and {len(errors) - _REASONS_NAMED} more"
        raise InvalidRecord(_cut_reason(reasons)) from exc
