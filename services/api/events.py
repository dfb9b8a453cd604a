"""``POST /v1/teams/{team}/events``: producers that own their data publish events directly.

An ``Idempotency-Key`` makes a repeat within 24 hours return the first answer and publish
nothing; the same key with a different body is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.shared import (
    Conflict,
    Event,
    EventType,
    JsonObject,
    OpenApi,
    ValidationFailed,
    as_utc,
    get_logger,
    json_response,
    new_id,
    parse_body,
    tables,
    utcnow,
)

from .context import CONTEXT

IDEMPOTENCY_WINDOW = timedelta(hours=24)
# Far longer than a request can take (its publish is bounded by the publish timeout).
_ABANDONED_CLAIM = timedelta(minutes=5)
# The status of a key whose publish failed: free for a retry.
_RELEASED = 0
_keys = tables.idempotency_keys
_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: EventType
    object_type: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    object_id: str = Field(pattern=_ID)
    data: JsonObject


class IdempotencyKeyReused(ValidationFailed):
    code = "idempotency_key_reused"


def _idempotency_key(request: web.Request) -> str | None:
    keys = request.headers.getall("Idempotency-Key", ())
    if not keys:
        return None
    if len(keys) > 1:
        # Taking one would replay under one key and publish under the other.
        raise ValidationFailed.for_field(
            "Idempotency-Key", f"given {len(keys)} times: send one", part="header"
        )
    [key] = keys
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise ValidationFailed.for_field(
            "Idempotency-Key", "1 to 255 printable characters", part="header"
        )
    return key


def _keyed_event_id(team_id: str, key: str, request_hash: str) -> str:
    # The id of a key claimed by an earlier release, which stored none: derived from the
    # team, the key and the body, as that release derived it.
    digest = hashlib.sha256(f"{team_id}\x00{key}\x00{request_hash}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


async def prune_idempotency_keys(conn: AsyncConnection, now: datetime) -> int:
    """Drop the keys whose window has passed; returns how many. A key used once and never
    again would otherwise stay for good, with its answer."""
    result = await conn.execute(delete(_keys).where(_keys.c.created_at < now - IDEMPOTENCY_WINDOW))
    return int(result.rowcount or 0)


@dataclass(frozen=True)
class _Claim:
    """This request holds the key and publishes under ``event_id``; or, with ``earlier``,
    another request holds it (or answered it) and this one publishes nothing."""

    event_id: str = ""
    earlier: Any = None


async def _claim(conn: AsyncConnection, team_id: str, key: str, request_hash: str) -> _Claim:
    now = utcnow()
    await conn.execute(
        delete(_keys).where(
            _keys.c.team_id == team_id,
            _keys.c.key == key,
            _keys.c.created_at < now - IDEMPOTENCY_WINDOW,
        )
    )
    event_id = new_id("evt")
    try:
        async with conn.begin_nested():
            await conn.execute(
                insert(_keys).values(
                    team_id=team_id,
                    key=key,
                    request_hash=request_hash,
                    created_at=now,
                    event_id=event_id,
                )
            )
    except IntegrityError:
        pass
    else:
        return _Claim(event_id)
    mine = and_(_keys.c.team_id == team_id, _keys.c.key == key)
    earlier = (await conn.execute(select(_keys).where(mine))).first()
    if earlier is None:  # pruned since the insert: this request comes again
        raise Conflict("a request with this Idempotency-Key is still in progress")
    free = earlier.status == _RELEASED or (
        earlier.status is None and as_utc(earlier.created_at) < now - _ABANDONED_CLAIM
    )
    if not free:
        return _Claim(earlier=earlier)
    if earlier.request_hash == request_hash:
        # A retry of a publish that failed (or whose process died) may follow an event
        # that reached the stream after all: it goes out under the same id, and each
        # webhook gets the same webhook-id twice and de-duplicates it.
        event_id = earlier.event_id or _keyed_event_id(team_id, key, request_hash)
    # Taken over only as it was read: of two retries at once, one gets it.
    taken = await conn.execute(
        update(_keys)
        .where(
            mine,
            _keys.c.created_at == earlier.created_at,
            _keys.c.status.is_(None) if earlier.status is None else _keys.c.status == _RELEASED,
        )
        .values(request_hash=request_hash, created_at=now, event_id=event_id, status=None)
    )
    if taken.rowcount != 1:
        raise Conflict("a request with this Idempotency-Key is still in progress")
    return _Claim(event_id)


async def publish_event(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "event:publish")
    key = _idempotency_key(request)
    body = await parse_body(request, EventIn)
    request_hash = hashlib.sha256(
        orjson.dumps(body.model_dump(), option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    claim = _Claim(new_id("evt"))
    if key is not None:
        async with ctx.engine.begin() as conn:
            claim = await _claim(conn, principal.team_id, key, request_hash)
        earlier = claim.earlier
        if earlier is not None:
            if earlier.request_hash != request_hash:
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was used with a different body",
                    details=[{"field": "Idempotency-Key", "reason": "reused with another body"}],
                )
            if earlier.response is None:
                raise Conflict("a request with this Idempotency-Key is still in progress")
            return json_response(
                earlier.response, status=earlier.status, headers={"Idempotent-Replayed": "true"}
            )
    event = Event(
        id=claim.event_id, team_id=principal.team_id, occurred_at=utcnow(), **body.model_dump()
    )
    answer = {"id": event.id, "type": event.type, "occurred_at": event.occurred_at}
    try:
        # No database change rides on a raw event, so there is nothing for an outbox to
        # protect: the event is published directly and acknowledged with acks=all.
        await ctx.outbox.publish_direct(
            ctx.topics.events, f"{event.team_id}/{event.object_id}", event
        )
    except Exception:
        if key is not None:
            # Free for a retry, which keeps the event id.
            await _settle(ctx.engine, principal.team_id, key, event.id, status=_RELEASED)
        raise
    if key is not None:
        # Only once Kafka has the event may a repeat be told it is done.
        await _settle(
            ctx.engine,
            principal.team_id,
            key,
            event.id,
            status=201,
            response=orjson.loads(orjson.dumps(answer)),
        )
    return json_response(answer, status=201)


async def _settle(
    engine: AsyncEngine, team_id: str, key: str, event_id: str, **values: Any
) -> None:
    """Record how the key's request ended, unless its claim was taken over meanwhile (a
    request stalled past the abandoned-claim wait: the key is another request's now).

    A database that fails here leaves the claim in flight: it is taken over after a
    while, under the same event id, and the request is answered for what happened to its
    event, not with a 500 for the bookkeeping."""
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(_keys)
                .where(_keys.c.team_id == team_id, _keys.c.key == key)
                .where(_keys.c.event_id == event_id, _keys.c.status.is_(None))
                .values(**values)
            )
    except SQLAlchemyError as exc:
        get_logger("api").warning(
            "idempotency_key_not_settled", error=type(exc).__name__, status=values["status"]
        )


def add_routes(app: web.Application, spec: OpenApi) -> None:
    spec.route(
        app,
        "POST",
        "/v1/teams/{team}/events",
        publish_event,
        status=201,
        body=EventIn,
        headers={
            "Idempotency-Key": "1 to 255 printable characters; a repeat within 24 h with the"
            " same body answers as the first did"
        },
        permission="event:publish",
        errors=(401, 403, 404, 409, 413, 422, 503),
        summary="Publish an event; Idempotency-Key makes a repeat within 24 h a no-op",
    )
