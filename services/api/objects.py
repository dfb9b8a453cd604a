"""Object routes: ``/v1/teams/{team}/objects/{object_type}``; each change publishes its event."""

from __future__ import annotations

import re

from aiohttp import web
from sqlalchemy import insert

from services.shared import (
    Event,
    OpenApi,
    ValidationFailed,
    json_response,
    new_id,
    read_json,
    tables,
    utcnow,
)

from .context import CONTEXT

_OBJECT_TYPE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def _object_type(request: web.Request) -> str:
    object_type = request.match_info["object_type"]
    if not _OBJECT_TYPE.match(object_type):
        raise ValidationFailed(
            "object_type must be lowercase letters, digits, '_' or '-', starting with a letter",
            details=[{"field": "object_type", "reason": "invalid format"}],
        )
    return object_type


async def create_object(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    principal = await ctx.authorize(request, "object:create")
    object_type = _object_type(request)
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ValidationFailed(
            "the object must be a JSON object",
            details=[{"field": "body", "reason": "not an object"}],
        )
    now = utcnow()
    object_id = new_id("obj")
    event = Event(
        id=new_id("evt"),
        type="object.created",
        team_id=principal.team_id,
        object_type=object_type,
        object_id=object_id,
        occurred_at=now,
        data=data,
    )
    # Publishing inside the transaction: if Kafka refuses, the object is rolled back and the
    # caller gets 503, so a stored object never lacks its event.
    async with ctx.engine.begin() as conn:
        await conn.execute(
            insert(tables.objects).values(
                id=object_id,
                team_id=principal.team_id,
                object_type=object_type,
                data=data,
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
        await ctx.publisher.event(event)
    body = {
        "id": object_id,
        "object_type": object_type,
        "version": 1,
        "data": data,
        "created_at": now,
        "event_id": event.id,
    }
    return json_response(body, status=201)


def add_routes(app: web.Application, spec: OpenApi) -> None:
    spec.route(
        app,
        "POST",
        "/v1/teams/{team}/objects/{object_type}",
        create_object,
        status=201,
        permission="object:create",
        errors=(401, 403, 404, 413, 422, 503),
        summary="Create an object (any JSON object) and publish object.created",
    )
