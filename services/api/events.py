"""``POST /v1/teams/{team}/events``: producers that own their data publish events directly.

An ``Idempotency-Key`` makes a repeat within 24 hours return the first answer and publish
nothing; the same key with a different body is refused.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.shared import (
    Conflict,
    Event,
    EventType,
    JsonObject,
    OpenApi,
    ValidationFailed,
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
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise ValidationFailed.for_field("Idempotency-Key", "1 to 255 printable characters")
    return key


def _keyed_event_id(team_id: str, key: str, request_hash: str) -> str:
    # A failed publish may still have reached Kafka (a timeout proves nothing), and then
    # the key is released for a retry: the retry's event carries the same id, so each
    # webhook gets the same webhook-id twice and de-duplicates it.
    digest = hashlib.sha256(f"{team_id}\x00{key}\x00{request_hash}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


async def prune_idempotency_keys(conn: AsyncConnection, now: datetime) -> int:
    """Drop the keys whose window has passed; returns how many. A key used once and never
    again would otherwise stay for good, with its answer."""
    result = await conn.execute(delete(_keys).where(_keys.c.created_at < now - IDEMPOTENCY_WINDOW))
    return int(result.rowcount or 0)


async def _claim(conn: AsyncConnection, team_id: str, key: str, request_hash: str) -> Any:
    """Claim the key for this request, or return the row of the request that holds it."""
    now = utcnow()
    await conn.execute(
        delete(_keys).where(
            _keys.c.team_id == team_id,
            _keys.c.key == key,
            or_(
                _keys.c.created_at < now - IDEMPOTENCY_WINDOW,
                # Claimed by a request that never finished (its process died): free again.
                and_(_keys.c.status.is_(None), _keys.c.created_at < now - _ABANDONED_CLAIM),
            ),
        )
    )
    try:
        async with conn.begin_nested():
            await conn.execute(
                insert(_keys).values(
                    team_id=team_id, key=key, request_hash=request_hash, created_at=now
                )
            )
    except IntegrityError:
        return (
            await conn.execute(select(_keys).where(_keys.c.team_id == team_id, _keys.c.key == key))
        ).first()
    return None


async def publish_event(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "event:publish")
    key = _idempotency_key(request)
    body = await parse_body(request, EventIn)
    request_hash = hashlib.sha256(
        orjson.dumps(body.model_dump(), option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    if key is not None:
        async with ctx.engine.begin() as conn:
            earlier = await _claim(conn, principal.team_id, key, request_hash)
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
    event_id = (
        new_id("evt") if key is None else _keyed_event_id(principal.team_id, key, request_hash)
    )
    event = Event(id=event_id, team_id=principal.team_id, occurred_at=utcnow(), **body.model_dump())
    answer = {"id": event.id, "type": event.type, "occurred_at": event.occurred_at}

    async def forget(conn: AsyncConnection) -> None:
        if key is not None:
            await conn.execute(
                delete(_keys).where(_keys.c.team_id == principal.team_id, _keys.c.key == key)
            )

    try:
        # No database change rides on a raw event, so there is nothing for an outbox to
        # protect: the event is published directly and acknowledged with acks=all.
        await ctx.outbox.publish_direct(
            ctx.topics.events, f"{event.team_id}/{event.object_id}", event
        )
    except Exception:
        # The key must not stay claimed by a request that did not finish.
        async with ctx.engine.begin() as conn:
            await forget(conn)
        raise
    if key is not None:
        # Only once Kafka has the event may a repeat be told it is done.
        async with ctx.engine.begin() as conn:
            await conn.execute(
                update(_keys)
                .where(_keys.c.team_id == principal.team_id, _keys.c.key == key)
                .values(status=201, response=orjson.loads(orjson.dumps(answer)))
            )
    return json_response(answer, status=201)


def add_routes(app: web.Application, spec: OpenApi) -> None:
    spec.route(
        app,
        "POST",
        "/v1/teams/{team}/events",
        publish_event,
        status=201,
        body=EventIn,
        permission="event:publish",
        errors=(401, 403, 404, 409, 413, 422, 503),
        summary="Publish an event; Idempotency-Key makes a repeat within 24 h a no-op",
    )
